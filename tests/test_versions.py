"""Probes load only inside their tested library ranges, and the heap is searched once.

``scripts/test-old-libraries`` runs this file again in a throwaway virtualenv with releases
below the ranges (SQLAlchemy 1.4, asyncpg 0.28, aiohttp 3.9): the same tests then see every
probe off.
"""

from __future__ import annotations

import gc
import importlib.metadata
import tomllib

import pytest
import structlog
from packaging.requirements import Requirement

import poolwatch
from poolwatch import probes
from poolwatch.agent import StartupError, agent
from poolwatch.testing import snapshot
from tests.support.apps import REPO

LIBRARIES = ("sqlalchemy", "asyncpg", "aiohttp")
POOL = "db_client_connection_pool_name"
INSIDE = {  # the installed releases: all inside here, none under scripts/test-old-libraries
    lib: probes.within(importlib.metadata.version(lib), probes.PROBES[lib].supported)
    for lib in LIBRARIES
}
all_inside = pytest.mark.skipif(
    not all(INSIDE.values()), reason="a library installed here is outside its probe's range"
)


def errors_of(probe: str) -> float:
    return snapshot().value("poolwatch_agent_errors_total", probe=probe)


def sqlalchemy_pools() -> set[str]:
    """The names of the SQLAlchemy pools poolwatch exports now."""
    return snapshot().label_values("sqlalchemy_pool_invalidations_total", POOL)


