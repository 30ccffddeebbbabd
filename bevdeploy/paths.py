"""Output files written safely: checked before any work starts, replaced only atomically.

A build or an evaluation can run for minutes; a bad output path must fail before that, with one
line that names it. An existing file is replaced by writing ``<name>.tmp`` next to it, flushing it
to disk and renaming it over the old one (``os.replace``: readers see the old or the new file,
never half of one); the ``.tmp`` is removed whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

__all__ = ["check_output_path", "atomic_output"]


def check_output_path(path: str | os.PathLike, what: str = "output") -> Path:
    """Check that ``path`` can take a new regular file; returns it as a Path.

    Refused: a directory, a device / FIFO / socket (or a symlink to one; a symlink to a regular
    file is refused too, since the rename would replace the link, not its target), a parent that
    is not a directory, and a place the process cannot write. A missing parent is fine when its
    nearest existing ancestor is a writable directory (the writer creates it).

    Raises:
        ValueError: naming ``what`` and the path, and the reason.
    """
    p = Path(os.fspath(path))
    if str(p) in ("", "."):
        raise ValueError(f"{what} path is empty")
    if p.is_symlink():
        raise ValueError(f"{what} {str(p)!r} is a symbolic link (to {os.readlink(p)!r}); give a plain file path")
    if p.exists():
        mode = p.stat().st_mode
        if stat.S_ISDIR(mode):
            raise ValueError(f"{what} {str(p)!r} is a directory; give a file path")
        if not stat.S_ISREG(mode):
            raise ValueError(f"{what} {str(p)!r} is a device or special file, not a regular file; "
                             "refusing to replace it")
        if not os.access(p, os.W_OK):
            raise ValueError(f"{what} {str(p)!r} exists and is not writable (permission denied)")
    parent = p.parent if str(p.parent) else Path(".")
    ancestor = parent
    while not ancestor.exists():
        if ancestor.is_symlink():  # dangling link in the way
            raise ValueError(f"{what} {str(p)!r}: {str(ancestor)!r} is a dangling symbolic link")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{what} {str(p)!r}: {str(ancestor)!r} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {str(p)!r}: cannot write in directory {str(ancestor)!r} (permission denied)")
    return p


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, what: str = "output") -> Iterator[Path]:
    """Yield a ``<path>.tmp`` to write; on success it is fsynced and renamed over ``path``.

    The ``.tmp`` never outlives the block: an exception (or a failed rename) removes it and
    re-raises; ``path`` keeps its old content then.
    """
    p = check_output_path(path, what)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    if tmp.is_symlink() or (tmp.exists() and not tmp.is_file()):
        raise ValueError(f"{what} {str(p)!r}: {str(tmp)!r} exists and is not a regular file; remove it")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, p)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
