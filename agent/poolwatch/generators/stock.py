"""The stock ops files: what ``poolwatch generate`` writes for the default table without
rebuilding anything, so an installed wheel needs no Grafana SDK to write them.

A wheel carries them as package data under ``poolwatch/_stock/`` (pyproject.toml's
``force-include``); a source checkout (an editable install) reads them from the repository,
where they are the committed files. The dashboards are kept with the selector still a mark
(the Helm chart's copies), so a selector-only override needs no SDK either.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from pathlib import Path

from ..thresholds import Threshold, load
from . import GeneratorError

_SOURCE_ROOT = Path(__file__).resolve().parents[3]  # the checkout, when run from one
RUNBOOK = "alerts/runbook.md"
_MARKED_DASHBOARDS = "helm/poolwatch/dashboards"


def read(relative: str) -> str:
    """A stock file by its path in the repository, e.g. ``alerts/runbook.md``."""
    packaged = resources.files("poolwatch").joinpath("_stock", relative)
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    source = _SOURCE_ROOT / relative
    if source.is_file():
        return source.read_text(encoding="utf-8")
    raise GeneratorError(f"the stock file {relative} is missing from this installation")


def runbook() -> dict[str, str]:
    """The runbook every alert's ``runbook_url`` points to (written by hand, copied as is)."""
    return {RUNBOOK: read(RUNBOOK)}


def marked_dashboards(table: Mapping[str, Threshold]) -> dict[str, str]:
    """The stock dashboards, selector still a mark, when ``table``'s thresholds are the
    default ones (the dashboards quote them); otherwise only the SDK can rebuild them."""
    if dict(table) != dict(load(None)):
        raise GeneratorError(
            "dashboards not written: the thresholds of your overrides are drawn into them, "
            "which needs grafana-foundation-sdk: pip install 'poolwatch[dashboards]'"
        )
    names = ("overview", "database-pools", "http-client-pools", "event-loop")
    return {f"dashboards/{name}.json": read(f"{_MARKED_DASHBOARDS}/{name}.json") for name in names}
