"""Write bundled_model.json: the bundled model's energy, forces and stress of one fixed
structure, computed by pair_style mlsurrogate (LAMMPS). tests/test_bundled_model.py checks
the pair style and the ASE calculator against it, so any change of the model file or of
the pipeline that moves these numbers is seen. Rerun only when a change is meant to:

    python tests/golden/make_bundled_model_golden.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from ase.build import bulk

import mlsurrogate  # noqa: F401  (libmpi before liblammps)
from mlsurrogate.lammps_pair import pair_style_calculation

HERE = Path(__file__).resolve().parent
MODEL = HERE.parents[1] / "models" / "al_933K.pt"


def golden_structure():
    """Eight-atom sheared fcc Al with fixed displacements (a triclinic cell)."""
    atoms = bulk("Al", "fcc", a=4.05).repeat((2, 2, 2))
    atoms.set_cell(
        np.asarray(atoms.cell) @ (np.eye(3) + [[0.02, 0.01, 0], [0, -0.01, 0], [0, 0, 0]]),
        scale_atoms=True,
    )
    atoms.positions += np.random.default_rng(2026).normal(0.0, 0.07, atoms.positions.shape)
    return atoms


if __name__ == "__main__":
    atoms = golden_structure()
    grid = (20, 20, 20)
    result = pair_style_calculation(str(MODEL), atoms, grid)
    golden = {
        "made_by": "python tests/golden/make_bundled_model_golden.py (pair_style mlsurrogate)",
        "model": "models/al_933K.pt",
        "cell_A": atoms.cell.tolist(),
        "positions_A": atoms.positions.tolist(),
        "grid": list(grid),
        "energy_eV": result["energy"],
        "forces_eV_A": result["forces"].tolist(),
        "virial_eV": result["virial"].tolist(),
    }
    (HERE / "bundled_model.json").write_text(json.dumps(golden, indent=1) + "\n")