def test_the_ranges_are_those_of_pyproject_extras():
    with open(f"{REPO}/pyproject.toml", "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    for library in LIBRARIES:
        declared = {Requirement(r) for r in extras[library]}
        assert {(r.name.lower(), str(r.specifier)) for r in declared} == {
            (library, str(Requirement(f"{library}{probes.PROBES[library].supported}").specifier))
        }


# probe -> (the library it hooks, the pyproject extra that installs it)
NEWER = {"httpx": ("httpcore", "httpx"), "redis": ("redis", "redis"),
         "psycopg_pool": ("psycopg-pool", "psycopg-pool")}  # fmt: skip


def test_the_newer_probes_ranges_are_in_their_extras():
    """The range of httpcore (the httpx probe hooks it), redis and psycopg_pool is the one
    their extra installs."""
    with open(f"{REPO}/pyproject.toml", "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    for probe, (distribution, extra) in NEWER.items():
        declared = {Requirement(r).name.lower(): Requirement(r) for r in extras[extra]}
        assert str(declared[distribution].specifier) == str(
            Requirement(f"{distribution}{probes.PROBES[probe].supported}").specifier
        ), probe


@pytest.mark.parametrize(
    ("version", "spec", "inside"),
    [
        ("1.4.31", ">=2.0", False),
        ("2.0", ">=2.0.0", True),
        ("2.0.0b4", ">=2.0", True),  # a pre-release counts as its release
        ("2.1.9", ">=2.0", True),
        ("0.28.0", ">=0.29", False),
        ("0.29.0", ">=0.29", True),
        ("3.10.10", ">=3.10.11,<4", False),
        ("3.10.11", ">=3.10.11,<4", True),
        ("3.14.5", ">=3.10.11,<4", True),
        ("4.0.0a1", ">=3.10.11,<4", False),
    ],
)
def test_version_ranges(version, spec, inside):
    assert probes.within(version, spec) is inside


def test_installed_releases_decide_which_probes_load(clean_agent):
    """Real libraries: in the dev environment every probe loads; in the old-libraries one none
    of these three does, with one warning each and the app untouched."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import Engine

    original_init = vars(Engine)["__init__"]
    inside = INSIDE
    with structlog.testing.capture_logs() as logs:
        poolwatch.instrument(metrics_port=0)
        poolwatch.instrument(metrics_port=0)
    for lib in LIBRARIES:
        assert (agent.probe(lib) is not None) is inside[lib], lib
        lines = [e for e in logs if e.get("probe") == lib and "probe is off" in e["event"]]
        assert len(lines) == (0 if inside[lib] else 1), logs
        if not inside[lib]:
            found = importlib.metadata.version(lib)
            assert f"{lib} {found} is installed" in lines[0]["event"]
            assert f"supports {lib}{probes.PROBES[lib].supported} only" in lines[0]["event"]
            assert errors_of(lib) >= 1
    if not inside["sqlalchemy"]:
        assert vars(Engine)["__init__"] is original_init  # nothing of the library is touched
    engine = create_engine("sqlite://")
    assert poolwatch.watch_engine(engine) is engine  # the app's explicit call still works


@all_inside  # a release is faked below the range: the real ones must be inside
def test_a_release_outside_the_range_leaves_its_probe_off(clean_agent, monkeypatch):
    from sqlalchemy import create_engine
    from sqlalchemy.engine import Engine

    real = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata,
        "version",
        lambda name: "1.4.31" if name == "sqlalchemy" else real(name),
    )
    original_init = vars(Engine)["__init__"]
    with structlog.testing.capture_logs() as logs:
        poolwatch.instrument(metrics_port=0)
        engine = poolwatch.watch_engine(create_engine("sqlite://"), name="orders")
        with engine.connect():
            pass
    assert agent.probe("sqlalchemy") is None
    assert vars(Engine)["__init__"] is original_init
    assert not [s for s in snapshot().samples if "orders" in s.labels.values()]
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [e["event"] for e in warnings] == [
        "poolwatch: the sqlalchemy probe is off: sqlalchemy 1.4.31 is installed, the probe "
        "supports sqlalchemy>=2.0 only; the app runs unchanged, without its metrics. Use "
        "sqlalchemy>=2.0 to turn it on."
    ]
    assert (agent.probe("asyncpg") is not None) is INSIDE["asyncpg"]  # the others: as usual


@all_inside
def test_strict_mode_refuses_an_unsupported_release(clean_agent, monkeypatch):
    real = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata, "version", lambda name: "0.28.0" if name == "asyncpg" else real(name)
    )
    monkeypatch.setenv("POOLWATCH_STRICT", "true")
    with pytest.raises(StartupError, match=r"asyncpg 0\.28\.0 is installed.*STRICT=true"):
        poolwatch.instrument(metrics_port=0)


@all_inside
def test_one_heap_walk_for_twenty_instrument_calls(clean_agent, monkeypatch, tmp_path):
    from sqlalchemy import create_engine

    walks = []
    get_objects = gc.get_objects
    monkeypatch.setattr(gc, "get_objects", lambda *a: walks.append(1) or get_objects(*a))
    early = create_engine(f"sqlite:///{tmp_path}/early.db")  # before instrument(): the walk
    with early.connect():
        pass
    engines = []
    for n in range(20):  # an app built per test: instrument() at every start-up
        poolwatch.instrument(metrics_port=0)
        engines.append(create_engine(f"sqlite:///{tmp_path}/db{n}.db"))  # the creation hook
    assert len(walks) == 1
    names = sqlalchemy_pools()
    assert names >= {"early.db"} | {f"db{n}.db" for n in range(20)}  # earlier tests' engines too
    poolwatch.uninstrument()
    poolwatch.instrument(metrics_port=0)  # a fresh start searches again
    assert len(walks) == 2
    assert "early.db" in sqlalchemy_pools()
    early.dispose()


def test_every_probe_follows_the_contract():
    """probes/__init__.py: every registered module defines the contract's names, and the probes
    of a library declare the class whose instances the heap walk adopts."""
    import importlib
    import inspect

    for name, (library, _) in probes.PROBES.items():
        module = importlib.import_module(f"poolwatch.probes.{name}")
        assert isinstance(module.PROBE, str), name
        for function, parameters in (
            ("install", ["agent", "hooks"]),
            ("existing", ["agent", "obj"]),
            ("watch", ["agent", "obj", "name"]),
            ("start", ["agent"]),
        ):
            found = list(inspect.signature(getattr(module, function)).parameters)
            assert len(found) == len(parameters), (name, function, found)
        if library is not None:  # a class, or the classes of sync and async pools
            watched = module.WATCHES
            classes = watched if isinstance(watched, tuple) else (watched,)
            assert classes and all(isinstance(c, type) for c in classes), name
        else:
            assert module.WATCHES is None, name
