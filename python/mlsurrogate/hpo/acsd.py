"""ACSD: descriptor settings scored from data alone, without training a network.

Fiedler et al., Mach. Learn.: Sci. Technol. 3, 045008 (2022), Eqs. 8-9: for pairs of grid
points (i, j) the cosine similarity S_C of their LDOS vectors and of their descriptor
vectors; the average cosine similarity distance ACSD = mean over the pairs of
|S_C(d_i, d_j) - S_C(B_i, B_j)|. A cutoff that is too short gives descriptors that tell
points apart the LDOS does not (similarities too low); one that is too long makes all
points look alike (too high). Lower is better.

As in the seed and in MALA's ACSD analysis, pairs are taken within one snapshot and the
ACSD of a setting is the mean over the snapshots. Here the points of each snapshot are
drawn once per scan (uniformly over its grid) and every setting is scored on the same
pairs: all i < j among them. The descriptors are the project's kernel at those points,
the LDOS is the snapshot's own.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from mlsurrogate.data import Snapshot
from mlsurrogate.descriptors import BispectrumParams, compute_grid_descriptors

# The scalar keywords a scan may vary (per-element radius/weight as one value for all).
SCANNABLE = ("rcutfac", "rfac0", "twojmax", "radius", "weight", "rmin0")


@dataclass(frozen=True)
class SampledPoints:
    """Grid points of one snapshot: flat indices (C order over [ix, iy, iz]) and LDOS."""

    path: str
    flat_indices: np.ndarray
    ldos: np.ndarray  # (points, energies)


@dataclass(frozen=True)
class AcsdResult:
    """One scored setting: the keywords changed from the base, ACSD, K, seconds."""

    changes: dict[str, Any]
    acsd: float
    num_descriptors: int
    seconds: float


def sample_points(
    snapshots: Sequence[str], points: int = 200, seed: int = 0
) -> list[SampledPoints]:
    """``points`` distinct grid points of each snapshot."""
    if not snapshots:
        raise ValueError("ACSD needs at least one snapshot")
    if points < 2:
        raise ValueError(f"ACSD needs at least 2 points per snapshot, got {points}")
    rng = np.random.default_rng(seed)
    sampled = []
    for path in snapshots:
        with Snapshot(path) as snap:
            stored = snap.ldos_points  # a compact snapshot: its points only
            total = int(np.prod(snap.grid_shape)) if stored is None else len(stored)
            if points > total:
                raise ValueError(f"{path}: {points} points asked, the LDOS has {total}")
            flat = np.sort(rng.choice(total, size=points, replace=False))
            flat = flat if stored is None else stored[flat]
            sampled.append(SampledPoints(path, flat, snap.read_points("ldos", flat)))
    return sampled


def descriptors_at(
    snapshot: str, flat_indices: np.ndarray, params: BispectrumParams, threads: int = 1
) -> np.ndarray:
    """The kernel's descriptors at the given grid points of a snapshot, (points, K)."""
    with Snapshot(snapshot) as snap:
        atoms, grid = snap.atoms, snap.grid_shape
    rows = []
    for ix, iy, iz in zip(*np.unravel_index(flat_indices, grid)):
        block = ((int(ix), int(ix) + 1), (int(iy), int(iy) + 1), (int(iz), int(iz) + 1))
        values = compute_grid_descriptors(atoms, grid, params, index_range=block, threads=threads)
        rows.append(values.reshape(-1))
    return np.asarray(rows)


