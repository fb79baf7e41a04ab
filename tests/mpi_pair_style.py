"""Run under mpiexec: energy, forces and per-atom energies and virials of pair_style
mlsurrogate for one structure.

mpiexec -n N python mpi_pair_style.py model.pt structure.json out.json
"""

from __future__ import annotations

import json
import sys

import mlsurrogate  # noqa: F401  (makes libmpi global before liblammps loads)
from mlsurrogate.lammps_pair import pair_style_energy_forces, pair_style_per_atom

if __name__ == "__main__":
    model, structure, output = sys.argv[1:4]
    data = json.loads(open(structure).read())
    structure = (model, data["cell"], data["positions"], data["grid"])
    energy, forces = pair_style_energy_forces(*structure)
    _, _, atom_energies, atom_virials = pair_style_per_atom(*structure)
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_rank() == 0:
        with open(output, "w") as handle:
            result = {
                "energy": energy,
                "forces": forces.tolist(),
                "atom_energies": atom_energies.tolist(),
                "atom_virials": atom_virials.tolist(),
            }
            json.dump(result, handle)
