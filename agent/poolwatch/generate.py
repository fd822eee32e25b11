"""``poolwatch generate [--check]``: writes alerts, dashboards and chart files from the table.

Each generator module in ``GENERATORS`` has ``render(thresholds) -> {relative path: text}``;
``--check`` compares instead of writing and exits 1 listing the files that are out of date.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from .thresholds import ThresholdError, load

# Order matters: the chart copies the dashboards and renders the alert rules of this same run.
GENERATORS: list[str] = ["poolwatch.gen_alerts", "poolwatch.gen_dashboards", "poolwatch.gen_helm"]


def render_all(overrides: str | None = None) -> dict[str, str]:
    thresholds = load(overrides)
    files: dict[str, str] = {}
    for module_name in GENERATORS:
        files.update(importlib.import_module(module_name).render(thresholds))
    return files


def add_arguments(parser: Any) -> None:
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if a generated file is out of date"
    )
    parser.add_argument(
        "--overrides", help="TOML file overriding thresholds (same shape as the table)"
    )
    parser.add_argument("--root", default=".", help="project root to write into (default: .)")


def run(args: Any) -> int:
    from .cli import UsageError

    try:
        files = render_all(args.overrides)
    except ThresholdError as exc:
        raise UsageError(str(exc)) from None
    root = Path(args.root)
    stale = []
    for relative, text in sorted(files.items()):
        path = root / relative
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        stale.append(relative)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if args.check:
        for relative in stale:
            print(f"out of date: {relative} (run `poolwatch generate`)")
        return 1 if stale else 0
    print(f"poolwatch generate: {len(files)} files, {len(stale)} written")
    return 0
