"""Building blocks of the dashboards: imports of the SDK, variables and panel helpers. Their
PromQL is ``promql.py``'s, shared with the rules.

Every query carries the dashboard variables as regex filters. "All" is ``.*``, which also matches
series without that label (``worker`` outside multi-worker mode, ``namespace``/``service`` outside
Kubernetes): the default view aggregates the whole fleet, picking a value drills down. Panels show
the fleet (sum or quantile over every replica) and, where one bad replica would hide in the sum,
the worst replica (``max by`` over per-process values).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from ... import metrics as m
from ...thresholds import Threshold
from .. import GeneratorError, promql
from . import UID

try:
    from grafana_foundation_sdk.builders import (
        bargauge,
        common,
        heatmap,
        prometheus,
        stat,
        timeseries,
    )
    from grafana_foundation_sdk.builders import dashboard as gd
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models import common as cm
    from grafana_foundation_sdk.models import dashboard as dm
    from grafana_foundation_sdk.models import prometheus as pm
except ImportError as exc:  # only `poolwatch generate` needs it
    raise GeneratorError(
        "generating dashboards needs grafana-foundation-sdk: pip install 'poolwatch[dashboards]'"
    ) from exc

DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
TAG = "poolwatch"

# The variables every query filters on.
TARGET = (
    'namespace=~"$namespace", job=~"$job", service=~"$service", '
    'instance=~"$instance", worker=~"$worker"'
)
P = promql.POOL
POOL = f'{TARGET}, {P}=~"$pool"'
HOST = f'{TARGET}, server_address=~"$host"'
RATE = "$__rate_interval"
JP = f"job, {P}"  # fleet aggregation of pool panels: one series per service and pool


# --- panels -------------------------------------------------------------------------------------
def unit_text(value: float, unit: str) -> str:
    if unit == "ratio":
        return f"{value * 100:g} %"
    if unit == "seconds":
        return f"{value * 1000:g} ms" if value < 1 else f"{value:g} s"
    if unit == "per_minute":
        return f"{value:g}/min"
    return f"{value:g}"


def limits(t: Threshold) -> str:
    """The thresholds as a sentence for descriptions, e.g. 'warning above 70 %, critical ...'."""
    return (
        f"Warning above {unit_text(t.warning, t.unit)}, critical above "
        f"{unit_text(t.critical, t.unit)} (threshold table, alerts after {t.for_})."
    )


def steps(t: Threshold | None) -> gd.ThresholdsConfig:
    """Green below warning, orange from warning, red from critical (Grafana colours from >=)."""
    levels = [dm.Threshold(value=None, color="green")]
    if t is not None:
        levels += [
            dm.Threshold(value=t.warning, color="orange"),
            dm.Threshold(value=t.critical, color="red"),
        ]
    return gd.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps(levels)


def query(
    expr: str, legend: str = "", *, instant: bool = False, fmt: str | None = None
) -> prometheus.Dataquery:
    q = prometheus.Dataquery().expr(expr).legend_format(legend or "__auto").datasource(DATASOURCE)
    if fmt == "heatmap":
        q = q.format(pm.PromQueryFormat.HEATMAP)
    return q.instant() if instant else q.range()


def _with_targets(panel, targets: Iterable[prometheus.Dataquery]):
    for ref_id, target in zip("ABCDEFGH", targets, strict=False):
        panel = panel.with_target(target.ref_id(ref_id))
    return panel


def limit_line(color: str) -> list[dm.DynamicConfigValue]:
    """Field overrides drawing a query as a dashed, unstacked, unfilled line of one colour."""
    return [
        dm.DynamicConfigValue(id_val="custom.stacking", value={"mode": "none", "group": "A"}),
        dm.DynamicConfigValue(id_val="custom.fillOpacity", value=0),
        dm.DynamicConfigValue(id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]}),
        dm.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": color}),
    ]


def graph(
    panel_id: int,
    title: str,
    description: str,
    targets: list[prometheus.Dataquery],
    *,
    unit: str,
    threshold: Threshold | None = None,
    stack: bool = False,
    bars: bool = False,
    limit_refs: tuple[str, ...] = (),
    width: int = 12,
    limit_colors: tuple[str, ...] = ("red", "purple"),
) -> timeseries.Panel:
    """A time series; ``limit_refs`` are queries drawn as unstacked dashed limit lines (red,
    then purple)."""
    panel = (
        timeseries.Panel()
        .id(panel_id)
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .min(0)
        .span(width)
        .height(8)
        .thresholds(steps(threshold))
        .fill_opacity(25 if stack else 10)
        .legend(
            common.VizLegendOptions()
            .display_mode(cm.LegendDisplayMode.TABLE)
            .placement(cm.LegendPlacement.BOTTOM)
            .show_legend(True)
            .calcs(["lastNotNull", "max"])
        )
        .tooltip(
            common.VizTooltipOptions()
            .mode(cm.TooltipDisplayMode.MULTI)
            .sort(cm.SortOrder.DESCENDING)
        )
    )
    if threshold is not None:
        panel = panel.thresholds_style(
            common.GraphThresholdsStyleConfig().mode(cm.GraphThresholdsStyleMode.DASHED)
        )
    if stack:
        panel = panel.stacking(common.StackingConfig().mode(cm.StackingMode.NORMAL).group("A"))
    if bars:
        panel = panel.draw_style(cm.GraphDrawStyle.BARS).fill_opacity(80)
    for ref_id, color in zip(limit_refs, limit_colors, strict=False):
        panel = panel.override_by_query(ref_id, limit_line(color))
    return _with_targets(panel, targets)


def stat_panel(
    panel_id: int,
    title: str,
    description: str,
    target: prometheus.Dataquery,
    *,
    unit: str,
    threshold: Threshold,
) -> stat.Panel:
    """A "what is wrong now" tile per service, its background coloured by the threshold table."""
    nan = dm.SpecialValueMap(
        dm.DashboardSpecialValueMapOptions(
            match=dm.SpecialValueMatch.NA_N,
            result=dm.ValueMappingResult(text="no traffic", color="green"),
        )
    )
    panel = (
        stat.Panel()
        .id(panel_id)
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(4)
        .height(5)
        .thresholds(steps(threshold))
        .mappings([nan])
        .no_value("no data")
        .color_mode(cm.BigValueColorMode.BACKGROUND)
        .graph_mode(cm.BigValueGraphMode.NONE)
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )
    return _with_targets(panel, [target])


def heatmap_panel(panel_id: int, title: str, description: str, expr: str) -> heatmap.Panel:
    panel = (
        heatmap.Panel()
        .id(panel_id)
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .span(8)
        .height(8)
        .calculate(False)
        .y_axis(heatmap.YAxisConfig().unit("s"))
        .cell_values(heatmap.CellValues().unit("short"))
        .show_y_histogram()
    )
    return _with_targets(panel, [query(expr, "{{le}}", fmt="heatmap")])


def top_panel(panel_id: int, title: str, description: str, expr: str, legend: str):
    """Horizontal bars of an instant query (e.g. ``topk`` over the dashboard's time range)."""
    panel = (
        bargauge.Panel()
        .id(panel_id)
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit("short")
        .span(8)
        .height(8)
        .thresholds(steps(None))
        .orientation(cm.VizOrientation.HORIZONTAL)
        .display_mode(cm.BarGaugeDisplayMode.GRADIENT)
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )
    return _with_targets(panel, [query(expr, legend, instant=True)])


def row(row_id: int, title: str, repeat: str | None = None) -> gd.Row:
    built = gd.Row(title).id(row_id)
    return built.repeat(repeat) if repeat else built


# --- variables ----------------------------------------------------------------------------------
def _variable(
    name: str,
    label: str,
    metric: m.Metric,
    label_name: str,
    description: str,
    matchers: Iterable[str] = (),
):
    return (
        gd.QueryVariable(name)
        .label(label)
        .description(description)
        .datasource(DATASOURCE)
        .query(promql.label_values(metric, label_name, ", ".join(matchers)))
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dm.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(dm.VariableOption(selected=True, text="All", value="$__all"))
    )


def variables(extra: str | None = None) -> list:
    """datasource, namespace, job, service, instance, worker (chained), plus pool or host."""
    info = m.BUILD_INFO
    chain = [
        'namespace=~"$namespace"',
        'job=~"$job"',
        'service=~"$service"',
        'instance=~"$instance"',
    ]
    out = [
        gd.DatasourceVariable("datasource").label("Data source").type("prometheus"),
        _variable("namespace", "Namespace", info, "namespace", "Kubernetes namespace."),
        _variable(
            "job", "Job", info, "job", "Prometheus job: the service being scraped.", chain[:1]
        ),
        _variable(
            "service",
            "Service",
            info,
            "service",
            "Kubernetes Service (label set by a ServiceMonitor).",
            chain[:2],
        ),
        _variable(
            "instance",
            "Instance / pod",
            info,
            "instance",
            "One scrape target: a pod, or its sidecar exporter.",
            chain[:3],
        ),
        _variable(
            "worker",
            "Worker",
            info,
            "worker",
            "Worker process of a multi-worker pod (poolwatch exporter); empty otherwise.",
            chain,
        ),
    ]
    if extra == "pool":
        out.append(
            _variable(
                "pool",
                "Pool",
                m.DB_COUNT,
                P,
                "Connection pool (db.client.connection.pool.name).",
                [TARGET],
            )
        )
    if extra == "host":
        out.append(
            _variable(
                "host",
                "Host",
                m.HTTP_CLIENT_OPEN,
                "server_address",
                "Upstream host of aiohttp client connections.",
                [TARGET],
            )
        )
    return out


def new_dashboard(key: str, title: str, description: str, extra: str | None = None):
    board = (
        gd.Dashboard(title)
        .uid(UID[key])
        .description(description)
        .tags([TAG])
        .time("now-1h", "now")
        .refresh("30s")
        .timezone("browser")
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .link(
            gd.DashboardLink("poolwatch")
            .type(dm.DashboardLinkType.DASHBOARDS)
            .tags([TAG])
            .as_dropdown(False)
            .include_vars(True)
            .keep_time(True)
        )
    )
    for variable in variables(extra):
        board = board.with_variable(variable)
    return board


def to_json(board: gd.Dashboard) -> str:
    model = board.build()
    for variable in model.templating.list_val or []:
        if variable.type_val != dm.VariableType.INTERVAL:
            # The SDK fills in interval-variable defaults on every variable; Grafana's schema
            # allows them on none but interval variables.
            variable.auto = variable.auto_min = variable.auto_count = None
    return json.dumps(model, cls=JSONEncoder, indent=2) + "\n"
