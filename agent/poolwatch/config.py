"""Settings: one table, read from ``instrument(**options)`` and ``POOLWATCH_*`` variables.

Every value is checked when the agent starts; a bad one raises :class:`ConfigError` whose message
names the variable, the value given and what is allowed, so it fails at start-up, never
mid-traffic.
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any


class ConfigError(ValueError):
    """A setting has a value poolwatch cannot use. The message says which and how to fix it."""


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError
    return value


def _optional_positive_float(text: str) -> float | None:
    return None if text.strip().lower() in ("", "0", "off", "none") else _positive_float(text)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError
    return value


def _at_least_two(text: str) -> int:
    value = int(text)
    if value < 2:  # one statement run once is no N+1
        raise ValueError
    return value


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError


def _address(text: str) -> str:
    text = text.strip()
    if text in ("localhost", ""):
        return text or "127.0.0.1"
    ipaddress.ip_address(text)
    return text


def _optional_text(text: str) -> str | None:
    return text or None


# The anti-pattern detectors (probes/diagnosis.py); on by default: those whose measured cost
# keeps the HTTP and pool targets (docs/diagnosis.md, bench/bench_diagnosis.py).
DETECTORS = (
    "engine_per_request",
    "client_per_request",
    "sync_db_on_loop",
    "n_plus_one",
    "shared_async_session",
    "swallowed_cancel",
    "unclosed_pool",
)
DEFAULT_DETECTORS = frozenset(DETECTORS) - {"swallowed_cancel"}


def _detectors(text: str) -> frozenset[str]:
    """``default``, ``all``, ``off``, or a comma list of kinds; ``-kind`` takes one off."""
    chosen: set[str] = set()
    for word in (w.strip().lower() for w in text.split(",")):
        if word in ("", "off", "none"):
            continue
        if word in ("default", "all"):
            chosen |= DEFAULT_DETECTORS if word == "default" else set(DETECTORS)
        elif word.startswith("-") and word[1:] in DETECTORS:
            chosen |= set() if chosen else DEFAULT_DETECTORS
            chosen.discard(word[1:])
        elif word in DETECTORS:
            chosen.add(word)
        else:
            raise ValueError
    return frozenset(chosen)


@dataclass(frozen=True)
class _Spec:
    env: str
    parse: Callable[[str], Any]
    allowed: str


# One row per setting: field name -> (environment variable, parser, what is allowed).
# The documentation's configuration table is generated from it (and MEANING, below).
SPECS: dict[str, _Spec] = {
    "metrics_addr": _Spec("POOLWATCH_METRICS_ADDR", _address, "an IP address or 'localhost'"),
    "metrics_port": _Spec(
        "POOLWATCH_METRICS_PORT", _port, "an integer 0-65535 (0 turns the listener off)"
    ),
    "metrics_token": _Spec(
        "POOLWATCH_METRICS_TOKEN", _optional_text, "any string (a bearer token); empty for none"
    ),
    "http_client_max_hosts": _Spec(
        "POOLWATCH_HTTP_CLIENT_MAX_HOSTS", _positive_int, "an integer >= 1"
    ),
    "loop_interval": _Spec("POOLWATCH_LOOP_INTERVAL", _positive_float, "seconds > 0, e.g. 0.01"),
    "block_threshold": _Spec("POOLWATCH_BLOCK_THRESHOLD", _positive_float, "seconds > 0, e.g. 0.1"),
    "max_culprits": _Spec("POOLWATCH_MAX_CULPRITS", _positive_int, "an integer >= 1"),
    "leak_threshold": _Spec(
        "POOLWATCH_LEAK_THRESHOLD",
        _optional_positive_float,
        "seconds > 0, or 0/off to turn leak detection off",
    ),
    "multiproc_dir": _Spec(
        "POOLWATCH_MULTIPROC_DIR", _optional_text, "a directory shared with `poolwatch exporter`"
    ),
    "http_server_metrics": _Spec("POOLWATCH_HTTP_SERVER_METRICS", _bool, "true or false"),
    "max_routes": _Spec("POOLWATCH_MAX_ROUTES", _positive_int, "an integer >= 1"),
    "tracing": _Spec(
        "POOLWATCH_TRACING", _bool, "true or false (unset: on when OTEL_TRACES_EXPORTER names one)"
    ),
    "otlp": _Spec("POOLWATCH_OTLP", _bool, "true or false"),
    "worker": _Spec("POOLWATCH_WORKER", _optional_text, "a worker id; default: the process id"),
    "diagnose": _Spec(
        "POOLWATCH_DIAGNOSE",
        _detectors,
        "'default', 'all', 'off', or a comma list of detector kinds (-kind: all defaults but "
        f"that one); kinds: {', '.join(DETECTORS)}",
    ),
    "n_plus_one": _Spec(
        "POOLWATCH_N_PLUS_ONE", _at_least_two, "an integer >= 2 (same statement, one request)"
    ),
    "strict": _Spec(
        "POOLWATCH_STRICT",
        _bool,
        "true or false (true: a taken port, a collector down... stop the start-up)",
    ),
}


# What each setting does, for the documentation's configuration table (generated from SPECS
# and this dict by scripts/mkdocs_hooks.py; a test checks every setting has a line).
MEANING: dict[str, str] = {
    "metrics_addr": "address of the `/metrics` listener; `0.0.0.0` to be scraped from outside "
    "(a pod)",
    "metrics_port": "port of the `/metrics` listener",
    "metrics_token": "bearer token required on `/metrics`",
    "http_client_max_hosts": "distinct aiohttp hosts with their own series; the rest share `other`",
    "loop_interval": "event-loop lag probe interval, seconds; below `block_threshold`",
    "block_threshold": "a loop stalled this long is a block (counted, its culprit named)",
    "max_culprits": "distinct `culprit` labels; the rest share `other`",
    "leak_threshold": "seconds a connection may be held before it is reported as a leak",
    "multiproc_dir": "directory shared with `poolwatch exporter` (several workers, one target)",
    "http_server_metrics": "record `http.server.*` metrics of the app's requests",
    "max_routes": "distinct `http_route` labels; more routes share `_OTHER`",
    "tracing": "wrap the app in OpenTelemetry's ASGI middleware (server spans); `false` "
    "always wins",
    "otlp": "push every metric over OTLP; also on with `OTEL_METRICS_EXPORTER=otlp` or an "
    "OTLP endpoint set",
    "worker": "the `worker` label of this process in multi-worker mode",
    "diagnose": "anti-pattern detectors: default (all but swallowed_cancel), all, off, a comma "
    "list of kinds, or -kind to drop one",
    "n_plus_one": "runs of one statement within one request that count as an N+1",
    "strict": "a taken port, a collector down, an unwritable directory stop the start-up "
    "instead of one warning",
}


@dataclass(frozen=True)
class Settings:
    metrics_addr: str = "127.0.0.1"
    metrics_port: int = 9464
    metrics_token: str | None = None
    http_client_max_hosts: int = 50
    loop_interval: float = 0.01
    block_threshold: float = 0.1
    max_culprits: int = 20
    leak_threshold: float | None = None
    multiproc_dir: str | None = None
    http_server_metrics: bool = True
    max_routes: int = 200
    tracing: bool | None = None  # None: follow OTEL_TRACES_EXPORTER; False always wins
    otlp: bool = False
    worker: str | None = None
    diagnose: frozenset[str] = DEFAULT_DETECTORS
    n_plus_one: int = 10
    strict: bool = False

    def __repr__(self) -> str:  # never print the token
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        if shown["metrics_token"]:
            shown["metrics_token"] = "***"
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


def load_settings(
    options: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Settings from ``options`` (``instrument()`` keywords) over ``POOLWATCH_*`` variables."""
    options = dict(options or {})
    environ = os.environ if environ is None else environ
    unknown = sorted(set(options) - set(SPECS))
    if unknown:
        raise ConfigError(
            f"instrument() got unknown option(s) {', '.join(unknown)}: "
            f"allowed are {', '.join(sorted(SPECS))}"
        )
    values: dict[str, Any] = {}
    for name, spec in SPECS.items():
        if name in options:
            raw, source = options[name], f"instrument({name}=...)"
            if raw is None or not isinstance(raw, str):
                values[name] = _check_typed(name, raw, spec, source)
                continue
        elif spec.env in environ:
            raw, source = environ[spec.env], spec.env
        else:
            continue
        try:
            values[name] = spec.parse(raw)
        except (ValueError, TypeError):
            raise ConfigError(
                f"{source}={raw!r} is invalid: expected {spec.allowed}. Fix or unset {spec.env}."
            ) from None
    settings = Settings(**values)
    if settings.loop_interval >= settings.block_threshold:  # the lag timer would miss blocks
        raise ConfigError(
            f"POOLWATCH_LOOP_INTERVAL={settings.loop_interval:g} must be smaller than "
            f"POOLWATCH_BLOCK_THRESHOLD={settings.block_threshold:g}: a block that ends before "
            "the next lag tick is due goes unseen. Lower the interval (default 0.01) or raise "
            "the threshold (default 0.1)."
        )
    return settings


def _check_typed(name: str, value: Any, spec: _Spec, source: str) -> Any:
    """Options passed as Python values go through the same parser as their text form."""
    if value is None:
        if name in ("metrics_token", "leak_threshold", "multiproc_dir", "worker", "tracing"):
            return None
        raise ConfigError(f"{source}=None is invalid: expected {spec.allowed}.")
    if name == "diagnose" and isinstance(value, bool | set | frozenset | list | tuple):
        # diagnose=False/True, or the kinds as a collection
        value = {True: "default", False: "off"}.get(value) if isinstance(value, bool) else value
        value = value if isinstance(value, str) else ",".join(value) or "off"
    if isinstance(value, bool):
        if spec.parse is _bool:
            return value
        raise ConfigError(f"{source}={value!r} is invalid: expected {spec.allowed}.")
    try:
        return spec.parse(str(value))
    except (ValueError, TypeError):
        raise ConfigError(f"{source}={value!r} is invalid: expected {spec.allowed}.") from None
