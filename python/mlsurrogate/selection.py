"""Choosing the next DFT snapshots: where a model is uncertain and what its training data
do not cover, in batches without near-duplicates.

* Trust levels (dpgen's convention): a structure is ``accurate`` below the lower trust
  level of the ensemble's max force deviation, ``failed`` above the upper one (too far
  off for the model to be guided by it), a ``candidate`` in between.
* Descriptor-space dissimilarity to the training set (Sandia ML-DFT report, section 4.2):
  a PCA of the standardized grid descriptors of the training snapshots; per candidate the
  distance of the mean of its first principal component from the training mean, the
  Wasserstein distance of the two PC1 distributions (both in units of the training PC1
  standard deviation), and the PCA reconstruction error relative to the training points'
  own.
* Diversity: farthest-point order in the per-structure features (means and standard
  deviations of the leading principal components), starting from the best-ranked
  candidate, so that no two picks are near-duplicates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import ase
import numpy as np

from mlsurrogate.data import Snapshot
from mlsurrogate.descriptors import (
    BispectrumParams,
    compute_grid_descriptors,
    grid_for_spacing,
    snapshot_descriptors,
)

if TYPE_CHECKING:
    from mlsurrogate.model import Model

TRUST_LEVELS = (0.05, 0.15)  # eV/A on the max force deviation (dpgen's usual values)


def trust_level(max_force_deviation: float, trust: tuple[float, float] = TRUST_LEVELS) -> str:
    """``accurate``, ``candidate`` or ``failed`` for a max force deviation (eV/A)."""
    low, high = trust
    if not 0 <= low < high:
        raise ValueError(f"trust levels must satisfy 0 <= low < high, got {trust}")
    if max_force_deviation < low:
        return "accurate"
    return "candidate" if max_force_deviation < high else "failed"


@dataclass(frozen=True)
class DescriptorPCA:
    """Principal axes of the standardized grid descriptors of a training set."""

    mean: np.ndarray  # (K,)
    scale: np.ndarray  # (K,) standard deviations (1 where a component is constant)
    components: np.ndarray  # (n, K) principal axes, rows
    variance_ratio: np.ndarray  # (n,) share of the variance of each axis
    train_pc1: np.ndarray  # PC1 of the training points used for the fit
    train_reconstruction_error: float  # their mean squared residual

    @classmethod
    def fit(
        cls,
        descriptor_sets: Sequence[np.ndarray],
        components: int = 4,
        max_points: int = 20000,
        seed: int = 0,
    ) -> DescriptorPCA:
        """PCA of the rows [points, K] of every set, at most ``max_points`` drawn evenly
        from each (the same count per set, so no snapshot dominates)."""
        if not descriptor_sets:
            raise ValueError("no training descriptors to fit the PCA on")
        rng = np.random.default_rng(seed)
        per_set = max(1, max_points // len(descriptor_sets))
        rows = []
        for values in descriptor_sets:
            flat = np.asarray(values, dtype=np.float64).reshape(-1, values.shape[-1])
            take = rng.choice(len(flat), size=min(per_set, len(flat)), replace=False)
            rows.append(flat[take])
        x = np.concatenate(rows)
        if not 1 <= components <= x.shape[1]:
            raise ValueError(f"components must be in 1..{x.shape[1]}, got {components}")
        mean = x.mean(axis=0)
        scale = x.std(axis=0)
        scale[scale == 0] = 1.0
        z = (x - mean) / scale
        _, singular, axes = np.linalg.svd(z, full_matrices=False)
        variance = singular**2
        pca = cls(
            mean=mean,
            scale=scale,
            components=axes[:components],
            variance_ratio=variance[:components] / variance.sum(),
            train_pc1=z @ axes[0],
            train_reconstruction_error=1.0,
        )
        return replace(pca, train_reconstruction_error=pca._squared_residual(x))

    def transform(self, descriptors: np.ndarray) -> np.ndarray:
        """Principal components [points, n] of descriptors [..., K]."""
        flat = np.asarray(descriptors, dtype=np.float64).reshape(-1, self.mean.size)
        return ((flat - self.mean) / self.scale) @ self.components.T

    def _squared_residual(self, descriptors: np.ndarray) -> float:
        flat = np.asarray(descriptors, dtype=np.float64).reshape(-1, self.mean.size)
        z = (flat - self.mean) / self.scale
        residual = z - (z @ self.components.T) @ self.components
        return float((residual**2).sum(axis=1).mean())

    def dissimilarity(self, descriptors: np.ndarray) -> Dissimilarity:
        from scipy.stats import wasserstein_distance

        pc1 = self.transform(descriptors)[:, 0]
        unit = float(self.train_pc1.std()) or 1.0
        return Dissimilarity(
            pc1_mean_distance=abs(float(pc1.mean() - self.train_pc1.mean())) / unit,
            pc1_wasserstein=float(wasserstein_distance(pc1, self.train_pc1)) / unit,
            reconstruction_error=self._squared_residual(descriptors)
            / max(self.train_reconstruction_error, 1e-300),
        )

    def features(self, descriptors: np.ndarray) -> np.ndarray:
        """Per-structure features for diversity: means and standard deviations of the
        principal components over the structure's grid points."""
        values = self.transform(descriptors)
        return np.concatenate([values.mean(axis=0), values.std(axis=0)])


