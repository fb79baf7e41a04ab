"""Training data: snapshot sources read plane by plane, their consistency, shuffled
mini-batches and the scalers fitted on them.

Mini-batches are grid points drawn across all training snapshots: every epoch visits the
x-planes of all snapshots (the HDF5 chunks) in a random order, a buffer of planes at a
time, and shuffles the points inside each buffer; only the buffer is in memory. The order
depends only on (seed, epoch).
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
    """Lazy per-plane access to a snapshot's descriptors (``snapshot_descriptors``) and
    LDOS; a plane holding NaN or inf is an error naming the file and dataset."""

    def __init__(self, path: str, params: BispectrumParams) -> None:
        self.path = path
        self.snapshot = Snapshot(path)
        self.descriptors = snapshot_descriptors(self.snapshot, params)
        self.grid_shape = self.snapshot.grid_shape

    def plane(self, ix: int) -> tuple[np.ndarray, np.ndarray]:
        """(descriptors, LDOS) of x-plane ix, flattened to [ny * nz, ...], float32."""
        ny, nz = self.grid_shape[1:]
        descriptors = np.asarray(self.descriptors[ix], dtype=np.float32).reshape(ny * nz, -1)
        ldos = np.asarray(self.snapshot.ldos[ix], dtype=np.float32).reshape(ny * nz, -1)
        for name, values in (("descriptors", descriptors), ("ldos", ldos)):
            if not np.isfinite(values).all():
                raise ValueError(
                    f"{self.path}: dataset {name} holds NaN or inf values (x-plane {ix}); "
                    "ingest the QE run again or leave this snapshot out"
                )
        return descriptors, ldos

    def all_points(self) -> tuple[np.ndarray, np.ndarray]:
        planes = [self.plane(ix) for ix in range(self.grid_shape[0])]
        return np.concatenate([p[0] for p in planes]), np.concatenate([p[1] for p in planes])


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


def batches(
    sources: Sequence[SnapshotSource], batch_size: int, buffer_planes: int, seed: int, epoch: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Shuffled mini-batches (descriptors, LDOS, source index) of grid points over all
    sources; order from (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    chunks = [(s, ix) for s, source in enumerate(sources) for ix in range(source.grid_shape[0])]
    order = rng.permutation(len(chunks))
    for start in range(0, len(order), buffer_planes):
        picked = [chunks[i] for i in order[start : start + buffer_planes]]
        planes = [sources[s].plane(ix) for s, ix in picked]
        x = np.concatenate([p[0] for p in planes])
        y = np.concatenate([p[1] for p in planes])
        owner = np.concatenate([np.full(len(p[0]), s) for (s, _), p in zip(picked, planes)])
        permutation = rng.permutation(len(x))
        for first in range(0, len(x), batch_size):
            index = permutation[first : first + batch_size]
            yield x[index], y[index], owner[index]


def density_weights(source: SnapshotSource, functional: Any) -> np.ndarray:
    """w_j with sum_j w_j d_j(r) = n(r) / (mean density) at the Fermi level of the
    snapshot's DFT LDOS (its own electron count)."""
    snap = source.snapshot
    volume = snap.atoms.get_volume()
    points = int(np.prod(source.grid_shape))
    dos = sum(
        snap.ldos[ix].astype(np.float64).reshape(-1, len(snap.energies)).sum(0)
        for ix in range(source.grid_shape[0])
    )
    electrons = float(snap.attrs["num_valence_electrons"])
    mu = functional.fermi_level(torch.as_tensor(dos * volume / points), electrons)
    # the snapshot's integration rule (exact for -f' of k_B T, Fermi-weighted otherwise)
    return (functional.occupation_weights(mu) * volume / electrons).numpy()


def fit_scalers(network: LdosNetwork, sources: Sequence[SnapshotSource]) -> None:
    """Feature mean and standard deviation, and the LDOS maximum, over training points."""
    count, total, total_sq, ldos_max = 0, 0.0, 0.0, 0.0
    for source in sources:
        for ix in range(source.grid_shape[0]):
            x, y = source.plane(ix)
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
