"""MkDocs hooks (mkdocs.yml): the reference tables generated from the code at every build, so
they cannot drift from it.

A page writes a marker where a table goes:

- ``<!-- poolwatch:metrics -->``: every ``Metric`` of ``poolwatch.metrics`` (the metric
  contract), in the order it defines them. A metric added there is on the site with no change.
- ``<!-- poolwatch:settings -->``: every setting of ``poolwatch.config.SPECS``, with its
  default from ``Settings``.

A hook rather than a file ``poolwatch generate`` writes: nothing generated is committed, so two
branches that add metrics never conflict over a generated page.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from poolwatch import config, metrics

KINDS = {
    metrics.COUNTER: "counter",
    metrics.UPDOWN: "gauge (up-down)",
    metrics.GAUGE: "gauge",
    metrics.HISTOGRAM: "histogram",
}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def metrics_table() -> str:
    rows = [
        "| Prometheus series | type | unit | OpenTelemetry name | meaning |",
        "|---|---|---|---|---|",
    ]
    for value in vars(metrics).values():
        if isinstance(value, metrics.Metric):
            rows.append(
                f"| `{value.sample()}` | {KINDS.get(value.kind, value.kind)} | `{value.unit}` "
                f"| `{value.name}` | {_cell(value.description)} |"
            )
    return "\n".join(rows)


def settings_table() -> str:
    defaults = {f.name: f.default for f in fields(config.Settings)}
    rows = [
        "| `instrument()` option | environment variable | default | meaning | allowed values |",
        "|---|---|---|---|---|",
    ]
    for name, spec in config.SPECS.items():
        default = defaults.get(name)
        shown = "unset" if default is None else f"`{str(default).lower()}`"
        if isinstance(default, bool | int | float) and not isinstance(default, bool):
            shown = f"`{default:g}`"
        meaning = _cell(config.MEANING.get(name, ""))
        rows.append(f"| `{name}` | `{spec.env}` | {shown} | {meaning} | {_cell(spec.allowed)} |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    if "<!-- poolwatch:metrics -->" in markdown:
        markdown = markdown.replace("<!-- poolwatch:metrics -->", metrics_table())
    if "<!-- poolwatch:settings -->" in markdown:
        markdown = markdown.replace("<!-- poolwatch:settings -->", settings_table())
    return markdown
