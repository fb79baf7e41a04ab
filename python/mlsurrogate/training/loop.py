"""The training loop: LDOS loss (plus the optional physics terms), validation, early
stopping and a checkpoint after every epoch.

The checkpoint holds the model, optimizer, scheduler and torch RNG state, so a resumed
run continues with exactly the losses of an uninterrupted one.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlsurrogate.descriptors import num_descriptors
from mlsurrogate.evaluate import functional_for
from mlsurrogate.files import check_output_path
from mlsurrogate.model import LdosNetwork
from mlsurrogate.training.checkpoint import (
    dft_settings,
    load_checkpoint,
    network_for,
    save_checkpoint,
)
from mlsurrogate.training.config import TrainingConfig
from mlsurrogate.training.dataset import (
    SnapshotSource,
    balanced_fractions,
    batches,
    check_consistent,
    density_weights,
    fit_scalers,
    snapshot_elements,
)
from mlsurrogate.training.physics_terms import (
    ENERGY_ERROR_KEYS,
    CoarseGridTarget,
    SnapshotReference,
    coarse_grid_target,
    energy_errors,
    jacobian_bytes,
    physics_loss,
    snapshot_reference,
)

# keys that change how fast and in how much memory a run trains, not what it computes:
# a run may resume with other values (more threads, another dB/dR budget)
SPEED_AND_MEMORY_KEYS = frozenset({"threads", "physics_jacobian_gb"})


def point_loss(
    network: LdosNetwork,
    x: torch.Tensor,
    y: torch.Tensor,
    density_rows: torch.Tensor | None,
    density_weight: float,
) -> torch.Tensor:
    """Mean squared LDOS error (in units of the output scale), plus ``density_weight``
    times the mean squared relative density error when ``density_rows`` (each point's
    ``density_weights``) are given."""
    error = network.scaled(x) - y / network.ldos_scale
    loss = (error**2).mean()
    if density_rows is not None:
        density_error = (error * density_rows).sum(1) * network.ldos_scale
        loss = loss + density_weight * (density_error**2).mean()
    return loss


def _loss_over(
    network: LdosNetwork,
    sources: Sequence[SnapshotSource],
    density_table: torch.Tensor | None,
    density_weight: float,
    device: str,
) -> float:
    """``point_loss`` over all points of the sources (each weighted by its points)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for index, source in enumerate(sources):
            x, y = source.all_points()
            rows = None if density_table is None else density_table[index].expand(len(x), -1)
            loss = point_loss(
                network,
                torch.as_tensor(x, device=device),
                torch.as_tensor(y, device=device),
                rows,
                density_weight,
            )
            total += float(loss) * len(x)
            count += len(x)
    return total / count


def non_finite_loss(
    config: TrainingConfig,
    sources: Sequence[SnapshotSource],
    owner: np.ndarray,
    epoch: int,
    step: int,
) -> str:
    """The error text for a NaN/inf loss: where it happened and what to try."""
    files = [sources[index].path for index in np.unique(owner)]
    return (
        f"the training loss became NaN or inf (epoch {epoch}, mini-batch {step}, points of "
        f"{files}, dataset ldos/descriptors); the data are finite, so lower learning_rate "
        f"(now {config.learning_rate:g}, section [training]) or the physics weights"
    )


def warm_start(network: LdosNetwork, config: TrainingConfig, energies: np.ndarray) -> None:
    """Load the best network of ``config.initial_checkpoint`` into ``network``
    (fine-tuning): its weights and its scalers (the weights were fitted to those), after
    checking that the architecture, descriptors and energy grid are the same."""
    path = config.initial_checkpoint
    state = load_checkpoint(path)
    for key in ("hidden", "activation", "descriptor_params"):
        if state["config"][key] != getattr(config, key):
            raise ValueError(
                f"{path}: initial_checkpoint was trained with {key} = {state['config'][key]!r}, "
                f"this config has {getattr(config, key)!r}; they must match to fine-tune"
            )
    if not np.array_equal(np.asarray(state["energies"]), np.asarray(energies)):
        raise ValueError(f"{path}: initial_checkpoint has another energy grid than the data")
    if state["num_features"] != network.feature_mean.numel():
        raise ValueError(
            f"{path}: initial_checkpoint has {state['num_features']} descriptors per point, "
            f"the data {network.feature_mean.numel()} (other elements?)"
        )
    network.load_state_dict(state["best_network"] or state["network"])


