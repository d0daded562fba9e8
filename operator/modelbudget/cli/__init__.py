"""The ``modelbudget`` command: one module per subcommand, each with ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import sys

from modelbudget import __version__

# Subcommand modules, in the order ``--help`` lists them.
COMMANDS = ("crd", "fit", "gate", "inject", "plan", "replay", "run", "simulate", "webhook")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelbudget", description="Cost-bounded autoscaling of model serving on Kubernetes."
    )
    parser.add_argument("--version", action="version", version=f"modelbudget {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"modelbudget.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"modelbudget {args.command}: {exc}", file=sys.stderr)
        return 2


class CliError(Exception):
    """A user error: printed as one line, exit code 2, no traceback."""
