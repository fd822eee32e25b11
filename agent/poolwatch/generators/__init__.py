"""Build-time generators: alert and recording rules, their promtool tests, the Alertmanager
routing, the Grafana dashboards and the Helm chart's generated files, all from the threshold
table. ``poolwatch generate`` runs them; the agent never imports this package (an import
contract in pyproject.toml keeps it so).

Each module's ``render(...)`` returns ``{relative path: text}``; a generator that cannot run
(a missing optional package, a chart file without its markers) raises ``GeneratorError``, which
the command prints as one line. Without the Grafana SDK the dashboards are the stock ones
(``stock``), as long as the thresholds are the default ones.
"""

from __future__ import annotations

from importlib.util import find_spec
from typing import NamedTuple

from ..thresholds import Table


class GeneratorError(Exception):
    """A generator cannot run; the message says what is missing and how to get it."""


class Rendered(NamedTuple):
    files: dict[str, str]  # relative path -> text
    skipped: list[str]  # why a part was not rendered (one line each)


def render_all(table: Table) -> Rendered:
    """Every generated file, each rendered once: the chart copies the dashboards of this run."""
    from . import alertmanager, dashboards, helm, rule_tests, rules, stock

    files = {
        **rules.render(table),
        **rule_tests.render(table),
        **alertmanager.render(),
        **stock.runbook(),
    }
    try:  # the selector still a mark, for the chart
        if find_spec("grafana_foundation_sdk"):
            marked = dashboards.render_marked(table)
        else:
            marked = stock.marked_dashboards(table)
    except GeneratorError as exc:
        return Rendered(files, [str(exc)])
    files.update(dashboards.render(table, marked))
    files.update(helm.render(table, marked))
    return Rendered(files, [])
