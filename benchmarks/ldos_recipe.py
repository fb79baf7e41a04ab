"""Which descriptors and network let the LDOS carry over to the validation cells of a learn
run: LDOS-only networks per recipe change, judged on the run's validation snapshots.

    python benchmarks/ldos_recipe.py LEARN.toml [--iteration K] [--steps 20000]
        [--seeds 0 1] [--threads 1] [--setting rcutfac=6.0 --setting "hidden=[200, 200]" ...]

The data of the run's iteration K (as ``accuracy_per_cost.py``): its small-cell snapshots
and the labels before K train, its validation snapshots test. Every stored LDOS point of
the training snapshots trains a network of the recipe's architecture on the LDOS loss
alone (``ldos_learning_curve.fit``: a tenth of the points held back for the stopping
point), once per seed, for the recipe itself and for each ``--setting``: its ``key=value``
pairs (separated by ``;``) change the recipe's descriptor keywords (``rcutfac``,
``twojmax``, ...) or its TrainingConfig fields (``hidden``, ``activation``,
``learning_rate``, ``batch_size``). Printed per setting: the LDOS relative error
||pred - QE|| / ||QE|| on each validation snapshot's stored points (mean over seeds, and
the spread), and the same on the training points.

No energy, force or stress term trains here, so each network takes a minute or two; the
table says whether a descriptor change is worth a full training (``accuracy_per_cost.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from ldos_learning_curve import fit, relative_error
from mlsurrogate.data import Snapshot
from mlsurrogate.descriptors import BispectrumParams, compute_grid_descriptors
from mlsurrogate.learn import LearnConfig, labelled_snapshots
from mlsurrogate.training import TrainingConfig
from warm_start_recipe import override


def setting(text: str) -> dict[str, object]:
    """``key=value[;key=value]``."""
    return dict(override(part) for part in text.split(";"))


def changed(recipe: TrainingConfig, changes: dict[str, object]) -> TrainingConfig:
    """The recipe with ``changes``: TrainingConfig fields, the rest descriptor keywords."""
    fields = {f.name for f in dataclasses.fields(recipe)}
    own = {key: value for key, value in changes.items() if key in fields}
    descriptor = {key: value for key, value in changes.items() if key not in fields}
    return dataclasses.replace(
        recipe, **own, descriptor_params=recipe.descriptor_params | descriptor
    )


def stored_points(
    path: str, params: BispectrumParams, threads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(descriptors, LDOS) at the snapshot's stored LDOS points (every point of a full one),
    descriptors of ``params`` computed from the atoms."""
    with Snapshot(path) as snapshot:
        grid = compute_grid_descriptors(
            snapshot.atoms, snapshot.grid_shape, params, threads=threads
        )
        descriptors = grid.reshape(-1, grid.shape[-1])
        if snapshot.ldos_points is not None:
            descriptors = descriptors[snapshot.ldos_points]
        ldos = np.asarray(snapshot.ldos[()]).reshape(len(descriptors), -1)
    return (
        torch.as_tensor(descriptors, dtype=torch.float64),
        torch.as_tensor(ldos, dtype=torch.float64),
    )


def kind(path: str) -> str:
    """Atoms and volume per atom of a snapshot, for the table."""
    with Snapshot(path) as snapshot:
        atoms = snapshot.atoms
    return f"{len(atoms)} atoms, {atoms.get_volume() / len(atoms):.1f} A^3/atom"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="the learn TOML of a run (its data and base recipe)")
    parser.add_argument("--iteration", type=int, default=None, help="default: the last one")
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--setting", type=setting, action="append", default=[])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = LearnConfig.from_toml(args.config)
    k = config.iterations if args.iteration is None else args.iteration
    train = [*config.train, *labelled_snapshots(config, k)]
    validation = [*config.validation, *labelled_snapshots(config, k, "validation")]
    recipe = TrainingConfig.from_toml(config.training_config)
    print(f"data: {len(train)} training and {len(validation)} validation snapshots "
          f"(learn iteration {k}); {args.steps} steps per network")  # fmt: skip
    for path in validation:
        print(f"  validation {path}: {kind(path)}")
    header = " | ".join(f"val. {i}" for i in range(len(validation)))
    print(f"| setting | {header} | training points | s |")
    print("|---|" + "---:|" * (len(validation) + 2))
    for changes in [{}, *args.setting]:
        start = time.time()
        variant = changed(recipe, changes)
        variant.validate(require_data=False)
        params = variant.params()
        x, y = (
            torch.cat(parts)
            for parts in zip(*(stored_points(p, params, args.threads) for p in train))
        )
        tests = [stored_points(p, params, args.threads) for p in validation]
        errors = []  # [seed][validation snapshots + training]
        for seed in args.seeds:
            network = fit(variant, x, y, args.steps, seed)
            with torch.no_grad():
                errors.append([relative_error(network(xv), yv) for xv, yv in [*tests, (x, y)]])
        mean, spread = 100 * np.mean(errors, 0), 100 * np.ptp(errors, 0)
        cells = " | ".join(f"{m:.1f} ± {s / 2:.1f} %" for m, s in zip(mean, spread))
        name = "; ".join(f"{key}={value}" for key, value in changes.items()) or "the recipe"
        print(f"| {name} | {cells} | "
              f"{time.time() - start:.0f} |", flush=True)  # fmt: skip
    print(f"mean over seeds {args.seeds} ± half their range")


if __name__ == "__main__":
    main()