def cosine_similarities(vectors: np.ndarray) -> np.ndarray:
    """S_C of every pair i < j of rows, in the order of np.triu_indices(len, 1)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError(
            "a sampled point has an all-zero vector: its cosine similarity is undefined"
        )
    unit = vectors / norms
    return (unit @ unit.T)[np.triu_indices(len(vectors), 1)]


def acsd(descriptors: np.ndarray, ldos: np.ndarray) -> float:
    """Mean |S_C(LDOS) - S_C(descriptors)| over all pairs of the rows (same points)."""
    if len(descriptors) != len(ldos):
        raise ValueError(f"{len(descriptors)} descriptor rows but {len(ldos)} LDOS rows")
    return float(np.mean(np.abs(cosine_similarities(ldos) - cosine_similarities(descriptors))))


def settings_to_scan(
    values: Mapping[str, Sequence[Any]], grid: bool = False
) -> list[dict[str, Any]]:
    """Changes from the base: one keyword at a time (default) or every combination."""
    for name, listed in values.items():
        if name not in SCANNABLE:
            raise ValueError(f"cannot scan {name!r}; scannable keywords: {', '.join(SCANNABLE)}")
        if not listed:
            raise ValueError(f"no values given for {name}")
    if grid:
        names = list(values)
        return [dict(zip(names, combo)) for combo in itertools.product(*values.values())]
    return [{name: value} for name, listed in values.items() for value in listed]


def acsd_scan(
    snapshots: Sequence[str],
    values: Mapping[str, Sequence[Any]],
    base: BispectrumParams | None = None,
    *,
    grid: bool = False,
    points: int = 200,
    seed: int = 0,
    threads: int = 1,
    progress: bool = True,
) -> list[AcsdResult]:
    """ACSD of every setting to scan (``settings_to_scan``), on one set of points:
    ``points`` per snapshot, the mean over the snapshots."""
    from tqdm import tqdm

    base = base or BispectrumParams()
    settings = settings_to_scan(values, grid)
    sampled = sample_points(snapshots, points, seed)
    results = []
    for changes in tqdm(settings, desc="ACSD", unit="setting", disable=not progress):
        params = replace(base, **changes)
        start = time.perf_counter()
        descriptors = [descriptors_at(s.path, s.flat_indices, params, threads) for s in sampled]
        seconds = time.perf_counter() - start
        score = float(
            np.mean([acsd(d, s.ldos.astype(np.float64)) for d, s in zip(descriptors, sampled)])
        )
        results.append(AcsdResult(changes, score, descriptors[0].shape[1], seconds))
    return results


def best(results: Sequence[AcsdResult]) -> AcsdResult:
    """The setting with the lowest ACSD."""
    finite = [r for r in results if math.isfinite(r.acsd)]
    if not finite:
        raise ValueError("no setting has a finite ACSD")
    return min(finite, key=lambda r: r.acsd)


def format_table(results: Sequence[AcsdResult]) -> str:
    """Markdown table of a scan, the minimum marked."""
    lowest = best(results)
    lines = ["| setting | K | ACSD | seconds |", "|---|---:|---:|---:|"]
    for r in results:
        setting = ", ".join(f"{k} {v}" for k, v in r.changes.items())
        mark = " (min)" if r is lowest else ""
        lines.append(f"| {setting} | {r.num_descriptors} | {r.acsd:.4f}{mark} | {r.seconds:.2f} |")
    return "\n".join(lines)


def plot_scan(results: Sequence[AcsdResult], path: str) -> None:
    """ACSD against each scanned keyword (one panel each); for a two-keyword grid, one
    curve per value of the second keyword."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mlsurrogate.files import atomic_output

    names = list(dict.fromkeys(name for r in results for name in r.changes))
    grid = all(len(r.changes) == len(names) for r in results) and len(names) == 2
    panels = [names[0]] if grid else names
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for axis, name in zip(axes[0], panels):
        if grid:
            for level in dict.fromkeys(r.changes[names[1]] for r in results):
                curve = [r for r in results if r.changes[names[1]] == level]
                axis.plot([r.changes[name] for r in curve], [r.acsd for r in curve], "o-",
                          label=f"{names[1]} {level}")  # fmt: skip
            axis.legend(fontsize=8)
        else:
            curve = [r for r in results if set(r.changes) == {name}]
            axis.plot([r.changes[name] for r in curve], [r.acsd for r in curve], "o-")
        axis.set_xlabel(name)
        axis.set_ylabel("ACSD")
    lowest = best(results)
    figure.suptitle(f"lowest: {', '.join(f'{k} {v}' for k, v in lowest.changes.items())}")
    figure.tight_layout()
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)
