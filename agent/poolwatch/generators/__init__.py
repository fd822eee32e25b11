"""Build-time generators: alert and recording rules, their promtool tests, the Alertmanager
routing, the Grafana dashboards and the Helm chart's generated files, all from the threshold
table. ``poolwatch generate`` runs them; the agent never imports this package (an import
contract in pyproject.toml keeps it so).

Each module's ``render(...)`` returns ``{relative path: text}``; a generator that cannot run
(a missing optional package, a chart file without its markers) raises ``GeneratorError``, which
the command prints as one line.
"""

from __future__ import annotations

from ..thresholds import Table


class GeneratorError(Exception):
    """A generator cannot run; the message says what is missing and how to get it."""


def render_all(table: Table) -> dict[str, str]:
    """Every generated file, each rendered once: the chart copies the dashboards of this run."""
    from . import alertmanager, dashboards, helm, rule_tests, rules

    marked = dashboards.render_marked(table)  # the selector still a mark, for the chart
    return {
        **rules.render(table),
        **rule_tests.render(table),
        **alertmanager.render(),
        **dashboards.render(table, marked),
        **helm.render(table, marked),
    }
