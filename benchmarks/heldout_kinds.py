"""A model against the held-out QE references of every kind (``data/make_al_heldout.py``):
free-energy and force errors per kind, and for an ensemble its uncertainty and how well
it ranks the errors (Spearman rank correlation, issue 17).

    python benchmarks/heldout_kinds.py [MODEL.pt] [--data data/al_heldout_933K]
        [--spacing H] [--threads N]

Prints one row per structure: A - A_QE (meV/atom), force RMSE against QE (eV/A), and for
ensembles the energy uncertainty (meV/atom) and max force deviation (eV/A); then, for
ensembles, Spearman's rho between energy uncertainty and |A - A_QE| over the structures,
and between per-atom force deviation and per-atom force error over all atoms. Grid: the
model's training spacing unless ``--spacing``. E_ii is LAMMPS's Ewald sum.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import ase
import numpy as np

from mlsurrogate.model import Model

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=str(ROOT / "models" / "al_933K.pt"))
    parser.add_argument("--data", default=str(ROOT / "data" / "al_heldout_933K"))
    parser.add_argument("--spacing", type=float, default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    from scipy.stats import spearmanr

    from mlsurrogate.descriptors import grid_for_spacing

    model = Model.load(args.model)
    ensemble = model.ensemble_size > 1
    references = sorted(Path(args.data).glob("*.json"))
    if not references:
        raise SystemExit(f"no references in {args.data}: run data/make_al_heldout.py")
    print(f"model {args.model} ({model.ensemble_size} network(s)); references {args.data}")
    header = "| structure | atoms | grid | A - A_QE (meV/atom) | F RMSE (eV/A) | RMS F_QE |"
    print(header + (" dE unc. (meV/atom) | max dF (eV/A) |" if ensemble else ""))
    print("|---|---:|---|---:|---:|---:|" + ("---:|---:|" if ensemble else ""))
    energy_errors, energy_spreads, force_errors, force_spreads = [], [], [], []
    for path in references:
        data = json.loads(path.read_text())
        atoms = ase.Atoms(
            data["symbols"], positions=data["positions_A"], cell=data["cell_A"], pbc=True
        )
        if args.spacing:
            grid = grid_for_spacing(atoms.cell, args.spacing)
        else:
            grid = model.default_grid(atoms)
        prediction = model.predict(atoms, grid, threads=args.threads)
        qe_forces = np.array(data["qe_forces_eV_A"])
        error = (prediction.free_energy - data["qe_free_energy_eV"]) / len(atoms)
        atom_errors = np.linalg.norm(prediction.forces - qe_forces, axis=1)
        row = (
            f"| {data['name']} | {len(atoms)} | {grid[0]}x{grid[1]}x{grid[2]} "
            f"| {1000 * error:+.1f} | {np.sqrt(np.mean((prediction.forces - qe_forces) ** 2)):.3f} "
            f"| {np.sqrt(np.mean(qe_forces**2)):.3f} |"
        )
        if ensemble:
            spread = model.predict_uncertainty(atoms, grid, threads=args.threads)
            row += f" {1000 * spread.energy_per_atom:.1f} | {spread.max_force_deviation:.3f} |"
            energy_errors.append(abs(error))
            energy_spreads.append(spread.energy_per_atom)
            force_errors.extend(atom_errors)
            force_spreads.extend(spread.atom_force_deviation)
        print(row, flush=True)
    if ensemble:
        energy_rho = spearmanr(energy_spreads, energy_errors).statistic
        force_rho = spearmanr(force_spreads, force_errors).statistic
        print(f"Spearman rho: energy uncertainty vs |A - A_QE| {energy_rho:+.3f} "
              f"({len(energy_errors)} structures); per-atom force deviation vs force error "
              f"{force_rho:+.3f} ({len(force_errors)} atoms)")


if __name__ == "__main__":
    main()
