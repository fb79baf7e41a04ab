"""Training data: snapshot sources read chunk by chunk, their consistency, shuffled
mini-batches and the scalers fitted on them.

Mini-batches are grid points drawn across all training snapshots: every epoch visits the
chunks of all snapshots (x-planes, the HDF5 chunks; a compact snapshot's stored points)
in a random order, a buffer of chunks at a time, and shuffles the points inside each
buffer; only the buffer is in memory. The order depends only on (seed, epoch).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from mlsurrogate.data import Snapshot
from mlsurrogate.descriptors import BispectrumParams, snapshot_descriptors
from mlsurrogate.model import LdosNetwork

# snapshot attributes that must agree across a model's training and validation data:
# they fix the energy functional and the meaning of the LDOS
CONSISTENT_ATTRIBUTES = (
    "electronic_temperature_K",
    "xc_functional",
    "pseudopotentials",
    "ldos_broadening_kernel",
    "ldos_broadening_eV",
)


class SnapshotSource:
    """Lazy access, chunk by chunk, to a snapshot's descriptors (``snapshot_descriptors``)
    and LDOS: a chunk is an x-plane of a full snapshot (its HDF5 chunk), or all stored
    points of a compact one (``compact_snapshot``: descriptors computed at those points
    on opening). A chunk holding NaN or inf is an error naming the file and dataset."""

    def __init__(self, path: str, params: BispectrumParams) -> None:
        self.path = path
        self.params = params
        self.snapshot = Snapshot(path)
        self.grid_shape = self.snapshot.grid_shape
        self.points = self.snapshot.ldos_points
        self._grid_descriptors: np.ndarray | None = None
        if self.points is None:
            self.descriptors = snapshot_descriptors(self.snapshot, params)
            self.num_chunks = self.grid_shape[0]
            self.num_points = int(np.prod(self.grid_shape))
        else:
            grid = np.asarray(snapshot_descriptors(self.snapshot, params))
            self.descriptors = grid.reshape(-1, grid.shape[-1])[self.points]
            self.num_chunks = 1
            self.num_points = len(self.points)

    def chunk(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(descriptors, LDOS) of chunk ``index``, [points, ...], float32."""
        if self.points is None:
            ny, nz = self.grid_shape[1:]
            descriptors = np.asarray(self.descriptors[index], dtype=np.float32).reshape(ny * nz, -1)
            ldos = np.asarray(self.snapshot.ldos[index], dtype=np.float32).reshape(ny * nz, -1)
            where = f"x-plane {index}"
        else:
            descriptors = np.asarray(self.descriptors, dtype=np.float32)
            ldos = np.asarray(self.snapshot.ldos[()], dtype=np.float32)
            where = "stored points"
        for name, values in (("descriptors", descriptors), ("ldos", ldos)):
            if not np.isfinite(values).all():
                raise ValueError(
                    f"{self.path}: dataset {name} holds NaN or inf values ({where}); "
                    "ingest the QE run again or leave this snapshot out"
                )
        return descriptors, ldos

    def all_points(self) -> tuple[np.ndarray, np.ndarray]:
        """(descriptors, LDOS) of every point with an LDOS."""
        chunks = [self.chunk(i) for i in range(self.num_chunks)]
        return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])

    def grid_descriptors(self) -> np.ndarray:
        """Descriptors of every grid point [P, K] (float32, C order over [ix, iy, iz]):
        what a prediction of the whole LDOS needs, of a compact snapshot too."""
        if self.points is None:
            return self.all_points()[0]
        if self._grid_descriptors is None:  # computed once: validation asks every epoch
            grid = np.asarray(snapshot_descriptors(self.snapshot, self.params), dtype=np.float32)
            self._grid_descriptors = grid.reshape(-1, grid.shape[-1])
        return self._grid_descriptors


def snapshot_elements(snapshot: Snapshot) -> tuple[str, ...]:
    return tuple(sorted(set(snapshot.atoms.get_chemical_symbols())))


