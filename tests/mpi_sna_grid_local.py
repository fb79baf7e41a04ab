"""Per-rank LAMMPS ``compute sna/grid/local`` rows and our kernel's block, for MPI tests.

Run as ``mpiexec -n N python tests/mpi_sna_grid_local.py OUT.npz``. LAMMPS runs on
MPI_COMM_WORLD by itself (no mpi4py). Every rank writes ``OUT_rank{r}.npz`` with, for
each case ``c`` in :data:`CASES`: the structure (``c_cell``, ``c_positions``,
``c_numbers``), ``c_grid``, LAMMPS's rows (``c_indices`` (n, 3) [ix, iy, iz],
``c_values`` (n, K)), the rank's subdomain fractions (``c_frac_lo``, ``c_frac_hi``)
and ``c_procgrid``; and, when the C++ kernel can be used, ``c_ours_range`` (3, 2)
half-open from ``mlsurrogate._core.owned_grid_range`` and ``c_ours_values`` from
``compute_grid_descriptors(..., index_range=...)`` indexed [ix, iy, iz, k]. If the
kernel is not importable, ``kernel_error`` starts with "unavailable:"; if it raised,
``kernel_error`` holds the traceback.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import ase
import ase.build
import numpy as np

import mlsurrogate  # noqa: F401  (preloads libmpi before liblammps)
from mlsurrogate.descriptors import BispectrumParams
from mlsurrogate.lammps_reference import lammps_sna_grid_local

PARAMS = BispectrumParams()  # MALA aluminium set, twojmax 10, 91 components
CASES = ("ortho", "tri")


def structure(case: str) -> tuple[ase.Atoms, tuple[int, int, int]]:
    """The fixed structure and grid of one case (grids that do not split evenly)."""
    rng = np.random.default_rng(20240611)
    atoms = ase.build.bulk("Al", "fcc", a=4.05, cubic=True).repeat((2, 2, 2))
    atoms.positions += rng.normal(scale=0.1, size=atoms.positions.shape)
    if case == "ortho":
        return atoms, (10, 9, 11)
    if case == "tri":
        cell = np.array(atoms.cell)
        cell[2] += 0.3 * cell[0] - 0.2 * cell[1]
        cell[1] += 0.25 * cell[0]
        atoms.set_cell(cell, scale_atoms=False)
        atoms.wrap()
        return atoms, (9, 11, 10)
    raise ValueError(case)


def main(out: str) -> None:
    """Compute every case and write this rank's npz file."""
    data: dict[str, np.ndarray] = {}
    rank = 0
    kernel = None
    try:
        from mlsurrogate._core import owned_grid_range
        from mlsurrogate.descriptors import compute_grid_descriptors

        kernel = (owned_grid_range, compute_grid_descriptors)
        kernel_error = ""
    except (ImportError, AttributeError) as exc:
        kernel_error = f"unavailable: {type(exc).__name__}: {exc}"

    for case in CASES:
        atoms, grid = structure(case)
        local = lammps_sna_grid_local(atoms, grid, PARAMS)
        rank = local.rank
        data[f"{case}_cell"] = np.array(atoms.cell)
        data[f"{case}_positions"] = atoms.positions
        data[f"{case}_numbers"] = atoms.numbers
        data[f"{case}_grid"] = np.array(grid)
        data[f"{case}_indices"] = local.indices
        data[f"{case}_values"] = local.values
        data[f"{case}_frac_lo"] = local.frac_lo
        data[f"{case}_frac_hi"] = local.frac_hi
        data[f"{case}_procgrid"] = np.array(local.procgrid)
        data["size"] = np.array(local.size)
        if kernel is not None and not kernel_error:
            owned_grid_range, compute_grid_descriptors = kernel
            try:
                rng = tuple(
                    tuple(owned_grid_range(grid[d], local.frac_lo[d], local.frac_hi[d]))
                    for d in range(3)
                )
                data[f"{case}_ours_range"] = np.array(rng)
                if all(hi > lo for lo, hi in rng):
                    ours = compute_grid_descriptors(atoms, grid, PARAMS, index_range=rng)
                else:
                    ours = np.zeros([max(hi - lo, 0) for lo, hi in rng] + [local.values.shape[1]])
                data[f"{case}_ours_values"] = np.asarray(ours)
            except Exception:  # reported to the test, which fails on it
                kernel_error = traceback.format_exc()
    data["kernel_error"] = np.array(kernel_error)
    data["rank"] = np.array(rank)
    base = Path(out)
    np.savez(base.with_name(f"{base.stem}_rank{rank}.npz"), **data)


def _finalize_mpi() -> None:
    """Finalize MPI through LAMMPS (no LAMMPS call may follow)."""
    from lammps import lammps

    lammps(cmdargs=["-screen", "none", "-log", "none", "-nocite"]).finalize()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: mpiexec -n N {sys.argv[0]} OUT.npz")
    main(sys.argv[1])
    _finalize_mpi()
