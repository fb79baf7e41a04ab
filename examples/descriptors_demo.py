"""Demo: grid descriptors of 4-atom fcc aluminium, checked against LAMMPS, with a plot.

Computes MALA's 91 bispectrum components on an 18^3 grid of a thermally displaced
4-atom Al cell (the cell of the bundled data), compares with LAMMPS ``compute
sna/grid``, times both, checks the adjoint forces of a random linear energy against
finite differences, and plots one component on the plane z = 0.

    python examples/descriptors_demo.py [--outdir demo_output]
"""

from __future__ import annotations

import argparse
import os
import time

import ase.build
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mlsurrogate.descriptors import (  # noqa: E402
    BispectrumParams,
    compute_grid_descriptors,
    descriptor_forces,
)
from mlsurrogate.lammps_reference import lammps_sna_grid  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outdir", default="demo_output", help="where the PNG goes")
    args = parser.parse_args()

    atoms = ase.build.bulk("Al", "fcc", a=4.05, cubic=True)
    atoms.positions += np.random.default_rng(0).normal(scale=0.1, size=(4, 3))
    grid = (18, 18, 18)
    params = BispectrumParams()  # MALA: rcutfac 4.67637, rfac0 0.99363, twojmax 10

    start = time.perf_counter()
    ours = compute_grid_descriptors(atoms, grid, params)
    t_ours = time.perf_counter() - start
    start = time.perf_counter()
    reference = lammps_sna_grid(atoms, grid, params)
    t_lammps = time.perf_counter() - start
    error = np.abs(ours - reference).max() / np.abs(reference).max()
    npts = np.prod(grid)
    print(f"descriptors {ours.shape} (grid {grid}, K = {ours.shape[-1]})")
    print(f"  mlsurrogate   {1e6 * t_ours / npts:8.1f} us/point (all cores)")
    print(f"  LAMMPS        {1e6 * t_lammps / npts:8.1f} us/point (1 core, incl. setup)")
    print(f"  max |ours - LAMMPS| / max |LAMMPS| = {error:.2e}")

    # forces of E = sum(beta * B) by the adjoint, against a central difference
    beta = np.random.default_rng(1).normal(size=ours.shape)
    forces = descriptor_forces(atoms, grid, params, beta)
    h = 1e-5
    shifted = [atoms.copy(), atoms.copy()]
    shifted[0].positions[0, 2] += h
    shifted[1].positions[0, 2] -= h
    energies = [float((beta * compute_grid_descriptors(a, grid, params)).sum()) for a in shifted]
    fd = -(energies[0] - energies[1]) / (2 * h)
    print(f"  force on atom 0, z: adjoint {forces[0, 2]:.8f}, finite difference {fd:.8f}")

    os.makedirs(args.outdir, exist_ok=True)
    path = os.path.join(args.outdir, "descriptor_slice.png")
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), constrained_layout=True)
    for ax, k in zip(axes, (1, 90)):
        image = ax.imshow(ours[:, :, 0, k].T, origin="lower", extent=(0, 4.05, 0, 4.05))
        ax.set_title(f"B component {k} on z = 0")
        ax.set_xlabel("x (Angstrom)")
        ax.set_ylabel("y (Angstrom)")
        fig.colorbar(image, ax=ax)
    fig.savefig(path + ".part.png", dpi=100)
    os.replace(path + ".part.png", path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
