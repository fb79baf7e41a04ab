"""Cost of the energy/force terms of the training loss: stored dB/dR against the adjoint.

    python benchmarks/physics_terms.py CHECKPOINT SNAPSHOT.h5 [--spacing 0.34] [--steps 3]
        [--stress]

For one snapshot, on the coarse grid of ``--spacing``: the set-up time of the term's
target (descriptors; with the stored contraction also dB/dR by central differences), the
memory it holds (descriptors and, stored, the Jacobian) and the time of one training step
of the term (prediction, functional, contraction, backward to the network's parameters),
the mean of ``--steps``, for both contractions (``physics_jacobian_gb`` chooses between
them in training). The network is a checkpoint's best one, in float32 as trained.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from mlsurrogate.evaluate import functional_for
from mlsurrogate.export import build_model
from mlsurrogate.training import SnapshotSource, TrainingConfig, load_checkpoint
from mlsurrogate.training.physics_terms import coarse_grid_target, physics_loss, snapshot_reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("snapshot")
    parser.add_argument("--spacing", type=float, default=0.34)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--stress", action="store_true", help="with the stress term")
    args = parser.parse_args()
    config = dataclasses.replace(
        TrainingConfig(**load_checkpoint(args.checkpoint)["config"]),
        energy_weight=1e-3, force_weight=1e-4, stress_weight=1e-4 if args.stress else 0.0,
    )  # fmt: skip
    network = build_model(args.checkpoint).network.float()
    params = config.params()
    source = SnapshotSource(args.snapshot, params)
    functional = functional_for(source.snapshot)
    reference = snapshot_reference(source)
    natoms = len(source.snapshot.atoms)
    print(f"{args.snapshot}: {natoms} atoms; coarse grid {args.spacing} A")
    print("| contraction | grid | set-up (s) | held (MB) | s per step |")
    print("|---|---:|---:|---:|---:|")
    for stored in (True, False):
        start = time.perf_counter()
        target = coarse_grid_target(
            source, reference, params, args.spacing, "cpu",
            with_stress=args.stress, store_jacobian=stored,
        )  # fmt: skip
        setup = time.perf_counter() - start
        held = target.descriptors.nbytes + (target.jacobian.nbytes if stored else 0)
        start = time.perf_counter()
        for _ in range(args.steps):
            network.zero_grad()
            result = physics_loss(network, functional, target, config)
            if result is None:
                raise SystemExit("the network's LDOS is unphysical here: use a trained one")
            result[0].backward()
        step = (time.perf_counter() - start) / args.steps
        grid = "x".join(map(str, target.grid))
        name = "stored dB/dR" if stored else "adjoint"
        print(f"| {name} | {grid} | {setup:.1f} | {held / 1e6:.0f} | {step:.2f} |", flush=True)


if __name__ == "__main__":
    main()
