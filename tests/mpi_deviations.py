"""Run under mpiexec: the deviations of pair_style mlsurrogate (uncertainty 1, plus any
more pair style keywords, e.g. "dropout 4 seed 7") for one structure; rank 0 writes them
as JSON, the pair style writes its table.

mpiexec -n N python mpi_deviations.py model.pt structure.json table [keywords] out.json
"""

from __future__ import annotations

import json
import sys

import mlsurrogate  # noqa: F401  (makes libmpi global before liblammps loads)
from mlsurrogate.lammps_pair import pair_style_deviations

if __name__ == "__main__":
    model, structure, table, *keywords, output = sys.argv[1:]
    data = json.loads(open(structure).read())
    deviations = pair_style_deviations(
        model, data["cell"], data["positions"], data["grid"], table, options=" ".join(keywords)
    )
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_rank() == 0:
        with open(output, "w") as handle:
            json.dump({**deviations, "atom_devi_f": deviations["atom_devi_f"].tolist()}, handle)
