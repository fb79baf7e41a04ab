"""Forces of pair_style mlsurrogate (with LAMMPS Ewald E_ii) against QE's forces.

    python benchmarks/forces_vs_qe.py MODEL.pt SNAPSHOT.h5 [...]

Runs each snapshot's structure in LAMMPS on the snapshot's own grid and prints the
force RMSE and max error (eV/A), next to the RMS of QE's forces.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from mlsurrogate.data import Snapshot
from mlsurrogate.lammps_pair import pair_style_energy_forces


def main(model: str, paths: list[str]) -> None:
    errors, references = [], []
    print(f"| {'snapshot':<16} | {'RMSE (eV/A)':>11} | {'max |dF|':>9} | {'RMS F_QE':>9} |")
    for path in paths:
        with Snapshot(path) as snap:
            atoms, grid = snap.atoms, list(snap.grid_shape)
            reference = snap.reference("forces")
        if not np.allclose(np.asarray(atoms.cell), np.diag(np.diag(atoms.cell))):
            raise SystemExit(f"{path}: only orthogonal cells are handled by this script")
        _, forces = pair_style_energy_forces(
            model, np.asarray(atoms.cell).tolist(), atoms.positions.tolist(), grid, ionion=True
        )
        difference = forces - reference
        errors.append(difference)
        references.append(reference)
        print(
            f"| {Path(path).stem:<16} | {np.sqrt(np.mean(difference**2)):11.4f} | "
            f"{np.abs(difference).max():9.4f} | {np.sqrt(np.mean(reference**2)):9.4f} |"
        )
    all_errors, all_reference = np.concatenate(errors), np.concatenate(references)
    print(
        f"all: force RMSE {np.sqrt(np.mean(all_errors**2)):.4f} eV/A "
        f"(RMS of QE forces {np.sqrt(np.mean(all_reference**2)):.4f} eV/A)"
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
