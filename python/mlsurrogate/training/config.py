"""TrainingConfig: every setting of a training run, its TOML layout and its checks.

A TOML file groups the keys in sections (``SECTIONS``); each key belongs to exactly one
section (``field.metadata["section"]``), and ``[descriptor_params]`` holds the
BispectrumParams keywords. ``docs/training-config.md`` is generated from the same field
metadata (``config_reference``), so it cannot drift from the dataclass.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from mlsurrogate.data import params_from_json
from mlsurrogate.descriptors import DESCRIPTOR_KEYWORDS, PER_ELEMENT_KEYWORDS, BispectrumParams

SECTIONS = {
    "data": "the snapshot files",
    "model": "the network",
    "training": "optimizer, schedule and run settings",
    "physics": "optional energy, force, stress and density terms of the loss",
    "transfer": "fine-tuning a trained network on new data (warm start, frozen layers)",
    "descriptor_params": "BispectrumParams keywords (LAMMPS compute sna/grid)",
}


def _key(section: str, default: Any, doc: str) -> Any:
    """A config field with its TOML section and one-line meaning."""
    metadata = {"section": section, "doc": doc}
    if callable(default):
        return field(default_factory=default, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainingConfig:
    """Everything a training run depends on (TOML keys have the same names)."""

    train: list[str] = _key("data", list, "training snapshot files (.h5), relative to the TOML")
    validation: list[str] = _key(
        "data", list, "validation snapshot files (early stopping, reported errors)"
    )
    hidden: list[int] = _key("model", lambda: [400, 400], "hidden layer widths")
    activation: str = _key("model", "leaky_relu", "leaky_relu, relu, tanh, silu or gelu")
    dropout: float = _key("model", 0.0, "dropout probability after each hidden layer, [0, 1)")
    batch_size: int = _key("training", 1024, "grid points per mini-batch")
    learning_rate: float = _key("training", 1e-3, "Adam learning rate")
    max_epochs: int = _key("training", 100, "epochs at most")
    patience: int = _key("training", 10, "epochs without validation improvement before stopping")
    lr_patience: int = _key(
        "training", 3, "epochs on a plateau before the learning rate is cut (ReduceLROnPlateau)"
    )
    lr_factor: float = _key("training", 0.5, "factor of each learning-rate cut, (0, 1)")
    buffer_planes: int = _key(
        "training", 64, "x-planes of snapshots held in memory and shuffled together"
    )
    # a compact snapshot keeps ~2 % of its points: unbalanced, its few points weigh its
    # cell much less than a full snapshot's weigh a small cell (benchmarks/README.md,
    # "Balanced point density")
    balance_point_density: bool = _key(
        "training",
        False,
        "each epoch draws from every training snapshot the points per A^3 of the sparsest",
    )
    seed: int = _key("training", 0, "seed of the initial weights and of the batch order")
    device: str = _key("training", "cpu", "torch device: cpu, cuda or cuda:N")
    threads: int = _key("training", 0, "torch intra-op threads; 0 = torch's default")
    # decay of an exponential moving average of the weights, which is what is validated,
    # kept as best and exported
    weight_averaging: float = _key(
        "training", 0.0, "EMA decay of the validated and exported weights, [0, 1); 0 = off"
    )
    energy_weight: float = _key(
        "physics", 0.0, "1/eV^2, on ((A - A_QE) / N)^2 (free energy error per atom)"
    )
    force_weight: float = _key("physics", 0.0, "A^2/eV^2, on the mean squared force error")
    stress_weight: float = _key(
        "physics", 0.0, "1/eV^2, on the mean over six strains of ((dA/deps - target) / N)^2"
    )
    hartree_weight: float = _key(
        "physics", 0.0, "1/eV^2, on ((E_H - E_H,QE) / N)^2 (Hartree energy error per atom)"
    )
    physics_every: int = _key("physics", 20, "mini-batches between energy/force terms")
    physics_start_epoch: int = _key(
        "physics", 0, "LDOS-only epochs first: the terms need a physical LDOS"
    )
    # Adam steps every weight by about the learning rate whatever a term's weight, and
    # weights that only the energy term drives coherently (e.g. output biases) overshoot
    physics_lr_factor: float = _key(
        "physics", 0.1, "the terms start at learning_rate times this, (0, 1]"
    )
    physics_spacing: float = _key("physics", 0.5, "Angstrom, grid of the energy/force terms")
    physics_jacobian_gb: float = _key(
        "physics",
        2.0,
        "GB of dB/dR stored for the terms' snapshots (faster steps); the rest use the adjoint",
    )
    density_weight: float = _key(
        "physics", 0.0, "on (density error / mean density)^2 per grid point"
    )
    initial_checkpoint: str = _key(
        "transfer",
        "",
        "checkpoint whose best network (weights and scalers) starts the training, relative "
        "to the TOML; empty = random initial weights",
    )
    frozen_layers: int = _key(
        "transfer",
        0,
        "the first N linear layers keep the initial checkpoint's weights; 0 .. len(hidden) "
        "(the output layer always trains)",
    )
    descriptor_params: dict[str, Any] = _key(
        "descriptor_params",
        lambda: asdict(BispectrumParams()),
        "BispectrumParams keywords; default MALA's aluminium set",
    )

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> TrainingConfig:
        """Read a TOML file; ValueError naming the file, key and section for unknown keys,
        keys in the wrong section and values of the wrong type or range."""
        try:
            with open(path, "rb") as handle:
                raw = tomllib.load(handle)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"{path}: cannot read the training config ({exc})") from exc
        home = {f.name: f.metadata["section"] for f in fields(cls)}
        flat: dict[str, Any] = {}
        for section, table in raw.items():
            if section not in SECTIONS:
                where = f"belongs in section [{home[section]}]" if section in home else "unknown"
                raise ValueError(
                    f"{path}: [{section}] / {section} is not a section ({where}); sections: "
                    f"{', '.join(SECTIONS)}"
                )
            if not isinstance(table, dict):
                raise ValueError(f"{path}: {section} must be a section [{section}], not a value")
            if section == "descriptor_params":
                flat["descriptor_params"] = asdict(BispectrumParams()) | table
                continue
            for key, value in table.items():
                if key not in home:
                    valid = sorted(k for k, s in home.items() if s == section)
                    raise ValueError(
                        f"{path}: unknown key {key!r} in section [{section}]; its keys: {valid}"
                    )
                if home[key] != section:
                    raise ValueError(
                        f"{path}: key {key!r} belongs in section [{home[key]}], not [{section}]"
                    )
                flat[key] = value
        base = Path(path).parent
        for key in ("train", "validation"):
            if isinstance(flat.get(key), list):
                flat[key] = [str(base / p) if isinstance(p, str) else p for p in flat[key]]
        if isinstance(flat.get("initial_checkpoint"), str) and flat["initial_checkpoint"]:
            flat["initial_checkpoint"] = str(base / flat["initial_checkpoint"])
        config = cls(**flat)
        try:
            config.validate(require_data=False)  # flags may still add the snapshots
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
        return config

    def params(self) -> BispectrumParams:
        return params_from_json(json.dumps(self.descriptor_params))

    def validate(self, require_data: bool = True) -> None:
        """ValueError naming the key, its section and the problem."""
        _check_types(self)
        _check_descriptor_params(self.descriptor_params)
        if require_data and not self.train:
            raise ValueError("no training snapshots: set train = [...] in section [data]")
        if require_data and not self.validation:
            raise ValueError("no validation snapshots: set validation = [...] in section [data]")
        ranges = {
            "batch_size": self.batch_size >= 1,
            "max_epochs": self.max_epochs >= 1,
            "buffer_planes": self.buffer_planes >= 1,
            "physics_every": self.physics_every >= 1,
            "patience": self.patience >= 0,
            "lr_patience": self.lr_patience >= 0,
            "threads": self.threads >= 0,
            "physics_start_epoch": self.physics_start_epoch >= 0,
            "learning_rate": self.learning_rate > 0,
            "lr_factor": 0.0 < self.lr_factor < 1.0,
            "dropout": 0.0 <= self.dropout < 1.0,
            "physics_lr_factor": 0.0 < self.physics_lr_factor <= 1.0,
            "physics_spacing": self.physics_spacing > 0,
            "physics_jacobian_gb": self.physics_jacobian_gb >= 0,
            "weight_averaging": 0.0 <= self.weight_averaging < 1.0,
            "hidden": bool(self.hidden) and all(width >= 1 for width in self.hidden),
            # at least the output layer trains
            "frozen_layers": 0 <= self.frozen_layers <= len(self.hidden),
            **{
                key: getattr(self, key) >= 0
                for key in (
                    "energy_weight", "force_weight", "stress_weight", "hartree_weight",
                    "density_weight",
                )
            },
        }
        for key, ok in ranges.items():
            if not ok:
                raise ValueError(
                    f"{key} = {getattr(self, key)!r} (section [{_section(key)}]) is out of "
                    f"range: {_field(key).metadata['doc']}"
                )
        if self.frozen_layers and not self.initial_checkpoint:
            raise ValueError(
                "frozen_layers (section [transfer]) needs initial_checkpoint: frozen random "
                "weights learn nothing"
            )

    @property
    def uses_physics(self) -> bool:
        weights = (self.energy_weight, self.force_weight, self.stress_weight, self.hartree_weight)
        return any(weight > 0 for weight in weights)


def _field(name: str) -> Any:
    return next(f for f in fields(TrainingConfig) if f.name == name)


def _section(name: str) -> str:
    return _field(name).metadata["section"]


def _matches(value: Any, expected: Any) -> bool:
    """isinstance for the annotation types of TrainingConfig (bool is not a number)."""
    origin = typing.get_origin(expected)
    if origin is list:
        (item,) = typing.get_args(expected)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _type_name(expected: Any) -> str:
    return getattr(expected, "__name__", None) or str(expected)


def _check_types(config: TrainingConfig) -> None:
    hints = typing.get_type_hints(TrainingConfig)
    for f in fields(config):
        value = getattr(config, f.name)
        if not _matches(value, hints[f.name]):
            raise ValueError(
                f"{f.name} (section [{f.metadata['section']}]) must be "
                f"{_type_name(hints[f.name])}, got {value!r}"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{f.name} (section [{f.metadata['section']}]) must be finite")


def _check_descriptor_params(raw: dict[str, Any]) -> None:
    valid = (*DESCRIPTOR_KEYWORDS, "elements")
    unknown = sorted(set(raw) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown keys {unknown} in section [descriptor_params]; its keys: {list(valid)}"
        )
    defaults = asdict(BispectrumParams())
    for key in DESCRIPTOR_KEYWORDS:
        value, expected = raw.get(key, defaults[key]), type(defaults[key])
        values = (
            list(value.values())
            if key in PER_ELEMENT_KEYWORDS and isinstance(value, dict)
            else [value]
        )
        if not all(_matches(v, expected) for v in values):
            raise ValueError(
                f"{key} (section [descriptor_params]) must be {expected.__name__}"
                + (" or a table element -> value" if key in PER_ELEMENT_KEYWORDS else "")
                + f", got {value!r}"
            )
    elements = raw.get("elements")
    if (
        elements is not None
        and not _matches(elements, list[str])
        and not (isinstance(elements, tuple) and all(isinstance(e, str) for e in elements))
    ):
        raise ValueError(
            f"elements (section [descriptor_params]) must be a list of symbols, got {elements!r}"
        )


def config_reference() -> str:
    """docs/training-config.md: every key with its section, default and meaning."""
    lines = [
        "# Training configuration",
        "",
        "Keys of `mlsurrogate.training.TrainingConfig`, the TOML file of `mlsurrogate train`",
        "(flags of `mlsurrogate train` override them). Every key must be in its section;",
        "unknown keys, keys in another section and values of the wrong type or range are",
        "errors naming the key and section. Paths in `[data]` are relative to the TOML file.",
        "This page is generated by `mlsurrogate.training.config.config_reference()` and a",
        "test checks that it is current.",
        "",
    ]
    defaults = TrainingConfig()
    for section, meaning in SECTIONS.items():
        lines += [f"## [{section}]", "", meaning[0].upper() + meaning[1:] + ".", ""]
        if section == "descriptor_params":
            lines += [
                "The table `descriptor_params`. Keys: "
                + ", ".join(f"`{k}`" for k in (*DESCRIPTOR_KEYWORDS, "elements")),
                "(see `BispectrumParams`); `radius` and `weight` take one value or a table",
                "element -> value. Defaults: "
                + ", ".join(f"`{k} = {v!r}`" for k, v in asdict(BispectrumParams()).items()),
                "",
            ]
            continue
        lines += ["| key | default | meaning |", "|---|---|---|"]
        for f in fields(TrainingConfig):
            if f.metadata["section"] == section:
                lines.append(
                    f"| `{f.name}` | `{getattr(defaults, f.name)!r}` | {f.metadata['doc']} |"
                )
        lines.append("")
    return "\n".join(lines)
