"""The ``poolwatch`` command."""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="poolwatch", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run an instrumented app under load, with a live view")
    demo.add_argument("--duration", type=_positive, help="stop after this many seconds")
    demo.add_argument("--database-url", help="SQLAlchemy async URL (default: SQLite in a temp dir)")
    demo.add_argument("--port", type=_port, default=8000, help="app port (default 8000)")
    demo.add_argument(
        "--metrics-port", type=_port, default=9464, help="/metrics port (default 9464)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from . import demo

            return demo.run(args.duration, args.database_url, args.port, args.metrics_port)
    except ConfigError as exc:
        print(f"poolwatch: {exc}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