@dataclass(frozen=True)
class Dissimilarity:
    """How far a structure's descriptors lie from the training set's."""

    pc1_mean_distance: float  # |<PC1> - <PC1>_train| / std(PC1_train)
    pc1_wasserstein: float  # W1(PC1, PC1_train) / std(PC1_train)
    reconstruction_error: float  # mean squared PCA residual / the training points'


def farthest_point_order(
    features: np.ndarray, first: int | Sequence[int], count: int
) -> list[int]:
    """``count`` row indices: ``first`` (one row or several already picked), then each
    time the row farthest (Euclidean, in features scaled to unit spread) from all rows
    picked so far."""
    features = np.asarray(features, dtype=np.float64)
    count = min(count, len(features))
    spread = features.std(axis=0)
    spread[spread == 0] = 1.0
    scaled = features / spread
    picked = [int(row) for row in np.atleast_1d(first)]
    distance = np.min(
        [np.linalg.norm(scaled - scaled[row], axis=1) for row in picked], axis=0
    )
    while len(picked) < count:
        distance[picked] = -np.inf
        nearest = int(np.argmax(distance))
        picked.append(nearest)
        distance = np.minimum(distance, np.linalg.norm(scaled - scaled[nearest], axis=1))
    return picked


@dataclass(frozen=True)
class CandidateScore:
    """One candidate structure's scores."""

    name: str
    dissimilarity: Dissimilarity
    features: np.ndarray
    max_force_deviation: float | None = None  # eV/A (with a model)
    energy_uncertainty: float | None = None  # eV/atom (with a model)
    level: str | None = None  # trust level (with a model)

    @property
    def priority(self) -> float:
        """Higher first: the model's force deviation if it has one, else how poorly the
        training set's principal axes describe the structure."""
        if self.max_force_deviation is not None:
            return self.max_force_deviation
        return self.dissimilarity.reconstruction_error


