"""Time grid descriptors: LAMMPS ``compute sna/grid`` against our kernel, plus forces.

Default case: 256-atom fcc Al (a = 4.05 A, cubic cell repeated 4x4x4, atoms displaced
by a Gaussian of 0.1 A), 40^3 grid, MALA parameters (twojmax 10, 91 components).
LAMMPS runs in this process on one rank; ``compute sna/grid`` is serial code, and only
the compute itself is timed (setup by ``run 0`` excluded). LAMMPS always computes the
full grid. Ours is ``compute_grid_descriptors`` and ``descriptor_forces`` (adjoint
contraction with a random beta) at the requested thread counts.

    python benchmarks/descriptors.py                  # full default run
    python benchmarks/descriptors.py --grid 16        # quick run
    python benchmarks/descriptors.py --json out.json  # also save the figures
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import ase
import ase.build
import numpy as np

import mlsurrogate  # preloads libmpi for the in-process LAMMPS
from mlsurrogate.descriptors import (
    BispectrumParams,
    compute_grid_descriptors,
    descriptor_forces,
)


def build_structure(repeat: int, displacement: float, seed: int) -> ase.Atoms:
    """fcc Al, cubic a = 4.05 A, repeated ``repeat`` times per axis, displaced at random."""
    atoms = ase.build.bulk("Al", "fcc", a=4.05, cubic=True).repeat((repeat,) * 3)
    rng = np.random.default_rng(seed)
    atoms.positions += rng.normal(scale=displacement, size=atoms.positions.shape)
    atoms.wrap()
    return atoms


def best_time(func: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Shortest wall time of ``repeats`` calls and the last result."""
    best = float("inf")
    result = None
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        result = func()
        best = min(best, time.perf_counter() - start)
    return best, result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=4, help="cubic 4-atom cells per axis (4)")
    p.add_argument(
        "--grid",
        type=int,
        nargs="+",
        default=[40],
        metavar="N",
        help="grid points per axis: one N (N^3) or three (default 40)",
    )
    p.add_argument("--twojmax", type=int, default=10, help="2 J_max (10)")
    p.add_argument(
        "--displacement",
        type=float,
        default=0.1,
        help="std. dev. of random atom displacements in Angstrom (0.1)",
    )
    p.add_argument("--seed", type=int, default=1234, help="random seed (1234)")
    p.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="thread counts for our kernel (1 2)"
    )
    p.add_argument(
        "--repeats", type=int, default=1, help="calls per measurement of ours; the best is kept (1)"
    )
    p.add_argument("--skip-lammps", action="store_true", help="do not run LAMMPS")
    p.add_argument("--json", metavar="OUT", help="write the figures to this JSON file")
    args = p.parse_args(argv)
    if len(args.grid) not in (1, 3):
        p.error("--grid takes one or three integers")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print a markdown table, return the figures."""
    args = parse_args(argv)
    grid = tuple(args.grid * 3 if len(args.grid) == 1 else args.grid)
    npoints = int(np.prod(grid))
    params = replace(BispectrumParams(), twojmax=args.twojmax)
    atoms = build_structure(args.repeat, args.displacement, args.seed)
    command = shlex.join(["python", *sys.argv]) if argv is None else shlex.join(argv)

    rows: list[dict[str, Any]] = []
    lammps_s = None
    reference = None
    if not args.skip_lammps:
        from mlsurrogate.lammps_reference import lammps_sna_grid_timed

        reference, lammps_s = lammps_sna_grid_timed(atoms, grid, params)
        rows.append({"what": "LAMMPS sna/grid", "threads": 1, "seconds": lammps_s})

    ours = None
    for t in args.threads:
        seconds, ours = best_time(
            lambda t=t: compute_grid_descriptors(atoms, grid, params, threads=t), args.repeats
        )
        rows.append({"what": "ours: descriptors", "threads": t, "seconds": seconds})

    assert ours is not None
    beta = np.random.default_rng(args.seed + 1).normal(size=ours.shape)
    for t in args.threads:
        seconds, _ = best_time(
            lambda t=t: descriptor_forces(atoms, grid, params, beta, threads=t), args.repeats
        )
        rows.append({"what": "ours: forces (adjoint)", "threads": t, "seconds": seconds})

    max_rel = None
    if reference is not None:
        max_rel = float(np.abs(ours - reference).max() / np.abs(reference).max())

    print(
        f"# Grid descriptors: {len(atoms)} Al atoms, grid {grid[0]}x{grid[1]}x{grid[2]} "
        f"({npoints} points), twojmax {params.twojmax}, K = {ours.shape[-1]}"
    )
    print()
    print(f"command: `{command}`")
    print(
        f"machine: {platform.node()}, {platform.processor() or platform.machine()}, "
        f"{len(os.sched_getaffinity(0))} cores available, mlsurrogate {mlsurrogate.__version__}"
    )
    print()
    print("| step | threads | total s | µs / grid point | speed-up vs LAMMPS |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        row["us_per_point"] = row["seconds"] / npoints * 1e6
        row["speedup_vs_lammps"] = lammps_s / row["seconds"] if lammps_s else None
        speed = f"{row['speedup_vs_lammps']:.1f}x" if row["speedup_vs_lammps"] else "-"
        print(
            f"| {row['what']} | {row['threads']} | {row['seconds']:.3f} | "
            f"{row['us_per_point']:.2f} | {speed} |"
        )
    print()
    if max_rel is not None:
        print(f"max |ours - LAMMPS| / max |LAMMPS| = {max_rel:.3g}")
    else:
        print("LAMMPS skipped: no comparison")

    figures = {
        "command": command,
        "natoms": len(atoms),
        "grid": list(grid),
        "twojmax": params.twojmax,
        "ncomponents": int(ours.shape[-1]),
        "displacement": args.displacement,
        "seed": args.seed,
        "cores_available": len(os.sched_getaffinity(0)),
        "rows": rows,
        "max_rel_diff_vs_lammps": max_rel,
    }
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(figures, fh, indent=2)
    return figures


if __name__ == "__main__":
    main()
