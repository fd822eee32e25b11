"""``poolwatch generate [--check]``: writes alerts, dashboards and chart files from the table.

The generators (``poolwatch.generators``) render ``{relative path: text}``; this command writes
what changed, or with ``--check`` compares and exits 1 listing the files that are out of date.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..generators import GeneratorError, render_all
from ..thresholds import ThresholdError, load
from ._common import UsageError


def add_arguments(parser: Any) -> None:
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if a generated file is out of date"
    )
    parser.add_argument(
        "--overrides", help="TOML file overriding thresholds (same shape as the table)"
    )
    parser.add_argument("--root", default=".", help="project root to write into (default: .)")


def run(args: Any) -> int:
    try:
        files = render_all(load(args.overrides))
    except (ThresholdError, GeneratorError) as exc:
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
