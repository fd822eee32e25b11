"""Which library releases a probe may hook: the ranges of pyproject's extras, checked at load.

A probe wraps private methods of its library; outside the releases it was tested with, it stays
off (one warning line) rather than guess. The ranges are written here as in pyproject.toml
(tests/test_versions.py checks that they agree) and compared on release numbers only: a
pre-release counts as its release, which is as close as a probe's checks need.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys

# library (import name) -> the range of its pyproject extra
SUPPORTED = {
    "sqlalchemy": ">=2.0",
    "asyncpg": ">=0.29",
    "aiohttp": ">=3.10.11,<4",
}


def installed(library: str) -> str | None:
    """The installed release: its distribution metadata, else the module's ``__version__``."""
    try:
        return importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        module = sys.modules.get(library)
        version = getattr(module, "__version__", None)
        return version if isinstance(version, str) else None


def _release(version: str) -> tuple[int, ...]:
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    if match is None:
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(part) for part in match[1].split("."))


def within(version: str, spec: str) -> bool:
    """``version`` inside ``spec`` (comma-separated ``>=X``, ``<X``, ``>X``, ``<=X``, ``==X``)."""
    have = _release(version)
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        op, bound = re.match(r"(>=|<=|==|>|<)\s*(.+)", clause).groups()  # type: ignore[union-attr]
        want = _release(bound)
        width = max(len(have), len(want))
        a, b = have + (0,) * (width - len(have)), want + (0,) * (width - len(want))
        ok = {">=": a >= b, "<=": a <= b, "==": a == b, ">": a > b, "<": a < b}[op]
        if not ok:
            return False
    return True


def refusal(probe: str, library: str) -> str | None:
    """None when the installed ``library`` is one the probe supports, else the one-line
    warning that says the probe is off and what to do."""
    spec = SUPPORTED.get(library)
    if spec is None:
        return None
    version = installed(library)
    if version is not None:
        try:
            if within(version, spec):
                return None
        except ValueError:
            pass
    found = f"{library} {version} is installed" if version else f"{library}'s version is unknown"
    return (
        f"poolwatch: the {probe} probe is off: {found}, the probe supports {library}{spec} "
        f"only; the app runs unchanged, without its metrics. Use {library}{spec} to turn it on."
    )
