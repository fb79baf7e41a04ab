"""Export: checkpoints -> one TorchScript model file (the model contract, Python side).

The ``ModelSpec`` is built once here, from the checkpoint's config and the DFT settings of
its training data, and written by ``SurrogateModel`` into both the TorchScript
attributes and ``metadata.json``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlsurrogate.evaluate import xc_of
from mlsurrogate.files import check_output_path
from mlsurrogate.model import LdosEnsemble, ModelSpec, SurrogateModel, save_model
from mlsurrogate.physics import LdosEnergy
from mlsurrogate.training.checkpoint import load_checkpoint, network_for
from mlsurrogate.training.config import TrainingConfig


def functional_for_spec(spec: ModelSpec) -> LdosEnergy:
    """The energy functional a spec describes (scripted into the model)."""
    return LdosEnergy(
        np.asarray(spec.energies_eV),
        spec.electronic_temperature_K,
        xc_of(spec.xc_functional),
        spec.ldos_broadening_kernel,
        spec.ldos_broadening_eV,
    )


def spec_from_checkpoints(states: Sequence[dict[str, Any]]) -> ModelSpec:
    """The spec of a model made of these checkpoints (the first one's data settings; the
    dropout probability of a single network, 0 for an ensemble)."""
    state = states[0]
    info = state["snapshot_attrs"]
    if any(info["core_correction"].values()):
        raise ValueError("export of models with nonlinear core corrections is not supported yet")
    elements = tuple(state["elements"])
    config = TrainingConfig(**state["config"])
    provenance_keys = ("num_valence_electrons_per_cell", "core_correction", "pseudopotentials")
    return ModelSpec(
        elements=elements,
        valence_charges=tuple(float(info["valence_charges"][e]) for e in elements),
        masses=tuple(float(info["masses"][e]) for e in elements),
        grid_spacing_A=float(info["grid_spacing_A"]),
        descriptor_params=replace(config.params(), elements=elements),
        energies_eV=tuple(float(e) for e in state["energies"]),
        electronic_temperature_K=float(info["electronic_temperature_K"]),
        xc_functional=str(info["xc_functional"]),
        ldos_broadening_kernel=str(info["ldos_broadening_kernel"]),
        ldos_broadening_eV=float(info["ldos_broadening_eV"]),
        dropout_probability=config.dropout if len(states) == 1 else 0.0,
        provenance={
            **{key: info[key] for key in provenance_keys},
            "training": [{"config": st["config"], "history": st["history"]} for st in states],
        },
    )


def build_model(
    checkpoints: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    dtype: torch.dtype = torch.float64,
) -> SurrogateModel:
    """The best network of a checkpoint with its functional and spec; with several
    checkpoints (the same data and descriptors, e.g. different seeds), their ensemble."""
    paths = [checkpoints] if isinstance(checkpoints, (str, os.PathLike)) else list(checkpoints)
    if not paths:
        raise ValueError("no checkpoint to export")
    states = [load_checkpoint(path) for path in paths]
    state = states[0]
    params = TrainingConfig(**state["config"]).params()
    networks = []
    for path, other in zip(paths, states):
        for key in ("num_features", "elements", "snapshot_attrs"):
            if other[key] != state[key]:
                raise ValueError(f"{path}: its {key} differ from {paths[0]}'s; cannot ensemble")
        if not np.array_equal(other["energies"], state["energies"]):
            raise ValueError(f"{path}: its energy grid differs from {paths[0]}'s")
        member_config = TrainingConfig(**other["config"])
        if member_config.params() != params:
            raise ValueError(f"{path}: its descriptor parameters differ from {paths[0]}'s")
        network = network_for(member_config, other["num_features"], len(other["energies"]))
        network.load_state_dict(other["best_network"] or other["network"])
        networks.append(network.to(dtype).eval())
    spec = spec_from_checkpoints(states)
    return SurrogateModel(
        networks[0] if len(networks) == 1 else LdosEnsemble(networks),
        functional_for_spec(spec),
        spec,
    )


def export_model(
    checkpoints: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    dtype: torch.dtype = torch.float64,
) -> Path:
    """Write the model of ``checkpoints`` to ``output`` (checked before any work)."""
    check_output_path(output)
    return save_model(build_model(checkpoints, dtype), output)
