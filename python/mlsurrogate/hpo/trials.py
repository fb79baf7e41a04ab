"""A search over training settings: its TOML (``HpoConfig``) and one trained trial.

The TOML names a base training recipe (data, epochs, physics terms) and the settings to
vary, in section [space]: ``layers`` and ``width`` (``hidden = [width] * layers``) and any
key of the recipe's [model], [training] or [physics] sections. A list gives the levels
(OAT, and Optuna's categorical choice); a table ``{low = .., high = .., log = ..}`` a range
(Optuna only). Each trial trains the recipe with its values into ``workdir/trials``,
named by a hash of the values and of the recipe's text: a finished trial is read back,
an interrupted one resumes from its checkpoint, so a killed search loses at most the
epoch in progress.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from mlsurrogate.files import write_bytes_atomically
from mlsurrogate.toml_config import read_sections
from mlsurrogate.training import SnapshotSource, TrainingConfig, train
from mlsurrogate.training.checkpoint import load_checkpoint

OBJECTIVES = ("validation_objective", "total_meV_atom", "band_meV_atom", "force_rmse")
ARCHITECTURE_KEYS = ("layers", "width")
_HPO_KEYS = {
    "training", "workdir", "objective", "trials", "seed", "naswot_threshold", "naswot_batch",
    "naswot_initialisations",
}  # fmt: skip
# keys of the recipe a search may vary: not the data, the warm start or the descriptors
VARIABLE_KEYS = tuple(
    f.name
    for f in fields(TrainingConfig)
    if f.metadata["section"] in ("model", "training", "physics") and f.name != "hidden"
)


@dataclass(frozen=True)
class HpoConfig:
    """A search (TOML sections [hpo] and [space]; paths relative to the TOML)."""

    training: str
    space: dict[str, Any]
    workdir: Path
    objective: str = "validation_objective"
    trials: int = 20
    seed: int = 0
    naswot_threshold: float | None = None  # Optuna: prune trials scoring below it
    naswot_batch: int = 64
    naswot_initialisations: int = 5
    base: TrainingConfig = field(default_factory=TrainingConfig, repr=False)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> HpoConfig:
        """Read and check a search TOML; ValueError naming the file and the key."""
        path = Path(path)
        tables = read_sections(path, "search config", ("hpo", "space"))
        settings, space = tables["hpo"], tables["space"]
        misplaced = sorted(set(settings) - _HPO_KEYS)
        if misplaced:
            raise ValueError(
                f"{path}: [hpo] has unknown keys {misplaced}; it takes {sorted(_HPO_KEYS)}"
            )
        if "training" not in settings:
            raise ValueError(f"{path}: [hpo] training: the base training TOML is required")
        base_dir = path.resolve().parent
        training = str(base_dir / settings.pop("training"))
        try:
            config = cls(
                training=training,
                space=space,
                workdir=base_dir / settings.pop("workdir", "hpo"),
                base=TrainingConfig.from_toml(training),
                **settings,
            )
            config.validate()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from exc
        return config

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"[hpo] objective {self.objective!r}: use one of {OBJECTIVES}")
        if self.trials < 1 or self.naswot_batch < 2 or self.naswot_initialisations < 1:
            raise ValueError(
                "[hpo] trials >= 1, naswot_batch >= 2 and naswot_initialisations >= 1 are needed"
            )
        if not self.space:
            raise ValueError("[space] is empty: give the settings to search")
        for name, levels in self.space.items():
            if name not in (*ARCHITECTURE_KEYS, *VARIABLE_KEYS):
                raise ValueError(
                    f"[space] {name!r} cannot be searched; use {', '.join(ARCHITECTURE_KEYS)} or "
                    f"a [model]/[training]/[physics] key of the training config"
                )
            is_range = isinstance(levels, dict) and {"low", "high"} <= set(levels)
            if not (is_range or (isinstance(levels, list) and levels)):
                raise ValueError(
                    f"[space] {name}: give a list of levels or a table {{low = .., high = ..}}"
                )
            for value in levels if isinstance(levels, list) else [levels["low"], levels["high"]]:
                trial_config(self.base, {name: value}).validate()

    def levels(self) -> dict[str, list[Any]]:
        """The listed levels of every setting (OAT: ranges are not allowed)."""
        ranges = [name for name, levels in self.space.items() if not isinstance(levels, list)]
        if ranges:
            raise ValueError(f"[space] {ranges}: an orthogonal array needs lists of levels")
        return {name: list(levels) for name, levels in self.space.items()}


def trial_config(base: TrainingConfig, values: Mapping[str, Any]) -> TrainingConfig:
    """The base recipe with a trial's values (``layers``/``width`` set ``hidden``)."""
    layers = int(values.get("layers", len(base.hidden)))
    width = values.get("width")
    hidden = [int(width)] * layers if width is not None else (base.hidden * layers)[:layers]
    rest = {k: v for k, v in values.items() if k not in ARCHITECTURE_KEYS}
    return dataclasses.replace(base, hidden=hidden, **rest)


