"""Train, export and use an aluminium LDOS model from the bundled QE data.

    python examples/train_al.py [--members 3] [--epochs N] [--seed S] [--output-dir DIR]

Trains on 7 of the 10 bundled 4-atom Al snapshots (933 K; LDOS, then also QE's free
energies and forces), validates on one (early stopping), holds out two. ``--members``
networks with seeds S, S+1, ... train at the same time, one process and one thread each,
and are exported together as one TorchScript model that predicts their mean LDOS (the
ensemble cancels much of each network's own energy offset). Then prints the model's
errors on the held-out snapshots against QE, writes plots, and computes the free energy
and DOS of a new structure through the Python API.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from ase.build import bulk

import mlsurrogate
from mlsurrogate.evaluate import evaluate_model, format_model_errors, plot_model_errors
from mlsurrogate.export import export_model

DATA = Path(__file__).resolve().parents[1] / "data" / "al_fcc4_933K"
TRAIN, VALIDATION, TEST = [0, 1, 2, 3, 5, 7, 9], [6], [4, 8]


def snapshots(indices: list[int]) -> list[str]:
    return [str(DATA / f"snapshot_{i:02d}.h5") for i in indices]


def recipe(
    train: list[str], validation: list[str], seed: int, epochs: int = 150, **changes
) -> mlsurrogate.TrainingConfig:
    """This example's training settings (also used by benchmarks/stress_term.py)."""
    settings = dict(
        train=train,
        validation=validation,
        hidden=[100, 100],
        activation="silu",  # smooth: exact forces, and the force term sees curvature
        max_epochs=epochs,
        patience=15,
        lr_patience=4,
        seed=seed,
        threads=1,  # the members share the cores
        # after 30 LDOS-only epochs, also fit QE's free energies and forces (at a tenth of
        # the learning rate, physics_lr_factor's default), on a grid fine enough (0.34 A)
        # that its A is within 0.1 meV/atom of the QE grid's
        energy_weight=1e-3,
        force_weight=1e-4,
        physics_start_epoch=30,
        physics_every=10,
        physics_spacing=0.34,
        weight_averaging=0.998,  # validate and export an average over ~5 epochs of steps
    )
    return mlsurrogate.TrainingConfig(**(settings | changes))


def train_member(seed: int, epochs: int, checkpoint: Path) -> int:
    """One network of the ensemble; returns the number of epochs it ran."""
    config = recipe(snapshots(TRAIN), snapshots(VALIDATION), seed, epochs)
    history = mlsurrogate.train(
        config,
        checkpoint,
        progress=False,
        log=lambda line: print(f"[seed {seed}] {line}", flush=True),
    )
    return len(history)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=3, help="networks in the ensemble")
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0, help="seed of the first member")
    parser.add_argument("--output-dir", default="example_output")
    args = parser.parse_args()
    if args.members < 1:
        parser.error(f"--members must be >= 1, got {args.members}")
    out = Path(args.output_dir)
    out.mkdir(exist_ok=True)

    seeds = [args.seed + k for k in range(args.members)]
    checkpoints = [out / f"al_seed{seed}.ckpt" for seed in seeds]
    print(f"training {len(seeds)} networks (seeds {seeds}) in parallel")
    start = time.perf_counter()
    # spawn: fresh interpreters, no fork of a process that already runs torch threads
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=len(seeds), mp_context=context) as pool:
        epochs = list(pool.map(train_member, seeds, [args.epochs] * len(seeds), checkpoints))
    print(f"training: {epochs} epochs in {time.perf_counter() - start:.0f} s")

    model_path = export_model(checkpoints, out / "al_model.pt")
    errors, dos = evaluate_model(model_path, snapshots(TEST))
    print(format_model_errors(errors))
    for path in plot_model_errors(errors, dos, out):
        print(f"wrote {path}")

    model = mlsurrogate.Model.load(model_path)
    atoms = bulk("Al", "fcc", a=4.05, cubic=True).repeat((2, 1, 1))
    atoms.rattle(0.1, seed=1)
    ldos = model.predict_ldos(atoms)
    terms = model.energy_terms(atoms, ldos)
    print(
        f"8-atom cell on a {ldos.shape[:3]} grid: A = {terms['free_energy']:.4f} eV "
        f"({terms['free_energy'] / len(atoms):.4f} eV/atom), E_F = {terms['fermi_level']:.3f} eV, "
        f"electrons {terms['electrons']:.6f}"
    )
    np.save(out / "ldos_8_atoms.npy", ldos.astype(np.float32))


if __name__ == "__main__":
    main()
