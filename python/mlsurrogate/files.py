"""Output files: check where a result will go before the work starts, and write it under
a temporary name that is renamed only when complete, so a failure (full disk, killed
process) never leaves a half-written file under the real name."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# write failures that are the user's to fix, not bugs: reported as OutputError
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG}


class OutputError(ValueError):
    """An output file cannot be written where the user asked."""


def check_output_path(path: str | os.PathLike[str]) -> Path:
    """``path`` as a Path if a file can be created there; else OutputError naming the
    directory and what to do. Call it before long work whose result goes to ``path``."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a directory; give a file name")
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise OutputError(f"{path}: directory {directory} does not exist; create it first")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot write into {directory} (permission denied)")
    return path


def write_bytes_atomically(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through :func:`atomic_output`. For serializers that
    abort the process when a write fails (torch's zip writer throws from a destructor:
    std::terminate): they write into memory, Python writes the file."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


@contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` only on success.

    The temporary file is removed on any failure; write failures the user can fix (full
    disk, permissions, read-only file system) become OutputError."""
    path = check_output_path(path)
    tmp = path.with_name(f".{path.name}.part-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        # errno None: a short write (numpy reports "N requested and M written")
        if exc.errno is None or exc.errno in _WRITE_ERRNOS:
            reason = os.strerror(exc.errno) if exc.errno else f"short write ({exc})"
            raise OutputError(
                f"cannot write {path}: {reason}; nothing was written (disk full?)"
            ) from exc
        raise
    finally:
        tmp.unlink(missing_ok=True)
