"""How many LDOS points of one cell a network needs: the learning curve of the LDOS alone,
within one full snapshot.

    python benchmarks/ldos_learning_curve.py SNAPSHOT [--points 1600 6400 25600]
        [--test 10000] [--steps 20000] [--config data/al_melt/train.toml] [--threads 1]
        [--descriptor rcutfac=6.0 ...]

The snapshot's grid points are split at random (seed 0) into --test test points and a
pool. For each count N, N pool points train a network of the config's architecture on
the config's descriptors (the LDOS loss only; Adam at the config's learning rate and
batch size) for --steps optimizer steps. A tenth of the N points is held back to choose
the stopping point (the epoch with the lowest loss on them); the test error is the
network's at that epoch: the LDOS relative error ||pred - QE|| / ||QE|| over the test
points. ``--descriptor`` changes the config's descriptor keywords (the descriptors are
then computed from the atoms). Beside it, two model-free references: the nearest
training point in the scaled descriptors (what the descriptors tell apart at that N)
and the training mean LDOS.

If the test error keeps falling with N, a compact label (``ldos_points``) holds too few
points for that kind of cell; if it stalls, the descriptors are the limit.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from mlsurrogate.data import Snapshot
from mlsurrogate.descriptors import compute_grid_descriptors, snapshot_descriptors
from mlsurrogate.training import TrainingConfig
from mlsurrogate.training.checkpoint import network_for
from warm_start_recipe import override  # the benchmarks' key=value parser (one copy)

ROOT = Path(__file__).resolve().parents[1]


def relative_error(prediction: torch.Tensor, reference: torch.Tensor) -> float:
    return float(torch.linalg.norm(prediction - reference) / torch.linalg.norm(reference))


def fit(
    config: TrainingConfig, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int
) -> torch.nn.Module:
    """A network trained on (x, y) with a tenth held back for the stopping point."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=generator)
    held = order[: max(len(x) // 10, 1)]
    train = order[len(held) :]
    torch.manual_seed(seed)
    network = network_for(config, x.shape[1], y.shape[1]).double()
    network.feature_mean.copy_(x[train].mean(0))
    network.feature_scale.copy_(x[train].std(0).clamp_min(1e-12))
    network.ldos_scale.fill_(float(y[train].abs().max()))
    optimizer = torch.optim.Adam(network.parameters(), lr=config.learning_rate)
    best, best_state, step = float("inf"), None, 0
    while step < steps:
        for batch in torch.randperm(len(train), generator=generator).split(config.batch_size):
            rows = train[batch]
            loss = ((network.scaled(x[rows]) - y[rows] / network.ldos_scale) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
        with torch.no_grad():
            held_loss = relative_error(network(x[held]), y[held])
        if held_loss < best:
            best = held_loss
            best_state = {k: v.clone() for k, v in network.state_dict().items()}
    network.load_state_dict(best_state)
    return network


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("snapshot", help="a full snapshot (the LDOS at every grid point)")
    parser.add_argument("--points", type=int, nargs="+", default=[1600, 6400, 25600])
    parser.add_argument("--test", type=int, default=10000)
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--config", default=str(ROOT / "data" / "al_melt" / "train.toml"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--descriptor", type=override, action="append", default=[])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = TrainingConfig.from_toml(args.config)
    params = dataclasses.replace(config.params(), **dict(args.descriptor))
    with Snapshot(args.snapshot) as snapshot:
        if snapshot.ldos_points is not None:
            parser.error(f"{args.snapshot} is compact: the learning curve needs a full one")
        descriptors = (
            compute_grid_descriptors(snapshot.atoms, snapshot.grid_shape, params)
            if args.descriptor
            else snapshot_descriptors(snapshot, params)[()]
        )
        ldos = snapshot.ldos[()]
    x = torch.as_tensor(descriptors, dtype=torch.float64).reshape(-1, descriptors.shape[-1])
    y = torch.as_tensor(ldos, dtype=torch.float64).reshape(-1, ldos.shape[-1])
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    test, pool = order[: args.test], order[args.test :]
    if max(args.points) > len(pool):
        parser.error(f"--points: at most {len(pool)} points are left beside the test set")
    print(f"{args.snapshot}: {len(x)} grid points, {x.shape[1]} descriptors "
          f"(rcutfac {params.rcutfac}, twojmax {params.twojmax}), {y.shape[1]} energies; "
          f"test on {len(test)}; {args.steps} steps per network")  # fmt: skip
    print("| training points | test LDOS rel. error | nearest neighbour | mean LDOS | s |")
    print("|---:|---:|---:|---:|---:|")
    for count in args.points:
        start = time.time()
        chosen = pool[:count]
        network = fit(config, x[chosen], y[chosen], args.steps, seed=config.seed)
        with torch.no_grad():
            network_error = relative_error(network(x[test]), y[test])
            scaled = x[chosen] / network.feature_scale
            nearest_rows = torch.cat([
                torch.cdist(rows / network.feature_scale, scaled).argmin(1)
                for rows in x[test].split(1000)  # 1000 x N distances at a time
            ])  # fmt: skip
            nearest = relative_error(y[chosen][nearest_rows], y[test])
            mean = relative_error(y[chosen].mean(0).expand_as(y[test]), y[test])
        print(f"| {count} | {100 * network_error:.1f} % | {100 * nearest:.1f} % | "
              f"{100 * mean:.1f} % | {time.time() - start:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
