"""JSON schemas of Grafana dashboards, generated from the TypeScript types of npm @grafana/schema.

Grafana publishes the dashboard model as TypeScript types only; ts-json-schema-generator turns
them into JSON schemas (dashboard, and each panel plugin's options and field config) that
check-jsonschema validates against. Node packages go under ``.cache/grafana-schema`` (pinned
versions, the same Grafana line as the grafana-foundation-sdk build); schemas are generated once.

``python -m tests.support.grafana_schema`` prepares everything (``scripts/test`` runs it).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "grafana-schema"
PACKAGES = {"@grafana/schema": "11.6.0", "ts-json-schema-generator": "2.4.0"}
RAW = "node_modules/@grafana/schema/dist/esm/raw"

# schema name -> (TypeScript file under RAW, exported type): the dashboard, and for each panel
# plugin used, its options (panel["options"]) and custom field config (fieldConfig.defaults.custom)
TYPES = {"dashboard": ("dashboard/x/dashboard_types.gen.d.ts", "Dashboard")}
for _plugin, _stem, _custom in (
    ("timeseries", "TimeSeriesPanelCfg", True),
    ("heatmap", "HeatmapPanelCfg", True),
    ("stat", "StatPanelCfg", False),
    ("bargauge", "BarGaugePanelCfg", False),
):
    _path = f"composable/{_plugin}/panelcfg/x/{_stem}_types.gen.d.ts"
    TYPES[f"{_plugin}.options"] = (_path, "Options")
    if _custom:
        TYPES[f"{_plugin}.fieldconfig"] = (_path, "FieldConfig")


def _installed() -> bool:
    for name, version in PACKAGES.items():
        manifest = CACHE / "node_modules" / name / "package.json"
        if not manifest.exists() or json.loads(manifest.read_text())["version"] != version:
            return False
    return True


def install() -> None:
    """``npm install --prefix .cache/grafana-schema`` the pinned packages, unless present."""
    if _installed():
        return
    CACHE.mkdir(parents=True, exist_ok=True)
    specs = [f"{name}@{version}" for name, version in PACKAGES.items()]
    subprocess.run(
        ["npm", "install", "--prefix", str(CACHE), "--no-audit", "--no-fund", "--silent", *specs],
        check=True,
        timeout=600,
    )


def schema_path(name: str) -> Path:
    """The JSON schema file for ``name`` (a key of TYPES), generated on first use."""
    install()
    tag = "-".join(f"{n.rsplit('/', 1)[-1]}{v}" for n, v in PACKAGES.items())
    out = CACHE / "schemas" / tag / f"{name}.json"
    if not out.exists():
        path, ts_type = TYPES[name]
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        result = subprocess.run(
            [
                str(CACHE / "node_modules/.bin/ts-json-schema-generator"),
                "--path",
                str(CACHE / RAW / path),
                "--type",
                ts_type,
                "--out",
                str(tmp),
            ],
            timeout=300,
            capture_output=True,
            text=True,
        )
        if result.returncode:
            raise RuntimeError(f"ts-json-schema-generator failed for {name}:\n{result.stderr}")
        tmp.rename(out)
    return out


if __name__ == "__main__":
    for schema in TYPES:
        print(schema_path(schema), file=sys.stderr)
