"""The LDOS network and the exported surrogate model (one TorchScript file).

``LdosNetwork`` maps bispectrum descriptors to the LDOS at each grid point: feature-wise
standardization of the descriptors, a feed-forward network, and an output scale (the
LDOS is learned divided by its maximum over the training data, as MALA does).

``SurrogateModel`` is what ``mlsurrogate export`` writes and ``pair_style mlsurrogate``
loads: the network, the energy functional (:class:`mlsurrogate.physics.LdosEnergy`) and
every setting needed to use them (descriptor parameters, elements, valence charges,
masses, grid spacing), as typed module attributes and as ``metadata.json`` (an extra file
of the TorchScript archive, readable with ``torch::jit::load(path, device, extra_files)``).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from mlsurrogate.descriptors import BispectrumParams
from mlsurrogate.physics import LdosEnergy

ACTIVATIONS = ("leaky_relu", "relu", "tanh", "silu", "gelu")
MODEL_FORMAT = "mlsurrogate-model"
MODEL_FORMAT_VERSION = 1


def _activation(name: str) -> torch.nn.Module:
    if name == "leaky_relu":
        return torch.nn.LeakyReLU()
    if name == "relu":
        return torch.nn.ReLU()
    if name == "tanh":
        return torch.nn.Tanh()
    if name == "silu":
        return torch.nn.SiLU()
    if name == "gelu":
        return torch.nn.GELU()
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


class LdosNetwork(torch.nn.Module):
    """descriptors [points, K] -> LDOS [points, nE] in 1/(eV A^3)."""

    def __init__(
        self,
        num_features: int,
        num_energies: int,
        hidden: Sequence[int] = (400, 400),
        activation: str = "leaky_relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_features < 1 or num_energies < 1 or any(h < 1 for h in hidden):
            raise ValueError(f"layer widths must be >= 1, got {num_features}, {hidden}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        widths = [num_features, *hidden, num_energies]
        layers: list[torch.nn.Module] = []
        for index, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(torch.nn.Linear(width_in, width_out))
            if index < len(widths) - 2:
                layers.append(_activation(activation))
                if dropout > 0.0:
                    layers.append(torch.nn.Dropout(dropout))
        self.layers = torch.nn.Sequential(*layers)
        self.register_buffer("feature_mean", torch.zeros(num_features))
        self.register_buffer("feature_scale", torch.ones(num_features))
        self.register_buffer("ldos_scale", torch.ones(()))

    def scaled(self, descriptors: torch.Tensor) -> torch.Tensor:
        """The network output: LDOS / ldos_scale (what the loss compares)."""
        return self.layers((descriptors - self.feature_mean) / self.feature_scale)

    def forward(self, descriptors: torch.Tensor) -> torch.Tensor:
        return self.scaled(descriptors) * self.ldos_scale


class SurrogateModel(torch.nn.Module):
    """Network + energy functional + metadata; TorchScript-exportable."""

    def __init__(
        self,
        network: LdosNetwork,
        functional: LdosEnergy,
        params: BispectrumParams,
        elements: Sequence[str],
        valence_charges: Sequence[float],
        masses: Sequence[float],
        grid_spacing: float,
        metadata: dict[str, Any],
    ) -> None:
        super().__init__()
        self.network = network
        self.functional = functional
        radius = [_per_element(params.radius, e) for e in elements]
        weight = [_per_element(params.weight, e) for e in elements]
        self.elements: list[str] = list(elements)
        self.valence_charges: list[float] = [float(z) for z in valence_charges]
        self.masses: list[float] = [float(m) for m in masses]
        self.grid_spacing = float(grid_spacing)
        # descriptor parameters, as LAMMPS compute sna/grid keywords
        self.rcutfac = float(params.rcutfac)
        self.rfac0 = float(params.rfac0)
        self.twojmax = int(params.twojmax)
        self.radius: list[float] = radius
        self.weight: list[float] = weight
        self.rmin0 = float(params.rmin0)
        self.switchflag = bool(params.switchflag)
        self.bzeroflag = bool(params.bzeroflag)
        self.quadraticflag = bool(params.quadraticflag)
        self.chemflag = bool(params.chemflag)
        self.bnormflag = bool(params.bnormflag)
        self.wselfallflag = bool(params.wselfallflag)
        # neighbour cutoff of a grid point (a centre of element 0)
        self.cutoff = float(params.rcutfac * (radius[0] + max(radius)))
        self.metadata_json = json.dumps(metadata, sort_keys=True)

    def forward(self, descriptors: torch.Tensor) -> torch.Tensor:
        """LDOS [points, nE] from descriptors [points, K]."""
        return self.network(descriptors)

    @torch.jit.export
    def ldos_and_descriptor_gradient(
        self, descriptors: torch.Tensor, ldos_gradient: torch.Tensor
    ) -> torch.Tensor:
        """dA/dB = (dA/dLDOS) . dLDOS/dB for each point (back-propagation)."""
        inputs = descriptors.detach().clone().requires_grad_(True)
        ldos = self.network(inputs)
        grad = torch.autograd.grad([ldos], [inputs], [ldos_gradient])[0]
        return grad if grad is not None else torch.zeros_like(inputs)


def _per_element(value: float | dict[str, float], element: str) -> float:
    return float(value[element]) if isinstance(value, dict) else float(value)


def save_model(model: SurrogateModel, path: str | os.PathLike[str]) -> Path:
    """Script and save atomically, with ``metadata.json`` as an extra file."""
    from mlsurrogate.data import atomic_output

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script in torch 2.13
        scripted = torch.jit.script(model)
    path = Path(path)
    with atomic_output(path) as tmp:
        torch.jit.save(scripted, str(tmp), _extra_files={"metadata.json": model.metadata_json})
    return path


def load_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``metadata.json`` of an exported model, without loading its code."""
    extra = {"metadata.json": ""}
    try:
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except (RuntimeError, ValueError, OSError) as exc:
        raise ValueError(f"{path}: not a readable TorchScript model ({exc})") from exc
    if not extra["metadata.json"]:
        raise ValueError(f"{path}: no metadata.json: not an mlsurrogate model")
    metadata = json.loads(extra["metadata.json"])
    if metadata.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path}: not an mlsurrogate model (format {metadata.get('format')})")
    return metadata


def params_metadata(params: BispectrumParams) -> dict[str, Any]:
    return asdict(params)
