"""Offline Helm rendering (helm-python-sdk) and the checks a cluster would make on the output.

Built-in kinds are validated by ``kubernetes-validate --strict`` (the Kubernetes OpenAPI
schemas); the Prometheus Operator's custom resources are not in those schemas, so
``custom_resource_errors`` checks the fields their CRDs require and allow, as far as the chart
uses them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "poolwatch"
KUBE_VERSIONS = ("1.27.0", "1.37.0")  # the chart's kubeVersion floor, and the newest schemas
OPERATOR_GROUP = "monitoring.coreos.com"

# A Prometheus duration as the operator's CRDs accept it (pattern of their `for`, `interval`).
DURATION = re.compile(r"^(0|(\d+y)?(\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?(\d+ms)?)$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")

# The value sets the chart is tested with: its defaults and each ci/*-values.yaml.
CI_VALUES = sorted(CHART.glob("ci/*-values.yaml"))
VALUE_SETS = {"default": {}} | {p.name: yaml.safe_load(p.read_text()) for p in CI_VALUES}


def render(
    values: dict[str, Any] | None = None, chart: Path = CHART, name: str = "rel"
) -> dict[str, str]:
    with helm.Chart.load(chart) as loaded:
        return loaded.render(values or {}, name=name, namespace="obs", is_install=True)


def readme_blocks(section: str) -> list[str]:
    """The ```yaml blocks of a section of the chart's README."""
    text = (CHART / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```yaml\n(.*?)```", body, re.S)


def make_app_chart(directory: Path) -> Path:
    """The README's example app chart: poolwatch as a dependency, its Deployment snippet."""
    blocks = readme_blocks("Add the sidecar to your app")
    (dependencies,) = [b for b in blocks if b.startswith("dependencies:")]
    (deployment,) = [b for b in blocks if "kind: Deployment" in b]
    app = directory / "api"
    (app / "templates").mkdir(parents=True)
    chart = {"apiVersion": "v2", "name": "api", "version": "1.0.0", **yaml.safe_load(dependencies)}
    (app / "Chart.yaml").write_text(yaml.safe_dump(chart))
    (app / "values.yaml").write_text("{}\n")
    (app / "templates" / "deployment.yaml").write_text(deployment)
    shutil.copytree(CHART, app / "charts" / "poolwatch")  # what `helm dependency build` does
    return app


def objects(manifests: dict[str, str]) -> list[dict[str, Any]]:
    """Every Kubernetes object of a render (NOTES.txt is not one)."""
    found = []
    for path, text in sorted(manifests.items()):
        if path.endswith(".yaml"):
            found += [doc for doc in yaml.safe_load_all(text) if doc]
    return found


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objs if obj["kind"] == kind]


def rules_of(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The rendered PrometheusRule's rules, by alert or record name."""
    (rule,) = by_kind(objects(render(values)), "PrometheusRule")
    return {r.get("alert") or r["record"]: r for g in rule["spec"]["groups"] for r in g["rules"]}


def assert_locked_down(container: dict[str, Any], pod_spec: dict[str, Any]) -> None:
    """The container runs as a non-root user, read-only, without privileges, with limits."""
    context = {**pod_spec.get("securityContext", {}), **container["securityContext"]}
    assert context["runAsNonRoot"] is True and context.get("runAsUser", 0) != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert context["seccompProfile"]["type"] == "RuntimeDefault"
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
    assert {"cpu", "memory"} <= container["resources"]["limits"].keys()


def is_custom(obj: dict[str, Any]) -> bool:
    return obj["apiVersion"].startswith(OPERATOR_GROUP + "/")


def kubernetes_errors(obj: dict[str, Any], version: str) -> str | None:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}"
    return None


def promtool_check(groups: list[dict[str, Any]], tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )


# --- Prometheus Operator custom resources -------------------------------------------------

_RELABEL_ACTIONS = {
    "replace", "keep", "drop", "hashmod", "labelmap", "labeldrop", "labelkeep",
    "lowercase", "uppercase", "keepequal", "dropequal",
}  # fmt: skip
_RELABEL_FIELDS = {
    "action", "sourceLabels", "separator", "targetLabel", "regex", "modulus", "replacement",
}  # fmt: skip
_ENDPOINT_FIELDS = {
    "port", "path", "scheme", "interval", "scrapeTimeout", "authorization", "relabelings",
    "metricRelabelings", "honorLabels", "params",
}  # fmt: skip
_MATCH_TYPES = {"=", "!=", "=~", "!~"}
# receiver kind: (its field taking a Secret key selector, its other fields the chart uses)
_RECEIVERS = {
    "webhookConfigs": ("urlSecret", set()),
    "pagerdutyConfigs": ("routingKey", {"description", "pagerDutyLinkConfigs"}),
    "slackConfigs": ("apiURL", {"title", "titleLink", "text"}),
}


def _unknown(where: str, data: dict[str, Any], allowed: set[str]) -> list[str]:
    return [f"{where}.{key}: unknown field" for key in data if key not in allowed]


def _string_map(where: str, data: Any) -> list[str]:
    if not isinstance(data, dict):
        return [f"{where}: must be a map"]
    return [f"{where}.{k}: must be a string" for k, v in data.items() if not isinstance(v, str)]


def _duration(where: str, value: Any) -> list[str]:
    if not isinstance(value, str) or not DURATION.match(value):
        return [f"{where}: {value!r} is not a Prometheus duration"]
    return []


def _selector(where: str, selector: Any) -> list[str]:
    if not isinstance(selector, dict):
        return [f"{where}: required (a label selector)"]
    errors = _unknown(where, selector, {"matchLabels", "matchExpressions"})
    errors += _string_map(f"{where}.matchLabels", selector.get("matchLabels", {}))
    return errors


def _endpoint(where: str, endpoint: dict[str, Any]) -> list[str]:
    errors = _unknown(where, endpoint, _ENDPOINT_FIELDS)
    if not isinstance(endpoint.get("port"), str):
        errors.append(f"{where}.port: a port name is required")
    for field in ("interval", "scrapeTimeout"):
        if field in endpoint:
            errors += _duration(f"{where}.{field}", endpoint[field])
    auth = endpoint.get("authorization")
    if auth is not None:
        credentials = auth.get("credentials", {})
        if auth.get("type") != "Bearer" or not credentials.get("name") or "key" not in credentials:
            errors.append(f"{where}.authorization: needs type Bearer and credentials name/key")
    for field in ("relabelings", "metricRelabelings"):
        for i, relabel in enumerate(endpoint.get(field, [])):
            errors += _unknown(f"{where}.{field}[{i}]", relabel, _RELABEL_FIELDS)
            if relabel.get("action", "replace") not in _RELABEL_ACTIONS:
                errors.append(f"{where}.{field}[{i}].action: {relabel['action']!r} is unknown")
    return errors


def _matchers(where: str, matchers: Any) -> list[str]:
    errors = []
    for i, matcher in enumerate(matchers or []):
        errors += _unknown(f"{where}[{i}]", matcher, {"name", "value", "matchType"})
        if not matcher.get("name") or matcher.get("matchType", "=") not in _MATCH_TYPES:
            errors.append(f"{where}[{i}]: needs a name and a matchType of {_MATCH_TYPES}")
    return errors


def _podmonitor(spec: dict[str, Any]) -> list[str]:
    errors = _unknown(
        "spec", spec, {"selector", "namespaceSelector", "podMetricsEndpoints", "jobLabel"}
    )
    errors += _selector("spec.selector", spec.get("selector"))
    errors += _unknown(
        "spec.namespaceSelector", spec.get("namespaceSelector", {}), {"any", "matchNames"}
    )
    endpoints = spec.get("podMetricsEndpoints") or []
    if not endpoints:
        errors.append("spec.podMetricsEndpoints: at least one endpoint")
    for i, endpoint in enumerate(endpoints):
        errors += _endpoint(f"spec.podMetricsEndpoints[{i}]", endpoint)
    return errors


def _servicemonitor(spec: dict[str, Any]) -> list[str]:
    errors = _unknown("spec", spec, {"selector", "namespaceSelector", "endpoints", "jobLabel"})
    errors += _selector("spec.selector", spec.get("selector"))
    for i, endpoint in enumerate(spec.get("endpoints") or []):
        errors += _endpoint(f"spec.endpoints[{i}]", endpoint)
    return errors or ([] if spec.get("endpoints") else ["spec.endpoints: at least one"])


def _prometheusrule(spec: dict[str, Any]) -> list[str]:
    errors = _unknown("spec", spec, {"groups"})
    names = [group.get("name") for group in spec.get("groups", [])]
    if not names or len(set(names)) != len(names) or not all(names):
        errors.append(f"spec.groups: names must be present and unique, got {names}")
    for group in spec.get("groups", []):
        where = f"spec.groups[{group.get('name')}]"
        errors += _unknown(where, group, {"name", "interval", "rules", "limit", "labels"})
        for rule in group.get("rules") or []:
            name = rule.get("alert") or rule.get("record")
            at = f"{where}.rules[{name}]"
            errors += _unknown(
                at,
                rule,
                {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"},
            )
            if ("alert" in rule) == ("record" in rule):
                errors.append(f"{at}: exactly one of alert and record")
            if not isinstance(rule.get("expr"), str | int) or rule.get("expr") == "":
                errors.append(f"{at}.expr: required")
            if "for" in rule:
                errors += _duration(f"{at}.for", rule["for"])
            errors += _string_map(f"{at}.labels", rule.get("labels", {}))
            errors += _string_map(f"{at}.annotations", rule.get("annotations", {}))
    return errors


def _alertmanagerconfig(spec: dict[str, Any]) -> list[str]:
    errors = _unknown("spec", spec, {"route", "receivers", "inhibitRules"})
    receivers = {r.get("name") for r in spec.get("receivers", [])}
    route = spec.get("route") or {}
    for where, sub in [("spec.route", route)] + [
        (f"spec.route.routes[{i}]", r) for i, r in enumerate(route.get("routes", []))
    ]:
        errors += _unknown(
            where, sub,
            {"receiver", "groupBy", "groupWait", "groupInterval", "repeatInterval", "matchers",
             "routes", "continue"},
        )  # fmt: skip
        if sub.get("receiver") not in receivers:
            errors.append(f"{where}.receiver: {sub.get('receiver')!r} is not a receiver")
        for field in ("groupWait", "groupInterval", "repeatInterval"):
            if field in sub:
                errors += _duration(f"{where}.{field}", sub[field])
        errors += _matchers(f"{where}.matchers", sub.get("matchers"))
    for i, receiver in enumerate(spec.get("receivers", [])):
        errors += _unknown(f"spec.receivers[{i}]", receiver, {"name", *_RECEIVERS})
        for kind, (secret_field, fields) in _RECEIVERS.items():
            for j, config in enumerate(receiver.get(kind, [])):
                at = f"spec.receivers[{i}].{kind}[{j}]"
                errors += _unknown(at, config, {secret_field, "sendResolved", *fields})
                secret = config.get(secret_field) or {}
                if set(secret) != {"name", "key"} or not all(secret.values()):
                    errors.append(f"{at}.{secret_field}: a Secret name and key are required")
    for i, rule in enumerate(spec.get("inhibitRules", [])):
        errors += _unknown(f"spec.inhibitRules[{i}]", rule, {"sourceMatch", "targetMatch", "equal"})
        errors += _matchers(f"spec.inhibitRules[{i}].sourceMatch", rule.get("sourceMatch"))
        errors += _matchers(f"spec.inhibitRules[{i}].targetMatch", rule.get("targetMatch"))
    return errors


_CHECKS = {
    ("v1", "PodMonitor"): _podmonitor,
    ("v1", "ServiceMonitor"): _servicemonitor,
    ("v1", "PrometheusRule"): _prometheusrule,
    ("v1alpha1", "AlertmanagerConfig"): _alertmanagerconfig,
}


def custom_resource_errors(obj: dict[str, Any]) -> list[str]:
    version = obj["apiVersion"].split("/", 1)[1]
    check = _CHECKS.get((version, obj["kind"]))
    if check is None:
        return [f"{obj['apiVersion']} {obj['kind']}: not a kind this chart should create"]
    meta = obj.get("metadata", {})
    errors = [] if DNS_SUBDOMAIN.match(meta.get("name", "")) else ["metadata.name: invalid"]
    errors += _string_map("metadata.labels", meta.get("labels", {}))
    if not isinstance(obj.get("spec"), dict):
        return [*errors, "spec: required"]
    return errors + check(obj["spec"])
