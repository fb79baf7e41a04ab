"""NASWOT: architectures scored at initialisation from one mini-batch, without training.

Mellor et al., ICML 2021 (the Jacobian-covariance score of their first version), as
adapted to LDOS networks by Fiedler et al., Mach. Learn.: Sci. Technol. 3, 045008 (2022),
Eqs. 5-6: for each sample x_i of a mini-batch the Jacobian J_i = d(sum_e f_e(x_i))/dx_i of
the network at its initial weights; the correlation matrix C of the J_i over the batch;
with sigma_i the eigenvalues of C and k = 1e-4,

    S = -sum_i [ log(sigma_i + k) + 1 / (sigma_i + k) ]        (higher is better).

Networks whose Jacobians are less correlated across inputs tell the inputs apart better
at initialisation. The score of an architecture is S' = mean + standard deviation of S
over several random initialisations (Fiedler et al.). The batch is scaled as a trained
network's input is (feature mean and standard deviation of the batch itself).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mlsurrogate.hpo.trials import naswot_inputs, run_trial
from mlsurrogate.model import LdosNetwork

if TYPE_CHECKING:
    from mlsurrogate.hpo.trials import HpoConfig

NASWOT_K = 1e-4


@dataclass(frozen=True)
class Architecture:
    """The network part of a training config: hidden widths and activation."""

    hidden: tuple[int, ...]
    activation: str

    def label(self) -> str:
        return f"{'x'.join(str(h) for h in self.hidden)} {self.activation}"


def jacobian_rows(network: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Per sample the gradient of the sum of the outputs with respect to the input."""
    inputs = batch.detach().clone().requires_grad_(True)
    network(inputs).sum().backward()
    return inputs.grad.detach()


def score_from_jacobians(jacobians: torch.Tensor, k: float = NASWOT_K) -> float:
    """S of Eq. 6 from the (samples, features) Jacobian rows."""
    rows = jacobians.double()
    centred = rows - rows.mean(dim=1, keepdim=True)
    norms = centred.norm(dim=1, keepdim=True)
    if torch.any(norms == 0):
        raise ValueError(
            "a sample's Jacobian is constant over the inputs (a dead network at this "
            "initialisation): its correlation is undefined"
        )
    unit = centred / norms
    correlation = unit @ unit.T
    eigenvalues = torch.linalg.eigvalsh(correlation)
    return float(-torch.sum(torch.log(eigenvalues + k) + 1.0 / (eigenvalues + k)))


def naswot_score(
    architecture: Architecture,
    batch: np.ndarray,
    num_energies: int,
    initialisations: int = 5,
    seed: int = 0,
) -> tuple[float, float]:
    """(mean, standard deviation) of S over ``initialisations`` random initial weights;
    S' = mean + std is what ranks architectures."""
    if initialisations < 1:
        raise ValueError(f"initialisations must be >= 1, got {initialisations}")
    if len(batch) < 2:
        raise ValueError(f"NASWOT needs a mini-batch of at least 2 samples, got {len(batch)}")
    features = torch.as_tensor(batch, dtype=torch.float32)
    mean, std = features.mean(0), features.std(0)
    std[std < 1e-12 * torch.clamp(mean.abs(), min=1.0)] = 1.0
    scores = []
    for index in range(initialisations):
        torch.manual_seed(seed + index)
        network = LdosNetwork(
            features.shape[1], num_energies, architecture.hidden, architecture.activation
        )
        network.feature_mean.copy_(mean)
        network.feature_scale.copy_(std)
        scores.append(score_from_jacobians(jacobian_rows(network, features)))
    spread = float(np.std(scores)) if len(scores) > 1 else 0.0
    return float(np.mean(scores)), spread


def combined(score: tuple[float, float]) -> float:
    """S' = mean + standard deviation (Fiedler et al.)."""
    return score[0] + score[1] if math.isfinite(score[0]) else -math.inf


