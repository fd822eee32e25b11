"""``poolwatch generate [--check]``: writes alerts, dashboards and chart files from the table.

The generators (``poolwatch.generators``) render ``{relative path: text}``; this command writes
what changed, or with ``--check`` compares and exits 1 listing the files that are missing or out
of date. Without the Grafana SDK the dashboards are the stock ones; a part that cannot be
rendered (dashboards for threshold overrides, without the SDK) is named in one line and the
command exits 2 after writing the rest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..generators import GeneratorError, render_all
from ..thresholds import ThresholdError, load
from ._common import UsageError


def add_arguments(parser: Any) -> None:
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if a generated file is missing or out of date"
    )
    parser.add_argument(
        "--overrides", help="TOML file overriding thresholds (same shape as the table)"
    )
    parser.add_argument("--root", default=".", help="directory to write into (default: .)")


def run(args: Any) -> int:
    try:
        files, skipped = render_all(load(args.overrides))
    except (ThresholdError, GeneratorError) as exc:
        raise UsageError(str(exc)) from None
    root = Path(args.root)
    missing, stale = [], []
    for relative, text in sorted(files.items()):
        path = root / relative
        if not path.exists():
            missing.append(relative)
        elif path.read_text() != text:
            stale.append(relative)
        else:
            continue
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for message in skipped:
        print(f"poolwatch generate: {message}")
    if args.check:
        for relative in missing:
            print(f"missing: {relative} (run `poolwatch generate`)")
        for relative in stale:
            print(f"out of date: {relative} (run `poolwatch generate`)")
        return 2 if skipped else 1 if missing or stale else 0
    written = len(missing) + len(stale)
    print(f"poolwatch generate: {len(files)} files in {root}, {written} written")
    return 2 if skipped else 0
