"""Entry point of the ``binarize`` console script.

Each subcommand lives in its own module of this package and exposes two functions:
``add_parser(subparsers) -> argparse.ArgumentParser`` and ``run(args) -> int``.
Subcommand modules import their heavy dependencies (PyAV, fvcore, the model zoo) inside
``run`` so that ``binarize --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

# subcommands, each a module of this package with the same name
SUBCOMMANDS = ("demo", "profile", "matte", "evaluate", "train", "data")


class CLIError(Exception):
    """An error caused by the user's input: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="binarize", description="1-bit neural networks for PyTorch.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"binarize.cli.{name}")
        sub_parser = module.add_parser(sub)
        sub_parser.set_defaults(_run=module.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from binarize import __version__

        print(__version__)
        return 0
    if not getattr(args, "_run", None):
        parser.print_help()
        return 1
    try:
        return int(args._run(args) or 0)
    except (CLIError, FileNotFoundError, ValueError) as exc:
        print(f"binarize {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"binarize {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
