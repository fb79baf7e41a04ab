"""Run under mpiexec: energy and forces of pair_style mlsurrogate for one structure.

mpiexec -n N python mpi_pair_style.py model.pt structure.json out.json
"""

from __future__ import annotations

import json
import sys

import mlsurrogate  # noqa: F401  (makes libmpi global before liblammps loads)
from mlsurrogate.lammps_pair import pair_style_energy_forces

if __name__ == "__main__":
    model, structure, output = sys.argv[1:4]
    data = json.loads(open(structure).read())
    energy, forces = pair_style_energy_forces(model, data["cell"], data["positions"], data["grid"])
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_rank() == 0:
        with open(output, "w") as handle:
            json.dump({"energy": energy, "forces": forces.tolist()}, handle)
