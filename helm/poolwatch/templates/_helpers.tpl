{{/*
Names and labels of this chart's own objects (the usual `helm create` helpers).
*/}}
{{- define "poolwatch.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "poolwatch.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "poolwatch.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride }}
{{- end }}

{{- define "poolwatch.selectorLabels" -}}
app.kubernetes.io/name: {{ include "poolwatch.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "poolwatch.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "poolwatch.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: poolwatch
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "poolwatch.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "poolwatch.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The sidecar templates below take poolwatch's values as their argument, not the root context,
so that another chart can include them: with poolwatch as a dependency of your chart, pass
`.Values.poolwatch` (Helm merges this chart's defaults into it); inside this chart, `.Values`.
*/}}

{{/* The exporter image, by digest when one is given. */}}
{{- define "poolwatch.image" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository .image.tag }}
{{- end }}
{{- end }}

{{/* Pod labels for your app's pods; the default podMonitor.selector matches them. */}}
{{- define "poolwatch.sidecar.podLabels" -}}
poolwatch/sidecar: "true"
{{- end }}

{{/*
Pod annotations for your app's pods: prometheus.io/* for annotation-based discovery (when
prometheusAnnotations.enabled), and a checksum of the sidecar settings so a change to them rolls
the pods.
*/}}
{{- define "poolwatch.sidecar.podAnnotations" -}}
checksum/poolwatch-sidecar: {{ toJson (dict "image" .image "sidecar" .sidecar "metricsToken" .metricsToken) | sha256sum }}
{{- if .prometheusAnnotations.enabled }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .sidecar.port | quote }}
prometheus.io/path: "/metrics"
{{- end }}
{{- end }}

{{/* The environment of your app container: where the workers publish their metrics. */}}
{{- define "poolwatch.sidecar.appEnv" -}}
- name: POOLWATCH_MULTIPROC_DIR
  value: {{ .sidecar.multiprocDir | quote }}
{{- end }}

{{/* The volume mount of your app container (the directory shared with the exporter). */}}
{{- define "poolwatch.sidecar.appVolumeMounts" -}}
- name: poolwatch-multiproc
  mountPath: {{ .sidecar.multiprocDir }}
{{- end }}

{{/* The pod volume shared by your app container and the exporter. */}}
{{- define "poolwatch.sidecar.volumes" -}}
- name: poolwatch-multiproc
  emptyDir:
    {{- with .sidecar.volume.medium }}
    medium: {{ . }}
    {{- end }}
    {{- with .sidecar.volume.sizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
{{- end }}

{{/* The bearer token env var, from a Secret, when metricsToken.existingSecret is set. */}}
{{- define "poolwatch.tokenEnv" -}}
{{- if .metricsToken.existingSecret }}
- name: POOLWATCH_METRICS_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .metricsToken.existingSecret }}
      key: {{ .metricsToken.key }}
{{- end }}
{{- end }}

{{/* Liveness and readiness of an exporter container: its health endpoint. */}}
{{- define "poolwatch.probes" -}}
livenessProbe:
  httpGet:
    path: /healthz
    port: poolwatch
  periodSeconds: 10
  timeoutSeconds: 3
  failureThreshold: 3
readinessProbe:
  httpGet:
    path: /healthz
    port: poolwatch
  periodSeconds: 5
  timeoutSeconds: 3
{{- end }}

{{/* The `poolwatch exporter` container for your app's pods (one target for all workers). */}}
{{- define "poolwatch.sidecar.container" -}}
- name: poolwatch-exporter
  image: {{ include "poolwatch.image" . | quote }}
  imagePullPolicy: {{ .image.pullPolicy }}
  args:
    - exporter
    - --multiproc-dir
    - {{ .sidecar.multiprocDir | quote }}
    - --port
    - {{ .sidecar.port | quote }}
    - --addr
    - "0.0.0.0"
    {{- range .sidecar.extraArgs }}
    - {{ . | quote }}
    {{- end }}
  env:
    - name: POOLWATCH_MULTIPROC_DIR
      value: {{ .sidecar.multiprocDir | quote }}
    {{- with include "poolwatch.tokenEnv" . }}{{ . | trim | nindent 4 }}{{ end }}
    {{- with .sidecar.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: poolwatch
      containerPort: {{ .sidecar.port }}
      protocol: TCP
  {{- include "poolwatch.probes" . | nindent 2 }}
  securityContext:
    {{- toYaml .sidecar.securityContext | nindent 4 }}
  resources:
    {{- toYaml .sidecar.resources | nindent 4 }}
  volumeMounts:
    - name: poolwatch-multiproc
      mountPath: {{ .sidecar.multiprocDir }}
{{- end }}
