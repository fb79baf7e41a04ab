"""Command line interface: ``mlsurrogate``."""

from __future__ import annotations

import argparse
import os
import sys

import mlsurrogate


def _info() -> int:
    from mlsurrogate._lammps_entry import plugin_dir
    from mlsurrogate._preload import find_libmpi

    plugin = os.path.join(plugin_dir(), "mlsurrogateplugin.so")
    try:
        from mlsurrogate import _core

        core = _core.core_version()
    except ImportError as exc:
        core = f"not importable ({exc})"
    print(f"mlsurrogate {mlsurrogate.__version__}")
    print(f"C++ core:      {core}")
    print(f"LAMMPS plugin: {plugin} ({'present' if os.path.isfile(plugin) else 'missing'})")
    print(f"libmpi:        {find_libmpi() or 'not found'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlsurrogate", description=__doc__)
    parser.add_argument("--version", action="version", version=mlsurrogate.__version__)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("info", help="show versions and where the compiled parts are")
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info()
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
