"""The ``poolwatch`` command: one module per subcommand.

Each module in ``COMMANDS`` provides ``add_arguments(parser)`` and ``run(args) -> int`` and is
imported only when its command runs. Errors the user can fix (bad URL, bad file, bad setting)
are raised as ``UsageError``/``ConfigError``: one line on stderr, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .config import ConfigError

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("poolwatch.demo", "run an instrumented app under load, with a live view"),
    "generate": ("poolwatch.generate", "write alerts, dashboards and chart files from the table"),
    "exporter": ("poolwatch.exporter", "serve /metrics of every worker in a shared directory"),
    "top": ("poolwatch.top", "live terminal view of a poolwatch /metrics endpoint"),
    "advise": ("poolwatch.advise", "pool sizes from observed traffic, and the fleet budget"),
}


class UsageError(Exception):
    """Something the user gave cannot be used; the message says what and how to fix it."""


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="poolwatch", description="poolwatch")
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


if __name__ == "__main__":  # `python -m poolwatch.cli`: run the package's module, not a copy
    from poolwatch.cli import main as package_main

    sys.exit(package_main())
