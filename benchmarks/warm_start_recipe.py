"""A recipe change measured by warm-starting a trained checkpoint (validation data only).

    python benchmarks/warm_start_recipe.py CHECKPOINT -o OUT.ckpt [--epochs 15]
                [--set key=value ...]

The checkpoint's own config (its training and validation snapshots, weights of the loss)
with the energy, force and stress terms from epoch 0 at ``learning_rate`` 1e-4 (not cut),
no early stopping, and the ``--set`` overrides (TOML values: ``physics_every=2``,
``balance_point_density=true``, ``learning_rate=1e-3``). Prints the epoch log with the
seconds since the start; the validation errors per epoch are what a recipe may be chosen
on.

The rows of benchmarks/README.md, "Training experiments", from al_melt's iteration 2:

    python benchmarks/warm_start_recipe.py data/al_melt/run/iteration_02/member_0.ckpt \\
        -o every2.ckpt --set physics_every=2
    python benchmarks/warm_start_recipe.py data/al_melt/run/iteration_02/member_0.ckpt \\
        -o balanced.ckpt --set physics_every=2 --set balance_point_density=true
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import tomllib

import torch

from mlsurrogate.training import TrainingConfig, train


def override(text: str) -> tuple[str, object]:
    """``key=value`` (a TOML value) from the command line."""
    key, _, value = text.partition("=")
    if not key or not value:
        raise argparse.ArgumentTypeError(f"{text!r}: expected key=value")
    return key, tomllib.loads(f"value = {value}")["value"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", type=override, action="append", default=[], dest="changes")
    args = parser.parse_args()

    base = TrainingConfig(**torch.load(args.checkpoint, weights_only=False)["config"])
    settings = {
        "initial_checkpoint": args.checkpoint,
        "max_epochs": args.epochs,
        "physics_start_epoch": 0,
        "physics_lr_factor": 1.0,
        "learning_rate": 1e-4,
        "patience": args.epochs + 1,
        "threads": args.threads,
    }
    config = dataclasses.replace(base, **(settings | dict(args.changes)))
    start = time.time()
    train(config, args.output, progress=False,
          log=lambda line: print(f"{time.time() - start:7.0f} s  {line}", flush=True))  # fmt: skip


if __name__ == "__main__":
    main()
