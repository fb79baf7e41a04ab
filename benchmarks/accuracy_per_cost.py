"""Accuracy per cost of the descriptor settings (issue 18, item 5).

    python benchmarks/accuracy_per_cost.py LEARN.toml [--iteration K] [--twojmax 4 6 8 10]
        [--rcutfac R ...] [--cells 4] [--points-per-cell 8] [--ranks 2] [--outdir DIR]

For every (twojmax, rcutfac) one network is trained from scratch with the same data and
the same budget: the base recipe of an active-learning run and the data of its iteration
K (its small-cell snapshots and the large-cell ones labelled before K; the run's
validation snapshots for early stopping), seed of the recipe; only the descriptors differ
(each setting's descriptors go into copies of the snapshots in ``--outdir``). Then, per
setting: the validation free-energy and force errors at the best epoch (what a choice may
use), the errors on the run's held-out references (reported, never used to choose), and
the cost of an MD step of ``4 cells^3`` atoms with the grid of ``points-per-cell`` points
per cubic cell edge in ``lmp`` on ``--ranks`` MPI ranks (as ``md_scaling.py``): seconds
per step, and the descriptor and force-contraction time per grid point from the pair
style's stage timing (µs of one rank per point, x ranks).

All networks train first (resumable: finished ones are kept in ``--outdir``), then the
timings run one after another, so that no training shares the cores with a timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np

from md_scaling import run_size
from mlsurrogate.data import add_descriptors, params_from_json
from mlsurrogate.descriptors import num_descriptors
from mlsurrogate.evaluate import evaluate_references, load_references
from mlsurrogate.hpo.trials import objective_of
from mlsurrogate.learn import LearnConfig, labelled_snapshots
from mlsurrogate.model import Model
from mlsurrogate.training import TrainingConfig, load_checkpoint
from transfer_learning import scratch_ensemble


def stage_per_point(timing: dict, stage: str, ranks: int) -> float:
    """µs of one rank per grid point (x ranks) that a stage of the MD step took."""
    share = timing["split"].get(stage, np.nan) / 100
    return 1e6 * timing["step_s"] * ranks * share / timing["grid"] ** 3


def with_descriptors(path: str, params: dict, base: TrainingConfig, copy: Path) -> str:
    """``path`` itself for the recipe's descriptors; else a copy of the snapshot with
    descriptors of ``params`` (made once)."""
    if params == base.descriptor_params:
        return path
    if not copy.exists():
        copy.parent.mkdir(parents=True, exist_ok=True)
        add_descriptors(path, params_from_json(json.dumps(params)), output=copy, progress=False)
    return str(copy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="the learn TOML of a run (its data and base recipe)")
    parser.add_argument("--iteration", type=int, default=None, help="default: the last one")
    parser.add_argument("--twojmax", type=int, nargs="+", default=[4, 6, 8, 10])
    parser.add_argument("--rcutfac", type=float, nargs="+", default=None,
                        help="default: the recipe's")  # fmt: skip
    parser.add_argument("--cells", type=int, default=4, help="MD cell: 4 cells^3 atoms")
    parser.add_argument("--points-per-cell", type=int, default=8)
    parser.add_argument(
        "--steps", type=int, default=6, help="MD steps timed (the first include the warm-up)"
    )
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--outdir", default="build/accuracy_per_cost")
    args = parser.parse_args()
    config = LearnConfig.from_toml(args.config)
    k = config.iterations if args.iteration is None else args.iteration
    train = [*config.train, *labelled_snapshots(config, k)]
    validation = [*config.validation, *labelled_snapshots(config, k, "validation")]
    base = TrainingConfig.from_toml(config.training_config)
    rcutfacs = args.rcutfac or [base.descriptor_params["rcutfac"]]
    settings = [
        base.descriptor_params | {"twojmax": twojmax, "rcutfac": rcutfac}
        for twojmax, rcutfac in itertools.product(args.twojmax, rcutfacs)
    ]
    print(f"data: {len(train)} training and {len(validation)} validation snapshots "
          f"(learn iteration {k}); held-out: {', '.join(config.heldout)}", flush=True)  # fmt: skip
    models = {}
    for params in settings:
        name = f"twojmax{params['twojmax']}_rcutfac{params['rcutfac']:g}"
        directory = Path(args.outdir) / name
        print(f"training {name}", flush=True)
        data = {
            path: with_descriptors(path, params, base, directory / "data" / f"{i:02d}.h5")
            for i, path in enumerate([*train, *validation])
        }
        models[name] = (
            params,
            scratch_ensemble(
                config,
                [data[p] for p in train],
                [data[p] for p in validation],
                directory,
                1,
                descriptor_params=params,
            ),  # fmt: skip
        )
    references = load_references(config.heldout)
    atoms = 4 * args.cells**3
    print(
        f"| twojmax | rcutfac (A) | components | descriptors µs/point | contraction µs/point "
        f"| MD s/step ({atoms} atoms) | validation abs dA (meV/atom) | validation F RMSE (eV/A) "
        f"| held-out dA MAE (meV/atom) | held-out F RMSE (eV/A) | epochs |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for params, path in models.values():
        history = load_checkpoint(path.parent / "member_0.ckpt")["history"]
        recipe = dataclasses.replace(base, descriptor_params=params)
        errors = evaluate_references(Model.load(path), references, threads=config.threads)
        energy = np.abs([1000 * e.energy_error for e in errors])
        force = np.sqrt(np.mean([e.force_rmse**2 for e in errors]))
        timing = run_size(path.resolve(), args.cells, args.points_per_cell, args.steps, args.ranks)
        print(
            f"| {params['twojmax']} | {params['rcutfac']:g} | "
            f"{num_descriptors(recipe.params())} | "
            f"{stage_per_point(timing, 'descriptors', args.ranks):.0f} | "
            f"{stage_per_point(timing, 'force contraction', args.ranks):.0f} | "
            f"{timing['step_s']:.2f} | "
            f"{objective_of(history, recipe, 'total_meV_atom'):.1f} | "
            f"{objective_of(history, recipe, 'force_rmse'):.3f} | {energy.mean():.1f} | "
            f"{force:.3f} | {len(history)} |",
            flush=True,
        )
    print(f"MD: {args.points_per_cell} grid points per cubic cell edge, {args.ranks} MPI ranks")


if __name__ == "__main__":
    main()
