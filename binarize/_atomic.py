"""Write an output so that its real name holds the old file or the whole new one, never a part.

Every writer in the package (checkpoints, training state, evaluation tables, the demo's files,
videos) writes to a temporary name beside its target and renames it over the target only when the
write has finished; a write that fails or is interrupted removes its temporary file and leaves the
target as it was. ``os.replace`` within one folder is atomic on POSIX and Windows.

The temporary names are unique per call (``tempfile.mkstemp``), so two runs writing the same output
never share one, and keep the target's extension, so writers that pick a format from the name
(PIL, PyAV, matplotlib) still pick the right one. ``mkstemp`` creates private (0600) files; they
are given the permissions ``open`` would have given (0666 less the umask) before they are
written, so a renamed output is as readable as one written in place.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]

__all__ = ["atomic_folder", "atomic_output", "file_mode", "make_temp", "write_text_atomic"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The permissions ``open`` gives a new file: 0666 less the process's umask."""
    return 0o666 & ~_umask()


def make_temp(path: PathLike, folder: bool = False) -> pathlib.Path:
    """A new, unique temporary file (or folder) beside ``path``: ``.name.XXXXXXXX.partial.ext``,
    created with the permissions ``open``/``mkdir`` would give (0666/0777 less the umask). The
    caller renames it over ``path`` when done, or removes it."""
    path = pathlib.Path(path)
    prefix = f".{path.stem if not folder else path.name}."
    if folder:
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=prefix, suffix=".partial", dir=path.parent))
        os.chmod(tmp, 0o777 & ~_umask())
        return tmp
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=f".partial{path.suffix}", dir=path.parent)
    os.close(fd)
    os.chmod(name, file_mode())
    return pathlib.Path(name)


@contextlib.contextmanager
def atomic_output(path: PathLike, *, parents: bool = False) -> Iterator[pathlib.Path]:
    """Yield a temporary path to write ``path``'s content to; rename it over ``path`` when the
    block finishes, remove it when the block raises (``path`` is then untouched).

    ``parents`` creates missing folders above ``path`` first.

        with atomic_output("model.pt") as tmp:
            torch.save(state, tmp)
    """
    target = pathlib.Path(path)
    if parents:
        target.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp(target)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(path: PathLike) -> Iterator[pathlib.Path]:
    """``atomic_output`` for a folder: yield a new temporary folder beside ``path`` to fill; when the
    block finishes, move the old ``path`` (if any) aside, rename the new one to ``path`` and remove
    the old one; when it raises, remove the new one (``path`` is then untouched). ``path``'s parent
    must exist."""
    target = pathlib.Path(path)
    tmp = make_temp(target, folder=True)
    try:
        yield tmp
        if target.exists():
            trash = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, trash / target.name)
            os.replace(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: PathLike, text: str, *, parents: bool = False) -> pathlib.Path:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically; returns ``path``."""
    target = pathlib.Path(path)
    with atomic_output(target, parents=parents) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
    return target