def architectures(
    depths: Sequence[int], widths: Sequence[int], activations: Sequence[str]
) -> list[Architecture]:
    """Every (depth, width, activation): depth hidden layers of the same width."""
    return [
        Architecture(tuple([width] * depth), activation)
        for depth in depths
        for width in widths
        for activation in activations
    ]


@dataclass(frozen=True)
class NaswotRow:
    """An architecture's score and, when trained, its search objective."""

    architecture: Architecture
    mean: float
    std: float
    seconds: float  # to score it (all initialisations)
    objective: float | None = None
    train_seconds: float | None = None

    @property
    def score(self) -> float:
        return combined((self.mean, self.std))


def architectures_of(config: HpoConfig) -> list[Architecture]:
    """The architectures of a search's [space]: its ``layers``, ``width`` and
    ``activation`` levels (the base recipe's where the space has none)."""
    base = config.base

    def listed(name: str, default: Any) -> list[Any]:
        levels = config.space.get(name, [default])
        if not isinstance(levels, list):
            raise ValueError(f"[space] {name}: NASWOT needs a list of levels, not a range")
        return levels

    if "width" not in config.space and len(set(base.hidden)) > 1 and "layers" in config.space:
        raise ValueError("[space] layers without width needs a base recipe of equal widths")
    return architectures(
        listed("layers", len(base.hidden)), listed("width", base.hidden[0]),
        listed("activation", base.activation),
    )  # fmt: skip


def naswot_scan(config: HpoConfig, train: bool = False, log: Any = print) -> list[NaswotRow]:
    """Score every architecture of the search; with ``train`` also train each one
    (``trials.run_trial``: finished trainings are read back)."""
    batch, energies = naswot_inputs(config)
    rows = []
    for architecture in architectures_of(config):
        start = time.perf_counter()
        mean, std = naswot_score(
            architecture, batch, energies, config.naswot_initialisations, config.seed
        )
        row = NaswotRow(architecture, mean, std, time.perf_counter() - start)
        if train:
            start = time.perf_counter()
            values = {
                "layers": len(architecture.hidden),
                "width": architecture.hidden[0],
                "activation": architecture.activation,
            }
            objective = run_trial(config, values)
            row = dataclasses.replace(
                row, objective=objective, train_seconds=time.perf_counter() - start
            )
        trained = "" if row.objective is None else f", {config.objective} {row.objective:.4g}"
        log(f"{architecture.label()}: S' {row.score:.4g}{trained}")
        rows.append(row)
    return rows


def kendall_tau(rows: Sequence[NaswotRow]) -> float:
    """Kendall's tau between S' and the trained objective (NaN without trainings)."""
    from scipy.stats import kendalltau

    trained = [r for r in rows if r.objective is not None and math.isfinite(r.objective)]
    if len(trained) < 2:
        return math.nan
    return float(kendalltau([r.score for r in trained], [r.objective for r in trained]).statistic)


def format_naswot(rows: Sequence[NaswotRow], objective: str) -> str:
    """Markdown table, best score first; with trainings, Kendall's tau below it."""
    trained = any(r.objective is not None for r in rows)
    head = "| architecture | S mean | S std | S' | score s |"
    rule = "|---|---:|---:|---:|---:|"
    if trained:
        head += f" {objective} | train s |"
        rule += "---:|---:|"
    lines = [head, rule]
    for r in sorted(rows, key=lambda r: -r.score):
        line = (
            f"| {r.architecture.label()} | {r.mean:.5g} | {r.std:.3g} | {r.score:.5g} "
            f"| {r.seconds:.2f} |"
        )
        if trained:
            line += f" {r.objective:.4g} | {r.train_seconds:.1f} |"
        lines.append(line)
    if trained:
        lines.append(f"\nKendall tau (S', {objective}) = {kendall_tau(rows):+.3f} over "
                     f"{sum(r.objective is not None for r in rows)} architectures")  # fmt: skip
    return "\n".join(lines)
