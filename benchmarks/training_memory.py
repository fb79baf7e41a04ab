"""Peak memory of training with the energy, force and stress terms on 50+ snapshots of
4 to 108 atoms (issue 19: within 8 GB on this machine).

    python benchmarks/training_memory.py [--recipe data/al_melt/train.toml]
        [--data data/al_melt] [--workdir build/training_memory] [--epochs 1] [--threads N]

The snapshots: al_melt's ten 4-atom start cells and its 32-atom labels, and exact copies
of their supercells (``mlsurrogate data replicate``: 2x1x1 up to 3x3x3 of the 4-atom cells
whose k-grid divides, 1x1x2 and 1x1x3 of the 32-atom ones: 8 to 108 atoms). The copies add no new
environments, only what grows with the cell: descriptors, coarse grids and, where the
budget ``physics_jacobian_gb`` lets it, the stored dB/dR of the terms. One validation
snapshot of each size class (4 and 32 atoms) from the start data and the labels.
Training runs the recipe with the terms from the first epoch for ``--epochs`` epochs and
prints the peak resident memory of the process, the set-up and epoch times.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import time
from pathlib import Path

import numpy as np

from mlsurrogate.data import Snapshot, replicate_snapshot
from mlsurrogate.training import TrainingConfig, train

START_REPEATS = ((2, 1, 1), (3, 1, 1), (2, 2, 1), (2, 2, 2), (3, 3, 1), (3, 3, 3))
LABEL_REPEATS = ((1, 1, 2), (1, 1, 3))


def replicas(paths: list[Path], repeats: tuple[tuple[int, int, int], ...], workdir: Path):
    """The copies of ``paths`` at each repeat, made once (kept in ``workdir``)."""
    made = []
    for repeat in repeats:
        tag = "x".join(map(str, repeat))
        for path in paths:
            with Snapshot(path) as snap:
                if np.any(np.asarray(snap.attrs["kpoint_grid"]) % repeat):
                    continue  # no supercell calculation equals this copy
            target = workdir / f"{path.parent.name}_{path.stem}_{tag}.h5"
            if not target.exists():
                replicate_snapshot(path, target, repeat)
            made.append(target)
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="data/al_melt/train.toml")
    parser.add_argument("--data", default="data/al_melt")
    parser.add_argument("--workdir", default="build/training_memory")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="default: the recipe's")
    args = parser.parse_args()
    data, workdir = Path(args.data), Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    starts = sorted((data / "initial").glob("*/snapshot_*.h5"))
    labels = sorted((data / "run" / "snapshots").glob("*.h5"))
    if len(starts) < 2 or len(labels) < 2:
        raise SystemExit(f"{data}: needs its start cells and at least two labels")
    validation = [starts[-1], labels[-1]]
    cells = [p for p in starts if p not in validation]
    larger = [p for p in labels if p not in validation]
    train_set = [
        *cells, *larger,
        *replicas(cells, START_REPEATS, workdir), *replicas(larger, LABEL_REPEATS, workdir),
    ]  # fmt: skip
    sizes: dict[int, int] = {}
    for path in train_set:
        with Snapshot(path) as snap:
            natoms = len(snap.atoms)
        sizes[natoms] = sizes.get(natoms, 0) + 1
    config = dataclasses.replace(
        TrainingConfig.from_toml(args.recipe),
        train=[str(p) for p in train_set],
        validation=[str(p) for p in validation],
        max_epochs=args.epochs,
        physics_start_epoch=0,
        physics_lr_factor=1.0,
    )
    if args.threads:
        config = dataclasses.replace(config, threads=args.threads)
    print(
        f"{len(train_set)} training snapshots ("
        + ", ".join(f"{count} of {natoms} atoms" for natoms, count in sorted(sizes.items()))
        + f"), {len(validation)} validation; recipe {args.recipe}, physics_spacing "
        f"{config.physics_spacing} A, physics_jacobian_gb {config.physics_jacobian_gb:g}"
    )
    marks: list[float] = [time.perf_counter()]

    def log(line: str) -> None:
        marks.append(time.perf_counter())
        print(f"  [{marks[-1] - marks[0]:7.1f} s] {line}", flush=True)

    train(config, workdir / "member.ckpt", progress=False, log=log)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    print(f"peak resident memory {peak_gb:.2f} GB; total {time.perf_counter() - marks[0]:.0f} s")


if __name__ == "__main__":
    main()
