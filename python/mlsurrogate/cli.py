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


def _descriptors(args: argparse.Namespace) -> int:
    import ase.io
    import numpy as np
    from tqdm import tqdm

    from mlsurrogate.descriptors import BispectrumParams, compute_grid_descriptors

    try:
        atoms = ase.io.read(args.structure)
    except Exception as exc:  # ase raises many types for unreadable files
        print(f"mlsurrogate descriptors: cannot read {args.structure}: {exc}", file=sys.stderr)
        return 2
    params = BispectrumParams(
        rcutfac=args.rcutfac,
        rfac0=args.rfac0,
        twojmax=args.twojmax,
        radius=args.radius,
        weight=args.weight,
    )
    nx, ny, nz = args.grid
    if min(args.grid) <= 0:
        print(f"mlsurrogate descriptors: --grid must be positive, got {args.grid}", file=sys.stderr)
        return 2
    try:
        # one x-slab at a time, so long runs show progress
        slabs = [
            compute_grid_descriptors(
                atoms,
                args.grid,
                params,
                threads=args.threads,
                index_range=((ix, ix + 1), (0, ny), (0, nz)),
            )
            for ix in tqdm(range(nx), desc="grid planes", unit="plane", disable=args.quiet)
        ]
    except ValueError as exc:
        print(f"mlsurrogate descriptors: {exc}", file=sys.stderr)
        return 2
    result = np.concatenate(slabs, axis=0)
    tmp = args.output + ".part"
    with open(tmp, "wb") as handle:  # write aside, then rename: no half-written output
        np.save(handle, result)
    os.replace(tmp, args.output)
    print(f"wrote {args.output}: descriptors {result.shape} [ix, iy, iz, k], float64")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlsurrogate", description=__doc__)
    parser.add_argument("--version", action="version", version=mlsurrogate.__version__)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("info", help="show versions and where the compiled parts are")
    desc = sub.add_parser(
        "descriptors",
        help="bispectrum descriptors on a grid for one structure (equal to LAMMPS sna/grid)",
        description="Compute SNAP bispectrum descriptors at every point of an nx x ny x nz "
        "grid of a periodic structure (any file ase.io.read understands) and save them as "
        ".npy, shape (nx, ny, nz, K). Defaults are MALA's aluminium parameters.",
    )
    desc.add_argument("structure", help="structure file (e.g. .xyz, .cif, QE .pwi/.pwo)")
    desc.add_argument("--grid", type=int, nargs=3, required=True, metavar=("NX", "NY", "NZ"))
    desc.add_argument("-o", "--output", default="descriptors.npy", help="output .npy file")
    desc.add_argument("--twojmax", type=int, default=10)
    desc.add_argument("--rcutfac", type=float, default=4.67637)
    desc.add_argument("--rfac0", type=float, default=0.99363)
    desc.add_argument("--radius", type=float, default=0.5, help="radius of every element")
    desc.add_argument("--weight", type=float, default=1.0, help="weight of every element")
    desc.add_argument("--threads", type=int, default=None, help="default: all usable cores")
    desc.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info()
    if args.command == "descriptors":
        return _descriptors(args)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
