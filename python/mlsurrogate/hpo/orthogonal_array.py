"""OAT: one trained network per row of a strength-2 orthogonal array, then range analysis.

Orthogonal-array tuning (Zhang et al., IEEE Access 7, 2019; used for MALA's networks by
Fiedler et al. 2022): every pair of levels of every two factors appears in some row, so
a few rows stand for the full grid. The array is the Rao-Hamming construction: for a
prime q, the rows are all x in Z_q^m and the columns all nonzero c in Z_q^m whose first
nonzero entry is 1, entry c . x mod q (q^m rows, (q^m - 1)/(q - 1) columns, strength 2).
A factor with L < q levels takes level (entry mod L): every pair of its levels with
another factor's still appears, the low levels somewhat more often. Range analysis: the
mean objective over the rows at each level of a factor; the factor's importance is the
largest minus the smallest of those means, its best level the one of the smallest mean.
A row without a finite objective counts as the worst row.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlsurrogate.hpo.trials import HpoConfig, run_trial


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


def orthogonal_array(levels: Sequence[int]) -> np.ndarray:
    """A strength-2 array (rows, factors) of level indices for factors with the given
    numbers of levels; the smallest Rao-Hamming array that holds them."""
    if not levels or any(n < 1 for n in levels):
        raise ValueError(f"every factor needs at least one level, got {list(levels)}")
    q = max(2, max(levels))
    while not _is_prime(q):
        q += 1
    m = 2
    while (q**m - 1) // (q - 1) < len(levels):
        m += 1
    columns = [
        c
        for c in itertools.product(range(q), repeat=m)
        if any(c) and c[next(i for i, v in enumerate(c) if v)] == 1
    ]
    rows = np.array(list(itertools.product(range(q), repeat=m)))
    array = rows @ np.array(columns[: len(levels)]).T % q
    return array % np.array(levels)


@dataclass(frozen=True)
class FactorAnalysis:
    """Range analysis of one factor: mean objective per level, importance, best level."""

    name: str
    levels: list[Any]
    means: list[float]
    importance: float
    best: Any


def range_analysis(
    levels: Mapping[str, Sequence[Any]], array: np.ndarray, objectives: Sequence[float]
) -> list[FactorAnalysis]:
    """Per factor (array column), most important first. A row without a finite objective
    (an untrainable network) counts as the worst finite row."""
    objectives = np.asarray(objectives, dtype=float)
    finite_rows = np.isfinite(objectives)
    if finite_rows.any():
        objectives = np.where(finite_rows, objectives, objectives[finite_rows].max())
    analyses = []
    for column, (name, values) in enumerate(levels.items()):
        means = [float(objectives[array[:, column] == i].mean()) for i in range(len(values))]
        finite = [m for m in means if np.isfinite(m)]
        importance = max(finite) - min(finite) if finite else float("nan")
        best = values[int(np.nanargmin(means))] if finite else values[0]
        analyses.append(FactorAnalysis(name, list(values), means, importance, best))
    return sorted(analyses, key=lambda a: -a.importance if np.isfinite(a.importance) else 0.0)


@dataclass(frozen=True)
class OatResult:
    rows: list[dict[str, Any]]
    objectives: list[float]
    analysis: list[FactorAnalysis]
    best_values: dict[str, Any]
    best_objective: float  # of the network trained with every factor at its best level


def run_oat(config: HpoConfig, log: Any = print) -> OatResult:
    """Train every row (finished rows are read back), analyse, train the best levels."""
    levels = config.levels()
    array = orthogonal_array([len(v) for v in levels.values()])
    rows = [{name: values[i] for (name, values), i in zip(levels.items(), row)} for row in array]
    objectives = []
    for number, values in enumerate(rows):
        objectives.append(run_trial(config, values))
        log(f"row {number + 1}/{len(rows)}: {values} -> {config.objective} {objectives[-1]:.4g}")
    analysis = range_analysis(levels, array, objectives)
    best_values = {
        a.name: a.best for a in sorted(analysis, key=lambda a: list(levels).index(a.name))
    }
    best_objective = run_trial(config, best_values)
    log(f"best levels {best_values} -> {config.objective} {best_objective:.4g}")
    return OatResult(rows, objectives, analysis, best_values, best_objective)


def format_oat(result: OatResult, objective: str) -> str:
    """The rows and the range analysis as Markdown tables."""
    names = list(result.rows[0])
    lines = [
        "| row | " + " | ".join(names) + f" | {objective} |",
        "|---:|" + "---|" * len(names) + "---:|",
    ]
    for number, (values, value) in enumerate(zip(result.rows, result.objectives), start=1):
        cells = " | ".join(str(values[n]) for n in names)
        lines.append(f"| {number} | {cells} | {value:.4g} |")
    lines += [
        "",
        "| factor | mean per level | importance (max - min) | best |",
        "|---|---|---:|---|",
    ]
    for a in result.analysis:
        means = ", ".join(f"{level}: {mean:.4g}" for level, mean in zip(a.levels, a.means))
        lines.append(f"| {a.name} | {means} | {a.importance:.4g} | {a.best} |")
    lines.append(f"\nBest levels {result.best_values}: {objective} {result.best_objective:.4g}")
    return "\n".join(lines)
