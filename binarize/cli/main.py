"""Entry point of the ``binarize`` console script.

Each subcommand lives in its own module of this package and exposes two functions:
``add_parser(subparsers) -> argparse.ArgumentParser`` and ``run(args) -> int``.
Subcommand modules import their heavy dependencies (PyAV, fvcore, the model zoo) inside
``run`` so that ``binarize --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

# subcommands, each a module of this package with the same name
SUBCOMMANDS = ("demo", "profile", "matte", "evaluate", "train", "average", "data")


class CLIError(Exception):
    """An error caused by the user's input: printed as one line, exit status 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so a run cleans up exactly as on Ctrl-C (exit status 143)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="binarize", description="1-bit neural networks for PyTorch.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"binarize.cli.{name}")
        sub_parser = module.add_parser(sub)
        sub_parser.set_defaults(_run=module.run)
    return parser


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        text = f"{exc.strerror}: {str(exc.filename)!r}"
        blocker = _file_in_the_way(exc)
        if blocker is not None:
            text = f"{str(blocker)!r} is a file, but a folder is needed there ({exc.strerror}: {str(exc.filename)!r})"
    return " ".join(text.split()) or type(exc).__name__


def _file_in_the_way(exc: OSError) -> Optional[Path]:
    """For "File exists" / "Not a directory" while creating folders: the file that blocks the path."""
    if not isinstance(exc, (FileExistsError, NotADirectoryError)):
        return None
    path = Path(str(exc.filename))
    for candidate in (path, *path.parents):
        if candidate.is_file():
            return candidate
    return None


@contextmanager
def _cli_signals_and_warnings(command: str) -> Iterator[None]:
    """While a subcommand runs: SIGTERM is raised as :class:`Terminated` (cleanup as on Ctrl-C) and
    warnings print as one line, ``binarize COMMAND: warning: ...``."""
    def on_term(signum: int, frame: Any) -> None:
        raise Terminated()

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        print(f"binarize {command}: warning: {' '.join(str(message).split())}", file=sys.stderr)

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, on_term)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``binarize COMMAND ...``; user errors print one line (exit 2), Ctrl-C exits 130, SIGTERM 143."""
    command = "main"
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        command = args.command or command
        if args.version:
            from binarize import __version__

            print(__version__)
            return 0
        if not getattr(args, "_run", None):
            parser.print_help()
            return 1
        with _cli_signals_and_warnings(args.command):
            return int(args._run(args) or 0)
    except (CLIError, ValueError, OSError) as exc:
        print(f"binarize {command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except MemoryError as exc:
        print(f"binarize {command}: error: out of memory{': ' + _one_line(exc) if str(exc) else ''}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Exception) as exc:
        # Ctrl-C (130) or SIGTERM (143). A signal lands between any two bytecodes, so cleanup code it
        # interrupts (a thread half started, a half-opened file) can raise an error of its own: that
        # error is the signal's consequence, not a failure of the run. Any other error propagates.
        interrupt = _interrupt_behind(exc)
        if interrupt is None:
            raise
        terminated = isinstance(interrupt, Terminated)
        print(f"binarize {command}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130


def _interrupt_behind(exc: BaseException) -> Optional[KeyboardInterrupt]:
    """``exc`` itself when it is Ctrl-C or SIGTERM, else the one it was raised while handling, if any
    (the ``__cause__``/``__context__`` chain)."""
    seen = set()
    link: Optional[BaseException] = exc
    while link is not None and id(link) not in seen:
        if isinstance(link, KeyboardInterrupt):
            return link
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
