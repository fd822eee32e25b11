"""Loads the threshold table (``thresholds.toml`` in this package) and optional overrides.

The table is the signals' thresholds plus the deployment's ``selector``: PromQL label matchers
(``job=~"shop.*"``) that every generated rule and dashboard query carries, so poolwatch's alerts
never fire on another service that exports the same OpenTelemetry names.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

# A Prometheus duration ("5m", "1h30m", "500ms"); kept readable: the chart's schema shows it.
DURATION_PATTERN = "^([0-9]+(ms|s|m|h|d|w|y))+$"
_DURATION = re.compile(DURATION_PATTERN)
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800, "y": 31_536_000}
# PromQL label matchers, comma-separated, without braces: job=~"shop.*", namespace="prod"
_MATCHER = r'[a-zA-Z_][a-zA-Z0-9_]*\s*(=~|!~|!=|=)\s*"([^"\\]|\\.)*"'
SELECTOR_PATTERN = f"^({_MATCHER}(\\s*,\\s*{_MATCHER})*)?$"


def duration_seconds(text: str) -> float:
    """Seconds of a Prometheus duration; ``ValueError`` when ``text`` is not one."""
    if not _DURATION.match(text):
        raise ValueError(f"{text!r} is not a Prometheus duration")
    return sum(int(n) * _UNITS[unit] for n, unit in re.findall(r"([0-9]+)(ms|s|m|h|d|w|y)", text))


class ThresholdError(ValueError):
    """An override file cannot be used; the message names the file, the key and the fix."""


@dataclass(frozen=True)
class Threshold:
    key: str
    unit: str
    warning: float
    critical: float
    for_: str  # Prometheus duration, e.g. "5m"
    window: str | None = None  # range of rate() for rate-based signals (p99s, per-minute), "2m"

    def level(self, value: float) -> str:
        """ "ok", "warning" or "critical" for an observed value (the alerts use ">")."""
        if value > self.critical:
            return "critical"
        if value > self.warning:
            return "warning"
        return "ok"


class Table(dict[str, Threshold]):
    """The signals by key (a plain mapping), and the deployment's ``selector``."""

    selector: str = ""


def _parse(data: dict[str, Any], where: str, base: Table | None) -> Table:
    out = Table(base or {})
    out.selector = base.selector if base is not None else ""
    for key, entry in data.items():
        if key == "selector":
            if not isinstance(entry, str) or not re.match(SELECTOR_PATTERN, entry.strip()):
                raise ThresholdError(
                    f"{where}: selector = {entry!r} must be PromQL label matchers without "
                    """braces, like 'job=~"shop.*", namespace="prod"' (empty: every series)"""
                )
            out.selector = entry.strip()
            continue
        if base is not None and key not in base:
            raise ThresholdError(
                f"{where}: unknown signal {key!r}; known signals are {', '.join(sorted(base))}"
            )
        if not isinstance(entry, dict):
            raise ThresholdError(f"{where}: [{key}] must be a table of warning/critical/for")
        current = out.get(key) or Threshold(key, str(entry.get("unit", "")), 0.0, 0.0, "5m")
        changes: dict[str, Any] = {}
        for field, value in entry.items():
            if field in ("warning", "critical"):
                if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                    raise ThresholdError(
                        f"{where}: {key}.{field} = {value!r} must be a number >= 0"
                    )
                changes[field] = float(value)
            elif field == "for" or (field == "window" and (base is None or current.window)):
                if not isinstance(value, str) or not _DURATION.match(value):
                    raise ThresholdError(
                        f'{where}: {key}.{field} = {value!r} must be a duration like "5m" or "30s"'
                    )
                changes["for_" if field == "for" else "window"] = value
            elif field == "unit" and base is None:
                changes["unit"] = value
            else:
                raise ThresholdError(
                    f"{where}: {key}.{field} is not a setting "
                    f"(use warning, critical, for{', window' if current.window else ''})"
                )
        out[key] = replace(current, **changes)
        if out[key].warning > out[key].critical:
            raise ThresholdError(f"{where}: {key}.warning must not exceed {key}.critical")
    return out


def defaults() -> Table:
    text = resources.files("poolwatch").joinpath("thresholds.toml").read_text()
    return _parse(tomllib.loads(text), "thresholds.toml", None)


def load(overrides: str | Path | None = None) -> Table:
    """The table, with an override file (same shape, only the keys to change) applied."""
    table = defaults()
    if overrides is None:
        return table
    path = Path(overrides)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ThresholdError(f"{path}: cannot read the override file ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ThresholdError(f"{path}: not valid TOML ({exc})") from None
    return _parse(data, str(path), table)
