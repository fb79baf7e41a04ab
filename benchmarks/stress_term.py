"""Pressure with and without the stress term: 4-atom Al at three densities.

    python benchmarks/stress_term.py [--workdir build/stress_term] [--stress-weight 1e-4]

Data: the bundled 4-atom snapshots (a = 4.05 A) and four QE snapshots each at a = 3.95
and 4.15 A (``data/make_al_dataset.py --lattice``, seed 95; about 6 minutes on 2 cores).
Training: three snapshots of each new density join the bundled training snapshots; two
single networks with ``examples/train_al.py``'s recipe (seed 0), without and with the
stress term, trained side by side (one thread each; about 25 minutes). Data and models
are kept in the workdir and reused (delete them to redo). Prints, for held-out snapshots
of every density (bundled 04 and 08; snapshot 02 of each new density), the model's
pressure against QE's, the stress RMSE over the six components (GPa) and the free energy
error (meV/atom). Stresses are the ASE calculator's (``mlsurrogate.calculator``) on QE's
grid.
"""

from __future__ import annotations

import argparse
import multiprocessing
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

import mlsurrogate
from mlsurrogate.calculator import MLSurrogateCalculator
from mlsurrogate.data import Snapshot
from mlsurrogate.evaluate import evaluate_model
from mlsurrogate.export import export_model
from mlsurrogate.units import GPA_PER_EV_PER_CUBIC_ANGSTROM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from train_al import recipe  # noqa: E402  (the example's settings, one copy)

BUNDLED = ROOT / "data" / "al_fcc4_933K"
LATTICES = (3.95, 4.15)


def snapshots(directory: Path, indices: list[int]) -> list[str]:
    return [str(directory / f"snapshot_{i:02d}.h5") for i in indices]


def make_data(workdir: Path) -> dict[float, Path]:
    folders = {}
    for lattice in LATTICES:
        folder = workdir / f"al4_{lattice}"
        if len(list(folder.glob("snapshot_*.h5"))) < 4:
            command = [sys.executable, str(ROOT / "data" / "make_al_dataset.py"), "--snapshots"]
            command += ["4", "--lattice", str(lattice), "--seed", "95", "--output", str(folder)]
            command += ["--workdir", str(workdir / "qe")]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        folders[lattice] = folder
    return folders


def train_one(stress_weight: float, train: list[str], checkpoint: Path) -> Path:
    if checkpoint.with_suffix(".pt").exists():  # from an earlier run of this benchmark
        return checkpoint.with_suffix(".pt")
    config = recipe(train, snapshots(BUNDLED, [6]), seed=0, stress_weight=stress_weight)
    mlsurrogate.train(config, checkpoint, progress=False, log=lambda line: None)
    return export_model(checkpoint, checkpoint.with_suffix(".pt"))


def stresses(model: Path, path: str) -> tuple[np.ndarray, np.ndarray, float]:
    """(model, QE) stress in GPa (Voigt xx yy zz yz xz xy, QE's sign, on QE's grid) and
    the lattice constant."""
    with Snapshot(path) as snap:
        atoms, grid, qe = snap.atoms, snap.grid_shape, snap.reference("stress")
    atoms.calc = MLSurrogateCalculator(model, grid=grid)
    lattice = float(np.linalg.norm(atoms.cell[0]))  # cubic cells
    # QE's stress is -(1/V) dE/deps, ASE's +(1/V) dE/deps
    qe_voigt = np.array([qe[0, 0], qe[1, 1], qe[2, 2], qe[1, 2], qe[0, 2], qe[0, 1]])
    gpa = GPA_PER_EV_PER_CUBIC_ANGSTROM
    return -atoms.get_stress() * gpa, qe_voigt * gpa, lattice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=str(ROOT / "build" / "stress_term"))
    parser.add_argument("--stress-weight", type=float, default=1e-4)
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    folders = make_data(workdir)
    train = snapshots(BUNDLED, [0, 1, 2, 3, 5, 7, 9])
    heldout = snapshots(BUNDLED, [4, 8])
    for lattice in LATTICES:
        train += snapshots(folders[lattice], [0, 1, 3])
        heldout += snapshots(folders[lattice], [2])
    weights = [0.0, args.stress_weight]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
        checkpoints = [workdir / f"stress_weight_{w:g}.ckpt" for w in weights]
        models = list(pool.map(train_one, weights, [train] * 2, checkpoints))
    print("| stress_weight | held-out snapshot | a (A) | P model (GPa) | P QE (GPa) "
          "| stress RMSE (GPa) | A - A_QE (meV/atom) |")  # fmt: skip
    print("|---:|---|---:|---:|---:|---:|---:|")
    for weight, model in zip(weights, models):
        errors, _ = evaluate_model(model, heldout)
        for path, error in zip(heldout, errors):
            ours, qe, lattice = stresses(model, path)
            print(
                f"| {weight:g} | {Path(path).parent.name}/{Path(path).stem} | {lattice:.2f} "
                f"| {ours[:3].mean():+.1f} | {qe[:3].mean():+.1f} "
                f"| {np.sqrt(((ours - qe) ** 2).mean()):.1f} | {error.total_meV_atom:+.1f} |"
            )


if __name__ == "__main__":
    main()