def trial_key(values: Mapping[str, Any], recipe: str) -> str:
    """A short name for a trial (its file names): a hash of its values and of the base
    recipe's text, so that editing the recipe starts new trials instead of reading back
    results it no longer describes."""
    text = json.dumps(dict(sorted(values.items())), sort_keys=True, default=str) + recipe
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def objective_of(history: list[dict[str, float]], config: TrainingConfig, key: str) -> float:
    """``key`` at the epoch with the best validation objective of the run's last phase
    (the checkpoint's best network: after the physics terms start, if they do)."""
    phase = [h for h in history if config.uses_physics and h["epoch"] >= config.physics_start_epoch]
    candidates = phase or history
    best = min(candidates, key=lambda h: h["validation_objective"])
    value = float(best[key])
    return value if math.isfinite(value) else math.inf


def run_trial(config: HpoConfig, values: Mapping[str, Any]) -> float:
    """Train (or read back, or resume) the trial with ``values``; its objective."""
    directory = config.workdir / "trials"
    directory.mkdir(parents=True, exist_ok=True)
    key = trial_key(values, Path(config.training).read_text())
    result = directory / f"{key}.json"
    if result.exists():
        return float(json.loads(result.read_text())["objective"])
    settings = trial_config(config.base, values)
    checkpoint = directory / f"{key}.ckpt"
    with open(directory / f"{key}.log", "a") as log:
        train(
            settings,
            checkpoint,
            resume=checkpoint.exists(),
            progress=False,
            log=lambda line: print(line, file=log, flush=True),
        )
    history = load_checkpoint(checkpoint)["history"]
    objective = objective_of(history, settings, config.objective)
    record = {"values": dict(values), "objective": objective, "history": history}
    write_bytes_atomically(result, json.dumps(record).encode())
    return objective


def naswot_batch(config: TrainingConfig, size: int, seed: int = 0) -> np.ndarray:
    """``size`` descriptor rows drawn at random from the training snapshots' points."""
    rng = np.random.default_rng(seed)
    params = config.params()
    sources = [SnapshotSource(p, params) for p in config.train]
    counts = np.bincount(rng.integers(len(sources), size=size), minlength=len(sources))
    rows = []
    for source, count in zip(sources, counts):
        if count:
            descriptors, _ = source.all_points()
            picked = rng.choice(
                len(descriptors), size=min(int(count), len(descriptors)), replace=False
            )
            rows.append(descriptors[np.sort(picked)])
    return np.concatenate(rows)


def naswot_inputs(config: HpoConfig) -> tuple[np.ndarray, int]:
    """The NASWOT mini-batch of a search and the number of LDOS energies of its data."""
    from mlsurrogate.data import Snapshot

    with Snapshot(config.base.train[0]) as snap:
        energies = len(snap.energies)
    return naswot_batch(config.base, config.naswot_batch, config.seed), energies
