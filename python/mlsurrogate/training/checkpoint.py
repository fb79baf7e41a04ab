"""Training checkpoints: everything to resume a run exactly and to export its model.

A checkpoint (``torch.save`` of a dict) holds the config, the network, the averaged
copy, optimizer, scheduler and torch RNG state, the history and the best network, plus
what export needs from the data: feature count, energy grid, elements and the DFT
settings of the snapshots (``dft_settings``, key ``snapshot_attrs``).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlsurrogate.data import Snapshot
from mlsurrogate.files import write_bytes_atomically
from mlsurrogate.model import CHECKPOINT_FORMAT, LdosNetwork, require_file_kind
from mlsurrogate.training.config import TrainingConfig

CHECKPOINT_VERSION = 1


def dft_settings(snap: Snapshot) -> dict[str, Any]:
    """DFT settings an exported model carries from its training data."""
    attrs = snap.attrs
    shape, cell = snap.grid_shape, np.asarray(snap.atoms.cell)
    return {
        "electronic_temperature_K": float(attrs["electronic_temperature_K"]),
        "num_valence_electrons_per_cell": float(attrs["num_valence_electrons"]),
        "valence_charges": dict(attrs["valence_charges"]),
        "masses": dict(attrs["masses"]),
        "xc_functional": str(attrs["xc_functional"]),
        "ldos_broadening_kernel": str(attrs["ldos_broadening_kernel"]),
        "ldos_broadening_eV": float(attrs["ldos_broadening_eV"]),
        "grid_spacing_A": float(np.mean(np.linalg.norm(cell, axis=1) / np.array(shape))),
        "core_correction": dict(attrs["core_correction"]),
        "pseudopotentials": dict(attrs["pseudopotentials"]),
    }


def network_for(config: TrainingConfig, num_features: int, num_energies: int) -> LdosNetwork:
    """The (untrained) network a config describes."""
    return LdosNetwork(num_features, num_energies, config.hidden, config.activation, config.dropout)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}, buffer)
    write_bytes_atomically(path, buffer.getvalue())


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The state dict of a checkpoint; ValueError naming the file for anything else."""
    require_file_kind(path, "checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for damaged files
        raise ValueError(f"{path}: corrupt or unreadable checkpoint ({exc})") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an mlsurrogate checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {state.get('version')} not supported")
    return state