def train(
    config: TrainingConfig,
    checkpoint: str | os.PathLike[str],
    *,
    resume: bool = False,
    stop_after_epoch: int | None = None,
    progress: bool = True,
    log: Any = print,
    physics_cache: dict[tuple, CoarseGridTarget] | None = None,
) -> list[dict[str, float]]:
    """Train (or resume) and write ``checkpoint`` after every epoch; return the history.

    ``stop_after_epoch`` ends the run after that epoch (to test resuming).
    ``physics_cache``: a dict that keeps the energy/force terms' coarse-grid targets
    (descriptors, stored dB/dR) for the next training on the same snapshots, such as the
    next member of an ensemble; their set-up is most of a short training's time.
    """
    from tqdm import tqdm

    config.validate()
    checkpoint = check_output_path(checkpoint)
    if config.threads:
        torch.set_num_threads(config.threads)
    params = config.params()
    train_sources = [SnapshotSource(p, params) for p in config.train]
    validation_sources = [SnapshotSource(p, params) for p in config.validation]
    check_consistent(train_sources + validation_sources, params)
    energies = train_sources[0].snapshot.energies
    elements = params.elements or snapshot_elements(train_sources[0].snapshot)
    num_features = num_descriptors(params, len(elements))
    if resume:  # before any long set-up work
        state = load_checkpoint(checkpoint)
        # keys added since the checkpoint was written take their defaults
        written = asdict(TrainingConfig(**state["config"]))
        changed = sorted(
            key
            for key, value in asdict(config).items()
            if written[key] != value and key not in SPEED_AND_MEMORY_KEYS
        )
        if changed:
            raise ValueError(
                f"{checkpoint}: written with a different config ({', '.join(changed)}); "
                "cannot resume: restore those keys or train into a new checkpoint"
            )
    functional = functional_for(validation_sources[0].snapshot)
    targets = [snapshot_reference(s) for s in validation_sources]

    def density_table(sources: list[SnapshotSource]) -> torch.Tensor | None:
        if config.density_weight == 0:
            return None
        rows = np.stack([density_weights(s, functional) for s in sources])
        return torch.as_tensor(rows, dtype=torch.float32, device=config.device)

    train_density, validation_density = (
        density_table(train_sources),
        density_table(validation_sources),
    )
    physics_train: list[CoarseGridTarget] = []
    physics_validation: list[CoarseGridTarget] = []
    if config.uses_physics:
        with_stress = config.stress_weight > 0
        sources = [*train_sources, *validation_sources]
        # stored dB/dR, in the given order, while the budget lasts; the adjoint beyond
        sizes = [
            jacobian_bytes(s.snapshot.atoms, config.physics_spacing, num_features, with_stress)
            for s in sources
        ]
        stored = list(np.cumsum(sizes) <= config.physics_jacobian_gb * 1e9)
        log(
            f"energy/force terms: dB/dR stored for {sum(stored)} of {len(sources)} snapshots "
            f"({sum(n for n, keep in zip(sizes, stored) if keep) / 1e9:.2f} GB; "
            f"physics_jacobian_gb = {config.physics_jacobian_gb:g}), the adjoint for the rest"
        )
        def coarse_target(
            source: SnapshotSource, reference: SnapshotReference, keep: bool
        ) -> CoarseGridTarget:
            key = (
                str(Path(source.path).resolve()), params, config.physics_spacing,
                config.device, with_stress, keep,
            )  # fmt: skip
            found = None if physics_cache is None else physics_cache.get(key)
            if found is None:
                found = coarse_grid_target(
                    source, reference, params, config.physics_spacing, config.device,
                    with_stress=with_stress, store_jacobian=keep,
                )  # fmt: skip
                if physics_cache is not None:
                    physics_cache[key] = found
            return found

        coarse = [
            coarse_target(source, reference, keep)
            for source, reference, keep in zip(
                tqdm(sources, desc="coarse grids", disable=not progress, leave=False),
                [*(snapshot_reference(s) for s in train_sources), *targets],
                stored,
            )
        ]
        n_train = len(train_sources)
        physics_train, physics_validation = coarse[:n_train], coarse[n_train:]

    torch.manual_seed(config.seed)  # the initial weights; a resumed run loads its own
    network = network_for(config, num_features, len(energies))
    if resume:
        network.load_state_dict(state["network"])
    elif config.initial_checkpoint:
        warm_start(network, config, energies)
    else:
        fit_scalers(network, train_sources)
    linear_layers = [layer for layer in network.layers if isinstance(layer, torch.nn.Linear)]
    for layer in linear_layers[: config.frozen_layers]:
        layer.requires_grad_(False)
    network.to(config.device)
    # the averaged copy (Polyak averaging) smooths the step-to-step noise of SGD, which
    # moves the integrated energies by several meV/atom between epochs
    averaged = (
        torch.optim.swa_utils.AveragedModel(
            network,
            multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(config.weight_averaging),
        )
        if config.weight_averaging > 0
        else None
    )
    evaluated = averaged.module if averaged is not None else network
    trainable = [parameter for parameter in network.parameters() if parameter.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=config.learning_rate)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=config.lr_factor, patience=config.lr_patience
    )
    history: list[dict[str, float]] = []
    best_loss, best_state, stale, start_epoch = math.inf, None, 0, 0
    if resume:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if averaged is not None:
            averaged.load_state_dict(state["averaged"])
        torch.set_rng_state(state["torch_rng"])
        history = state["history"]
        best_loss, best_state, stale = state["best_loss"], state["best_network"], state["stale"]
        start_epoch = state["epoch"] + 1

    fractions = balanced_fractions(train_sources) if config.balance_point_density else None
    kept = np.ones(len(train_sources)) if fractions is None else fractions
    total_points = int(sum(s.num_points * f for s, f in zip(train_sources, kept)))
    for epoch in range(start_epoch, config.max_epochs):
        physics = bool(physics_train) and epoch >= config.physics_start_epoch
        if physics and epoch == config.physics_start_epoch:
            for group in optimizer.param_groups:
                # from the configured rate, not from what plateaus of the LDOS phase left
                # (which can be ~0 when validation snapshots unlike the training ones stall)
                group["lr"] = config.learning_rate * config.physics_lr_factor
            # a new objective from here: forget the best value and plateau of the old one
            best_loss, stale = math.inf, 0
            scheduler.best, scheduler.num_bad_epochs = scheduler.mode_worse, 0
        network.train()
        running, seen = 0.0, 0
        with tqdm(
            total=total_points, desc=f"epoch {epoch}", unit="pt", disable=not progress, leave=False
        ) as bar:
            for step, (x, y, owner) in enumerate(
                batches(
                    train_sources,
                    config.batch_size,
                    config.buffer_planes,
                    config.seed,
                    epoch,
                    fractions,
                )
            ):
                loss = point_loss(
                    network,
                    torch.as_tensor(x, device=config.device),
                    torch.as_tensor(y, device=config.device),
                    None if train_density is None else train_density[torch.as_tensor(owner)],
                    config.density_weight,
                )
                if not math.isfinite(loss.item()):
                    raise ValueError(non_finite_loss(config, train_sources, owner, epoch, step))
                running += loss.item() * len(x)
                if physics and (step + 1) % config.physics_every == 0:
                    turn = (step + 1) // config.physics_every - 1
                    term = physics_loss(
                        network, functional, physics_train[turn % len(physics_train)], config
                    )
                    if term is not None:
                        loss = loss + term[0]
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if averaged is not None:
                    averaged.update_parameters(network)
                seen += len(x)
                bar.update(len(x))
        network.eval()
        evaluated.eval()
        validation_loss = _loss_over(
            evaluated, validation_sources, validation_density, config.density_weight, config.device
        )
        errors = [
            energy_errors(evaluated, functional, s, t, config.device)
            for s, t in zip(validation_sources, targets)
        ]
        objective, force_rmse, stress_rmse = validation_loss, math.nan, math.nan
        if physics:
            checks = [physics_loss(evaluated, functional, t, config) for t in physics_validation]
            if any(c is None for c in checks):  # unphysical LDOS: no energy, no forces
                objective = math.inf
            else:
                found = [c[1] for c in checks]
                energy_mse = float(np.mean([e.energy_sq for e in found]))
                force_mse = float(np.mean([e.force_mse for e in found]))
                stress_mse = float(np.mean([e.stress_mse for e in found]))
                hartree_mse = float(np.mean([e.hartree_sq for e in found]))
                objective += (
                    config.energy_weight * energy_mse
                    + config.force_weight * force_mse
                    + config.stress_weight * stress_mse
                    + config.hartree_weight * hartree_mse
                )
                force_rmse = math.sqrt(force_mse)
                if config.stress_weight > 0:
                    stress_rmse = math.sqrt(np.mean([e.stress_mse_gpa for e in found]))
        record = {
            "epoch": epoch,
            "train_loss": running / seen,
            "validation_loss": validation_loss,
            "validation_objective": objective,
            "force_rmse": force_rmse,
            "stress_rmse_GPa": stress_rmse,
            "learning_rate": optimizer.param_groups[0]["lr"],
            **{
                key: float(np.mean([abs(e[key]) for e in errors])) for key in ENERGY_ERROR_KEYS
            },
        }
        history.append(record)
        log(
            f"epoch {epoch:4d}  train {record['train_loss']:.3e}  validation "
            f"{validation_loss:.3e}  |dE_band| {record['band_meV_atom']:.2f}  |dE_H| "
            f"{record['hartree_meV_atom']:.2f}  |dA| "
            f"{record['total_meV_atom']:.2f} meV/atom  |dE_F| {record['fermi_meV']:.1f} meV  "
            f"lr {record['learning_rate']:.1e}"
            + (f"  F RMSE {force_rmse:.3f} eV/A" if physics else "")
            + (f"  stress RMSE {stress_rmse:.2f} GPa" if physics and config.stress_weight else "")
        )
        scheduler.step(objective)
        if objective < best_loss:
            best_loss, stale = objective, 0
            best_state = {k: v.detach().cpu().clone() for k, v in evaluated.state_dict().items()}
        else:
            stale += 1
        save_checkpoint(
            checkpoint,
            {
                "config": asdict(config),
                "epoch": epoch,
                "network": {k: v.detach().cpu() for k, v in network.state_dict().items()},
                "averaged": averaged.state_dict() if averaged is not None else None,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "history": history,
                "best_loss": best_loss,
                "best_network": best_state,
                "stale": stale,
                "num_features": num_features,
                "energies": energies,
                "elements": list(elements),
                "snapshot_attrs": dft_settings(validation_sources[0].snapshot),
            },
        )
        waiting = bool(physics_train) and epoch < config.physics_start_epoch
        if stale >= config.patience and not waiting:
            log(f"early stop: no validation improvement for {config.patience} epochs")
            break
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            break
    return history
