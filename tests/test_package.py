"""The package a user installs: `python -m build`, `twine check --strict`, then the wheel with
no extra but `[cli]` in a fresh virtualenv, where `poolwatch generate --root DIR` must write the
repository's own alert rules, Alertmanager routing, runbook and dashboards without the Grafana
SDK."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

from poolwatch import __version__
from tests.support.apps import REPO as REPO_DIR

REPO = Path(REPO_DIR)

# what an installed wheel writes, each compared with the repository's committed file
OPS_FILES = (
    "alerts/poolwatch.rules.yaml",
    "alerts/alertmanager.yml",
    "alerts/runbook.md",
    "tests/alerts/poolwatch_test.yaml",
    "dashboards/overview.json",
    "dashboards/database-pools.json",
    "dashboards/http-client-pools.json",
    "dashboards/event-loop.json",
)


def run(*cmd: str | Path, cwd: Path | None = None) -> str:
    done = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=300, cwd=cwd
    )
    assert done.returncode == 0, f"{cmd}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_wheel_installs_with_cli_only_and_writes_every_ops_file(tmp_path):
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "build", "--outdir", dist, REPO)
    wheels, sdists = list(dist.glob("*.whl")), list(dist.glob("*.tar.gz"))
    assert [w.name for w in wheels] == [f"poolwatch-{__version__}-py3-none-any.whl"]
    assert [s.name for s in sdists] == [f"poolwatch-{__version__}.tar.gz"]
    run(sys.executable, "-m", "twine", "check", "--strict", *wheels, *sdists)

    env = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env)
    python, poolwatch = env / "bin" / "python", env / "bin" / "poolwatch"
    run(python, "-m", "pip", "install", "-q", f"{wheels[0]}[cli]")
    assert run(poolwatch, "--version").strip() == f"poolwatch {__version__}"
    sdk = subprocess.run([python, "-c", "import grafana_foundation_sdk"], capture_output=True)
    assert sdk.returncode != 0, "the Grafana SDK must not be needed"

    out = tmp_path / "out"
    empty = subprocess.run(
        [poolwatch, "generate", "--root", out, "--check"], capture_output=True, text=True
    )
    assert empty.returncode == 1
    assert "missing: alerts/runbook.md" in empty.stdout and "out of date" not in empty.stdout

    # run from elsewhere than the checkout: the files must come from the wheel
    run(poolwatch, "generate", "--root", out, cwd=tmp_path)
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == sorted(OPS_FILES)  # no Helm chart parts without the chart's source
    for relative in OPS_FILES:
        assert (out / relative).read_text() == (REPO / relative).read_text(), relative
    run(poolwatch, "generate", "--root", out, "--check")

    # a selector alone needs no SDK: the stock dashboards carry the selector as a mark
    selector = tmp_path / "selector.toml"
    selector.write_text("selector = 'job=\"shop\"'\n")
    run(poolwatch, "generate", "--overrides", selector, "--root", tmp_path / "selected")
    overview = (tmp_path / "selected/dashboards/overview.json").read_text()
    assert 'job=\\"shop\\"' in overview and "@@SELECTOR" not in overview
    # thresholds are drawn into the dashboards: without the SDK, the rest is written, and why not
    thresholds = tmp_path / "thresholds.toml"
    thresholds.write_text("[pool_utilization]\ncritical = 0.95\n")
    mine = tmp_path / "mine"
    done = subprocess.run(
        [poolwatch, "generate", "--overrides", thresholds, "--root", mine],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "dashboards not written" in done.stdout and "poolwatch[dashboards]" in done.stdout
    assert "> 0.95" in (mine / "alerts/poolwatch.rules.yaml").read_text()
    assert not (mine / "dashboards").exists()
