"""What keeping the LDOS at a few grid points (compact snapshots) costs in accuracy.

    python benchmarks/compact_points.py [--points 0 2000 300] [--epochs 150]
        [--workdir build/compact_points] [--threads 2]

The example recipe (``examples/train_al.py``: 2 x 100 SiLU, LDOS then free-energy and
force terms) on the bundled 4-atom data (``data/al_fcc4_933K``, 24^3 grids: 13,824 points),
one network per point count, seed 0, the same validation snapshot (6) in full; 0 means
the full snapshots. 300 points is the fraction (2.2 %) the 32-atom labels of
``data/al_melt`` keep of their grids. The batch size scales with the point count, so
that every run makes the same optimizer steps per epoch, the same energy/force steps
(``physics_every``) and the same epochs: the runs differ only in the LDOS points seen.
Each run's errors on the test snapshots 4 and 8 (``mlsurrogate evaluate``: the model's
full-grid LDOS, density, energies and forces against QE). Finished runs are kept in
``--workdir`` and not repeated.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from mlsurrogate.data import compact_snapshot
from mlsurrogate.evaluate import evaluate_model
from mlsurrogate.export import export_model
from mlsurrogate.training import train

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from train_al import TEST, TRAIN, VALIDATION, recipe, snapshots  # noqa: E402  (one copy)

FULL_POINTS = 24**3  # of each bundled 4-atom snapshot


def training_set(points: int, workdir: Path) -> list[str]:
    """The training snapshots, full (0) or compact copies with ``points`` points."""
    if points == 0:
        return snapshots(TRAIN)
    directory = workdir / f"compact_{points}"
    directory.mkdir(parents=True, exist_ok=True)
    copies = []
    for index, path in enumerate(snapshots(TRAIN)):
        target = directory / Path(path).name
        if not target.exists():
            compact_snapshot(path, target, points, seed=index)
        copies.append(str(target))
    return copies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, nargs="+", default=[0, 2000, 300])
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--workdir", default="build/compact_points")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for points in args.points:
        result = workdir / f"result_{points}.json"
        if not result.exists():
            config = recipe(training_set(points, workdir), snapshots(VALIDATION), 0, args.epochs)
            scale = points / FULL_POINTS if points else 1.0
            config = dataclasses.replace(
                config, threads=args.threads, batch_size=max(8, round(config.batch_size * scale))
            )
            checkpoint = workdir / f"points_{points}.ckpt"
            history = train(
                config, checkpoint, progress=False,
                log=lambda line, p=points: print(f"[{p}] {line}", flush=True),
            )  # fmt: skip
            model = export_model(checkpoint, workdir / f"points_{points}.pt")
            errors, _ = evaluate_model(model, snapshots(TEST))
            record = {
                "points": points,
                "epochs": len(history),
                "ldos_relative": [e.ldos_relative for e in errors],
                "total_meV_atom": [e.total_meV_atom for e in errors],
                "force_rmse": [e.force_rmse for e in errors],
            }
            result.write_text(json.dumps(record))
        rows.append(json.loads(result.read_text()))
    print("| LDOS points per snapshot | epochs | LDOS rel. error (test 4, 8) | "
          "A - A_QE (meV/atom) | force RMSE (eV/A) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        label = f"all {FULL_POINTS:,}" if row["points"] == 0 else f"{row['points']:,}"
        print(
            f"| {label} | {row['epochs']} | "
            + ", ".join(f"{100 * v:.1f} %" for v in row["ldos_relative"]) + " | "
            + ", ".join(f"{v:+.1f}" for v in row["total_meV_atom"]) + " | "
            + ", ".join(f"{v:.3f}" for v in row["force_rmse"]) + " |"
        )


if __name__ == "__main__":
    main()
