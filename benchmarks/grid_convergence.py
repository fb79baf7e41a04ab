"""Free energy and forces of pair_style mlsurrogate against the grid it runs on.

    python benchmarks/grid_convergence.py MODEL.pt SNAPSHOT.h5 [--grids 45 32 24 20 16 12]
        [--threads 2]
    python benchmarks/grid_convergence.py MODEL.pt models/al_933K_heldout.json --name heldout_b

The model predicts the LDOS point by point, so any grid works; a coarser grid is
faster (cost ~ points) but integrates the LDOS, density, Hartree and XC terms less
accurately. For the snapshot's structure (with LAMMPS Ewald E_ii) prints, per grid, the
time of one energy + force evaluation and the differences from the finest grid and
from QE (free energy in meV/atom, force RMSE in eV/A). The structure and QE reference
come from a snapshot file or from an entry of a held-out JSON (models/make_al_model.py).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import ase
import numpy as np

from mlsurrogate.data import Snapshot
from mlsurrogate.lammps_pair import pair_style_energy_forces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("snapshot")
    parser.add_argument("--grids", type=int, nargs="+", default=[45, 32, 24, 20, 16, 12])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="heldout_b", help="entry of a held-out JSON")
    args = parser.parse_args()
    if args.snapshot.endswith(".json"):
        entries = {e["name"]: e for e in json.loads(Path(args.snapshot).read_text())}
        if args.name not in entries:
            raise SystemExit(f"{args.snapshot}: no entry {args.name!r}; has {sorted(entries)}")
        entry = entries[args.name]
        atoms = ase.Atoms(
            entry["symbols"], positions=entry["positions_A"], cell=entry["cell_A"], pbc=True
        )
        qe_energy = entry["qe_free_energy_eV"]
        qe_forces = np.asarray(entry["qe_forces_eV_per_A"])
    else:
        with Snapshot(args.snapshot) as snap:
            atoms = snap.atoms
            qe_energy = float(snap.attrs["energy_total_eV"])
            qe_forces = snap.reference("forces")
    cell = np.asarray(atoms.cell)
    if not np.allclose(cell, np.diag(np.diag(cell))):
        raise SystemExit(f"{args.snapshot}: only orthogonal cells are handled by this script")
    natoms = len(atoms)
    results = []
    for n in sorted(args.grids, reverse=True):
        start = time.perf_counter()
        energy, forces = pair_style_energy_forces(
            args.model, cell.tolist(), atoms.positions.tolist(), [n, n, n], ionion=True,
            options=f"threads {args.threads}",
        )  # fmt: skip
        results.append((n, time.perf_counter() - start, energy, forces))
    _, _, fine_energy, fine_forces = results[0]
    print(
        "| grid | spacing (A) | time (s) | A - A_finest (meV/atom) | F RMSE vs finest (eV/A) "
        "| A - A_QE (meV/atom) | F RMSE vs QE (eV/A) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n, seconds, energy, forces in results:
        print(
            f"| {n}^3 | {cell[0, 0] / n:.3f} | {seconds:.1f} | "
            f"{1000 * (energy - fine_energy) / natoms:+.2f} | "
            f"{np.sqrt(np.mean((forces - fine_forces) ** 2)):.4f} | "
            f"{1000 * (energy - qe_energy) / natoms:+.2f} | "
            f"{np.sqrt(np.mean((forces - qe_forces) ** 2)):.4f} |"
        )
    print(f"RMS of QE's forces: {np.sqrt(np.mean(qe_forces**2)):.4f} eV/A; {natoms} atoms")


if __name__ == "__main__":
    main()
