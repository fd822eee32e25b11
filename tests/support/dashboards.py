"""The committed dashboards' panel queries as the dashboard tests read them (test_dashboards.py,
test_dashboards_live.py)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from tests.support.apps import REPO

DASHBOARDS = sorted((Path(REPO) / "dashboards").glob("*.json"))
METRIC = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{")
VARIABLE = re.compile(r"\$([A-Za-z_]\w*)")  # $1, $2 are label_replace references, not variables
SERVER_WIDE = "Not filtered by the variables"  # the database server's view: shared by all


def load_dashboard(path: Path) -> dict:
    return json.loads(path.read_text())


@dataclass
class Target:
    """One query of a dashboard's panel."""

    dashboard: str
    panel_id: int
    title: str
    ref_id: str
    expr: str
    instant: bool
    repeat: str | None  # the variable the panel's row repeats over
    server_wide: bool  # the panel says it ignores the variables

    @property
    def name(self) -> str:
        return f"{self.dashboard} #{self.panel_id} {self.title!r} {self.ref_id}"


def targets(dashboard: dict) -> list[Target]:
    """Every panel query of ``dashboard``, with the variable its row repeats over."""
    out, repeat = [], None
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            repeat = panel.get("repeat")
            continue
        for target in panel["targets"]:
            out.append(
                Target(
                    dashboard["uid"],
                    panel["id"],
                    panel["title"],
                    target["refId"],
                    target["expr"],
                    bool(target.get("instant")),
                    repeat,
                    SERVER_WIDE in panel["description"],
                )
            )
    return out