def score_candidates(
    candidates: Sequence[tuple[str, ase.Atoms]],
    training: Sequence[str],
    params: BispectrumParams,
    spacing: float,
    model: Model | None = None,
    trust: tuple[float, float] = TRUST_LEVELS,
    components: int = 4,
    threads: int | None = None,
) -> list[CandidateScore]:
    """Scores of (name, structure) candidates against the training snapshot files: the
    descriptor-space dissimilarity, and with an ensemble ``model``
    (:class:`mlsurrogate.model.Model`) its uncertainty and trust level."""
    train_sets = []
    for path in training:
        with Snapshot(path) as snap:
            train_sets.append(np.asarray(snapshot_descriptors(snap, params)))
    pca = DescriptorPCA.fit(train_sets, components=components)
    known = set(model.spec.elements if model is not None else params.elements or ())
    for name, atoms in candidates:
        unknown = sorted(set(atoms.get_chemical_symbols()) - known) if known else []
        if unknown:
            raise ValueError(
                f"candidate {name} has {', '.join(unknown)}, which "
                f"{'the model does' if model is not None else 'the descriptors do'} not know "
                f"(elements "
                f"{', '.join(sorted(known))}): leave it out, or set the elements of LAMMPS "
                "dump types with --elements"
            )
    scores = []
    for name, atoms in candidates:
        grid = grid_for_spacing(atoms.cell, spacing)
        descriptors = compute_grid_descriptors(atoms, grid, params, threads=threads)
        deviation = energy = level = None
        if model is not None:
            spread = model.predict_uncertainty(atoms, grid, threads=threads)
            deviation, energy = spread.max_force_deviation, spread.energy_per_atom
            level = trust_level(deviation, trust)
        scores.append(
            CandidateScore(
                name=name,
                dissimilarity=pca.dissimilarity(descriptors),
                features=pca.features(descriptors),
                max_force_deviation=deviation,
                energy_uncertainty=energy,
                level=level,
            )
        )
    return scores


def pick(scores: Sequence[CandidateScore], k: int, fill_with_failed: bool = False) -> list[int]:
    """Indices of up to ``k`` candidates to label: with trust levels only ``candidate``
    structures (accurate ones teach little, failed ones are too far off, as in dpgen),
    the highest priority first, then farthest-point order for diversity. With
    ``fill_with_failed``, when there are fewer than ``k`` ``candidate`` structures the
    ``failed`` ones fill the batch in farthest-point order from the picks (from the least
    deviating failed one if nothing else was picked): a first model may fail almost
    everywhere, and a batch of one would waste an iteration."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    eligible = [i for i, s in enumerate(scores) if s.level in (None, "candidate")]
    picks: list[int] = []
    if eligible:
        best = max(eligible, key=lambda i: scores[i].priority)
        features = np.stack([scores[i].features for i in eligible])
        picks = [eligible[i] for i in farthest_point_order(features, eligible.index(best), k)]
    failed = [i for i, s in enumerate(scores) if s.level == "failed"]
    if not fill_with_failed or len(picks) >= k or not failed:
        return picks
    pool = picks + failed
    start = list(range(len(picks))) or [pool.index(min(failed, key=lambda i: scores[i].priority))]
    features = np.stack([scores[i].features for i in pool])
    return [pool[i] for i in farthest_point_order(features, start, k)]


def format_scores(scores: Sequence[CandidateScore], picks: Sequence[int]) -> str:
    """The table ``mlsurrogate select`` prints."""

    def number(value: float | None, digits: int) -> str:
        return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"

    lines = [
        "| candidate | picked | PC1 mean dist | PC1 W1 | recon. error | max dF (eV/A) "
        "| dE (meV/atom) | level |",
        "|---|:---:|---:|---:|---:|---:|---:|---|",
    ]
    for index, score in enumerate(scores):
        energy = None if score.energy_uncertainty is None else 1000 * score.energy_uncertainty
        lines.append(
            f"| {score.name} | {'yes' if index in picks else ''} "
            f"| {number(score.dissimilarity.pc1_mean_distance, 3)} "
            f"| {number(score.dissimilarity.pc1_wasserstein, 3)} "
            f"| {number(score.dissimilarity.reconstruction_error, 3)} "
            f"| {number(score.max_force_deviation, 3)} | {number(energy, 2)} "
            f"| {score.level or '-'} |"
        )
    return "\n".join(lines)