def check_consistent(sources: Sequence[SnapshotSource], params: BispectrumParams) -> None:
    """ValueError naming two files and the value they differ in, when snapshots differ in
    elements (without params.elements), DFT settings of the functional, valence charges,
    masses or the energy grid: a model can only learn one of them."""
    first = sources[0].snapshot
    reference = first.attrs
    for source in sources[1:]:
        snap, attrs = source.snapshot, source.snapshot.attrs

        def differs(what: str, ours: Any, theirs: Any) -> ValueError:
            return ValueError(
                f"{source.path} and {first.path} differ in {what}: {theirs!r} vs {ours!r}; "
                "train a model on snapshots of one setting"
            )

        if params.elements is None and snapshot_elements(snap) != snapshot_elements(first):
            raise differs("elements", snapshot_elements(first), snapshot_elements(snap))
        for key in CONSISTENT_ATTRIBUTES:
            if attrs[key] != reference[key]:
                raise differs(key, reference[key], attrs[key])
        for key in ("valence_charges", "masses"):
            shared = set(attrs[key]) & set(reference[key])
            if any(attrs[key][e] != reference[key][e] for e in shared):
                raise differs(key, reference[key], attrs[key])
        if not np.array_equal(snap.energies, first.energies):
            raise differs(
                "energy grid",
                f"{len(first.energies)} energies from {first.energies[0]:.4f} eV",
                f"{len(snap.energies)} energies from {snap.energies[0]:.4f} eV",
            )


def balanced_fractions(sources: Sequence[SnapshotSource]) -> np.ndarray:
    """Per source, the fraction of its points that gives every source the points per A^3
    of the sparsest (a compact snapshot's): each cell then weighs by its volume."""
    density = np.array([s.num_points / s.snapshot.atoms.get_volume() for s in sources])
    return density.min() / density


def batches(
    sources: Sequence[SnapshotSource],
    batch_size: int,
    buffer_planes: int,
    seed: int,
    epoch: int,
    fractions: Sequence[float] | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Shuffled mini-batches (descriptors, LDOS, source index) of grid points over all
    sources, ``buffer_planes`` chunks in memory at a time; order from (seed, epoch). With
    ``fractions``, each epoch keeps that random fraction of each source's points."""
    rng = np.random.default_rng([seed, epoch])
    chunks = [(s, i) for s, source in enumerate(sources) for i in range(source.num_chunks)]
    order = rng.permutation(len(chunks))
    for start in range(0, len(order), buffer_planes):
        picked = [chunks[i] for i in order[start : start + buffer_planes]]
        planes = [sources[s].chunk(i) for s, i in picked]
        x = np.concatenate([p[0] for p in planes])
        y = np.concatenate([p[1] for p in planes])
        owner = np.concatenate([np.full(len(p[0]), s) for (s, _), p in zip(picked, planes)])
        if fractions is not None:
            kept = rng.random(len(x)) < np.asarray(fractions)[owner]
            x, y, owner = x[kept], y[kept], owner[kept]
        permutation = rng.permutation(len(x))
        for first in range(0, len(x), batch_size):
            index = permutation[first : first + batch_size]
            yield x[index], y[index], owner[index]


def density_weights(source: SnapshotSource, functional: Any) -> np.ndarray:
    """w_j with sum_j w_j d_j(r) = n(r) / (mean density) at the Fermi level of the
    snapshot's DFT DOS (its own electron count)."""
    snap = source.snapshot
    electrons = float(snap.attrs["num_valence_electrons"])
    mu = functional.fermi_level(torch.as_tensor(snap.dos()), electrons)
    # the snapshot's integration rule (exact for -f' of k_B T, Fermi-weighted otherwise)
    return (functional.occupation_weights(mu) * snap.atoms.get_volume() / electrons).numpy()


def fit_scalers(network: LdosNetwork, sources: Sequence[SnapshotSource]) -> None:
    """Feature mean and standard deviation, and the LDOS maximum, over training points."""
    count, total, total_sq, ldos_max = 0, 0.0, 0.0, 0.0
    for source in sources:
        for index in range(source.num_chunks):
            x, y = source.chunk(index)
            x = x.astype(np.float64)
            count += len(x)
            total = total + x.sum(0)
            total_sq = total_sq + (x * x).sum(0)
            ldos_max = max(ldos_max, float(np.abs(y).max()))
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
    # constant features (e.g. B_000 without bzero) are passed through unscaled
    std[std < 1e-12 * np.maximum(np.abs(mean), 1.0)] = 1.0
    if not ldos_max > 0:
        raise ValueError("the training LDOS is zero everywhere")
    network.feature_mean.copy_(torch.as_tensor(mean))
    network.feature_scale.copy_(torch.as_tensor(std))
    network.ldos_scale.fill_(ldos_max)
