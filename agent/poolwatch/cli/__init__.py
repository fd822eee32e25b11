"""The ``poolwatch`` command: one module per subcommand in this package.

The agent never imports this package (an import contract in pyproject.toml keeps it so). Each
module in ``COMMANDS`` provides ``add_arguments(parser)`` and ``run(args) -> int`` and is
imported only when its command runs. Errors the user can fix (bad URL, bad file, bad setting)
are raised as ``UsageError``/``ConfigError``: one line on stderr, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .._version import __version__
from ..config import ConfigError
from ._common import UsageError

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("poolwatch.cli.demo", "run an instrumented app under load, with a live view"),
    "generate": (
        "poolwatch.cli.generate",
        "write alerts, dashboards and chart files from the table",
    ),
    "exporter": ("poolwatch.cli.exporter", "serve /metrics of every worker in a shared directory"),
    "top": ("poolwatch.cli.top", "live terminal view of a poolwatch /metrics endpoint"),
    "advise": ("poolwatch.cli.advise", "pool sizes from observed traffic, and the fleet budget"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="poolwatch",
        description="poolwatch: connection pools, event loop and HTTP metrics of async services",
    )
    parser.add_argument("--version", action="version", version=f"poolwatch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(module=module_name)
        # Subcommand arguments are declared by the module; import is cheap (no heavy imports
        # at module level in command modules).
        importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(importlib.import_module(args.module).run(args) or 0)
    except (UsageError, ConfigError) as exc:
        print(f"poolwatch {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
