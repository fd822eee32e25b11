"""Grafana dashboards as code: ``poolwatch generate`` writes ``dashboards/*.json`` from here.

Built with Grafana's own builder, grafana-foundation-sdk (the ``dashboards`` extra), which only
``poolwatch generate`` imports: the agent never needs it at runtime. Threshold lines, colours and
the numbers quoted in panel descriptions come from the threshold table, so an override file
changes them along with the alerts; the panels of the alerts' signals read the recording rules.
One module per dashboard; shared pieces in ``kit``, every query from ``promql.py``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from ...thresholds import Threshold
from ..promql import with_selector

# Stable dashboard uids: links, provisioning and runbooks depend on them.
UID = {
    "overview": "poolwatch-overview",
    "db": "poolwatch-db-pools",
    "http": "poolwatch-http-client",
    "loop": "poolwatch-event-loop",
}

# signal (threshold table key) -> (dashboard uid, panel id): the panel each alert's runbook links
# to, as /d/<uid>?viewPanel=<id>. Panel ids are fixed here, never renumbered.
ALERT_PANELS = {
    "pool_utilization": (UID["db"], 2),
    "connection_wait_p99": (UID["db"], 3),
    "failed_checkouts": (UID["db"], 4),
    "overflow_usage": (UID["db"], 5),
    "fleet_connection_budget": (UID["db"], 8),
    "http_client_utilization": (UID["http"], 2),
    "loop_lag_p99": (UID["loop"], 2),
}


def panel_path(signal: str) -> str:
    """Grafana path of the panel for a threshold signal (append ``&var-pool=...`` etc.)."""
    uid, panel_id = ALERT_PANELS[signal]
    return f"/d/{uid}?viewPanel={panel_id}"


def render_marked(table: Mapping[str, Threshold]) -> dict[str, str]:
    """``{"dashboards/<name>.json": text}`` for every dashboard, the selector still a mark
    (``promql.SELECTOR``): the Helm chart ships these and fills in its own selector."""
    from . import database_pools, event_loop, http_client_pools, overview  # imports the SDK
    from .kit import to_json

    files = {}
    for module in (overview, database_pools, http_client_pools, event_loop):
        name = module.__name__.rsplit(".", 1)[1].replace("_", "-")
        files[f"dashboards/{name}.json"] = to_json(module.build(table))
    return files


def render(table: Mapping[str, Threshold], marked: dict[str, str] | None = None) -> dict[str, str]:
    """The dashboards with the table's selector (``marked``: ``render_marked``'s, if at hand)."""
    selector = getattr(table, "selector", "")
    return {
        path: with_selector(text, selector, json_string)
        for path, text in (marked or render_marked(table)).items()
    }


def json_string(text: str) -> str:
    """``text`` as it is written inside a JSON string (quotes and backslashes escaped)."""
    return json.dumps(text)[1:-1]
