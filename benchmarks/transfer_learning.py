"""Fine-tuning against training from scratch (issue 17, item 5), on the data of an
active-learning run.

    python benchmarks/transfer_learning.py LEARN.toml [--iteration K] [--members M]
        [--scratch large all] [--outdir DIR]

The run's iteration K ensemble was fine-tuned (warm start from iteration K - 1) on its
initial small-cell snapshots plus the large-cell snapshots labelled before K. This trains
from scratch, with the run's base recipe, its seeds and its validation snapshots: on
those labelled large-cell snapshots alone, and on all of the iteration's data; then
prints the held-out errors of the three side by side with the training epochs (the run's
held-out references; nothing here is chosen by them) and, for ensembles, the Spearman
rank correlations of their uncertainty with the errors (energy over structures, force
over atoms). ``--members M`` compares the first M members of each (default: all of the
run's). Default K: the run's last iteration. Resumable: finished members are kept in
``--outdir``.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from mlsurrogate.evaluate import evaluate_references, load_references, rank_correlations
from mlsurrogate.export import export_model
from mlsurrogate.learn import LearnConfig, labelled_snapshots
from mlsurrogate.model import Model
from mlsurrogate.training import TrainingConfig, load_checkpoint, train


def scratch_ensemble(
    config: LearnConfig,
    snapshots: list[str],
    validation: list[str],
    directory: Path,
    members: int,
    **changes: Any,
) -> Path:
    """The run's recipe (with ``changes`` to its TrainingConfig fields) from random
    weights on ``snapshots``, one member per seed; resumable."""
    directory.mkdir(parents=True, exist_ok=True)
    model = directory / f"model_{members}.pt"  # the first ``members`` of the directory's
    if model.exists():
        return model
    base = TrainingConfig.from_toml(config.training_config)
    checkpoints = []
    for member in range(members):
        checkpoint = directory / f"member_{member}.ckpt"
        done = checkpoint.with_suffix(".done")
        settings = dataclasses.replace(
            base, train=snapshots, validation=validation, seed=base.seed + member, **changes
        )
        if not done.exists():
            train(settings, checkpoint, resume=checkpoint.exists(), progress=False)
            done.write_bytes(b"")
        checkpoints.append(checkpoint)
    return export_model(checkpoints, model)


def mean_epochs(checkpoints: list[Path]) -> float:
    """Epochs trained per member (the fine-tuned ones: of the fine-tuning only)."""
    return float(np.mean([len(load_checkpoint(c)["history"]) for c in checkpoints]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="the learn TOML of a finished (or advanced) run")
    parser.add_argument("--iteration", type=int, default=None)
    parser.add_argument("--members", type=int, default=None)
    parser.add_argument("--outdir", default="build/transfer_learning")
    parser.add_argument(
        "--scratch", nargs="+", choices=["large", "all"], default=["large", "all"],
        help="which from-scratch trainings: on the large cells only, on all data",
    )  # fmt: skip
    args = parser.parse_args()
    config = LearnConfig.from_toml(args.config)
    members = args.members or config.members

    def trained(k: int) -> list[Path]:
        directory = config.workdir / f"iteration_{k:02d}"
        done = [(directory / f"member_{m}.done").exists() for m in range(members)]
        return [directory / f"member_{m}.ckpt" for m in range(members)] if all(done) else []

    k = args.iteration
    if k is None:
        k = max((i for i in range(1, config.iterations + 1) if trained(i)), default=1)
    if k < 1:
        raise SystemExit("--iteration must be >= 1: iteration 0 is not fine-tuned")
    labelled = labelled_snapshots(config, k)
    if not labelled:
        raise SystemExit(f"{config.workdir}: no labelled snapshots before iteration {k}")
    validation = [*config.validation, *labelled_snapshots(config, k, "validation")]
    outdir = Path(args.outdir)
    # from scratch first: it needs only the labels, so it can run beside the learn run
    data = {
        "large": ("from scratch, large cells only", labelled),
        "all": ("from scratch, all data", [*config.train, *labelled]),
    }
    scratch = {
        name: scratch_ensemble(config, snapshots, validation, outdir / key, members)
        for key, (name, snapshots) in data.items()
        if key in args.scratch
    }
    finetuned = trained(k)
    if not finetuned:
        raise SystemExit(f"learn iteration {k} is not trained yet; run this again after it")
    models = {
        f"fine-tuned (learn iteration {k})": (
            export_model(finetuned, outdir / "finetuned.pt"),
            finetuned,
        ),
        **{
            name: (path, [path.parent / f"member_{m}.ckpt" for m in range(members)])
            for name, path in scratch.items()
        },
    }
    references = load_references(config.heldout)
    print(f"{len(labelled)} large-cell snapshots, {members} member(s) each; held-out: "
          f"{', '.join(config.heldout)}")  # fmt: skip
    print(
        "| model | epochs per member | held-out dA MAE (meV/atom) | max dA | F RMSE (eV/A) "
        "| rho E | rho F |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (path, checkpoints) in models.items():
        errors = evaluate_references(Model.load(path), references, threads=config.threads)
        energy = np.abs([1000 * e.energy_error for e in errors])
        force = np.sqrt(np.mean([e.force_rmse**2 for e in errors]))
        # calibration of the ensemble's uncertainty (Spearman, as in the learn report)
        rho = rank_correlations(errors) if members > 1 and len(errors) >= 3 else None
        calibration = f"{rho[0]:+.2f} | {rho[1]:+.2f}" if rho else "- | -"
        print(
            f"| {name} | {mean_epochs(checkpoints):.0f} | {energy.mean():.1f} | "
            f"{energy.max():.1f} | {force:.3f} | {calibration} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
