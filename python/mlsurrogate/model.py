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

import contextlib
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ase
import numpy as np
import torch

from mlsurrogate.descriptors import BispectrumParams
from mlsurrogate.physics import LdosEnergy

ACTIVATIONS = ("leaky_relu", "relu", "tanh", "silu", "gelu")
MODEL_FORMAT = "mlsurrogate-model"
MODEL_FORMAT_VERSION = 2


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


class LdosEnsemble(torch.nn.Module):
    """The mean LDOS of several networks (same descriptors and energy grid; e.g. trained
    with different seeds): averaging cancels much of each network's own energy offset."""

    def __init__(self, members: Sequence[LdosNetwork]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError("an ensemble needs at least 2 networks")
        self.members = torch.nn.ModuleList(members)

    def forward(self, descriptors: torch.Tensor) -> torch.Tensor:
        outputs: list[torch.Tensor] = []
        for member in self.members:
            outputs.append(member(descriptors))
        return torch.stack(outputs).mean(0)


class SurrogateModel(torch.nn.Module):
    """Network + energy functional + metadata; TorchScript-exportable."""

    # class-level attribute types for TorchScript (this module has no postponed
    # annotations: TorchScript cannot resolve class annotations given as strings)
    elements: list[str]
    valence_charges: list[float]
    masses: list[float]
    radius: list[float]
    weight: list[float]

    def __init__(
        self,
        network: LdosNetwork | LdosEnsemble,
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
        self.format = MODEL_FORMAT
        self.format_version = MODEL_FORMAT_VERSION
        radius = [_per_element(params.radius, e) for e in elements]
        weight = [_per_element(params.weight, e) for e in elements]
        self.elements = list(elements)
        self.valence_charges = [float(z) for z in valence_charges]
        self.masses = [float(m) for m in masses]
        self.grid_spacing = float(grid_spacing)
        # descriptor parameters, as LAMMPS compute sna/grid keywords
        self.rcutfac = float(params.rcutfac)
        self.rfac0 = float(params.rfac0)
        self.twojmax = int(params.twojmax)
        self.radius = radius
        self.weight = weight
        self.rmin0 = float(params.rmin0)
        self.switchflag = bool(params.switchflag)
        self.bzeroflag = bool(params.bzeroflag)
        self.quadraticflag = bool(params.quadraticflag)
        self.chemflag = bool(params.chemflag)
        self.bnormflag = bool(params.bnormflag)
        self.wselfallflag = bool(params.wselfallflag)
        # neighbour cutoff of the descriptor kernel: 2 rcutfac R_j for an atom of element j
        self.cutoff = float(2.0 * params.rcutfac * max(radius))
        self.metadata_json = json.dumps(metadata, sort_keys=True)

    def forward(self, descriptors: torch.Tensor) -> torch.Tensor:
        """LDOS [points, nE] from descriptors [points, K]."""
        return self.network(descriptors)

    @torch.jit.export
    def descriptor_gradient(
        self, descriptors: torch.Tensor, ldos_gradient: torch.Tensor
    ) -> torch.Tensor:
        """dA/dB = (dA/dLDOS) . dLDOS/dB for each point (back-propagation)."""
        inputs = descriptors.detach().clone().requires_grad_(True)
        ldos = self.network(inputs)
        upstream: list[torch.Tensor | None] = [ldos_gradient]
        grad = torch.autograd.grad([ldos], [inputs], upstream)[0]
        return grad if grad is not None else torch.zeros_like(inputs)


def _per_element(value: float | dict[str, float], element: str) -> float:
    return float(value[element]) if isinstance(value, dict) else float(value)


@contextlib.contextmanager
def _torchscript() -> Iterator[None]:
    """torch 2.13 marks TorchScript deprecated; it stays the format libtorch loads in C++
    without Python (the pair style), so its warnings are silenced here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def save_model(model: SurrogateModel, path: str | os.PathLike[str]) -> Path:
    """Script and save atomically, with ``metadata.json`` as an extra file."""
    from mlsurrogate.files import atomic_output

    path = Path(path)
    with _torchscript(), atomic_output(path) as tmp:
        scripted = torch.jit.script(model)
        torch.jit.save(scripted, str(tmp), _extra_files={"metadata.json": model.metadata_json})
    return path


def _load(path: str | os.PathLike[str], device: str, extra: dict[str, Any]) -> Any:
    with _torchscript():
        return torch.jit.load(str(path), map_location=device, _extra_files=extra)


def load_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``metadata.json`` of an exported model."""
    extra = {"metadata.json": ""}
    try:
        _load(path, "cpu", extra)
    except (RuntimeError, ValueError, OSError) as exc:
        raise ValueError(f"{path}: not a readable TorchScript model ({exc})") from exc
    if not extra["metadata.json"]:
        raise ValueError(f"{path}: no metadata.json: not an mlsurrogate model")
    metadata = json.loads(extra["metadata.json"])
    if metadata.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path}: not an mlsurrogate model (format {metadata.get('format')})")
    return metadata


class Model:
    """An exported model in Python: LDOS, energies and metadata for ``ase.Atoms``."""

    def __init__(self, module: torch.jit.ScriptModule, metadata: dict[str, Any], path: Path):
        self.module = module
        self.metadata = metadata
        self.path = path

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str = "cpu") -> "Model":
        metadata = load_metadata(path)
        return cls(_load(path, device, {}), metadata, Path(path))

    @property
    def params(self) -> BispectrumParams:
        from mlsurrogate.data import params_from_json

        return params_from_json(json.dumps(self.metadata["descriptor_params"]))

    @property
    def energies(self) -> np.ndarray:
        return np.asarray(self.metadata["energies_eV"])

    def default_grid(self, atoms: ase.Atoms) -> tuple[int, int, int]:
        """Grid points per cell vector at the model's training grid spacing."""
        lengths = np.linalg.norm(np.asarray(atoms.cell), axis=1)
        spacing = self.metadata["grid_spacing_A"]
        return tuple(max(1, int(round(length / spacing))) for length in lengths)

    def _check_elements(self, atoms: ase.Atoms) -> None:
        unknown = sorted(set(atoms.get_chemical_symbols()) - set(self.metadata["elements"]))
        if unknown:
            raise ValueError(
                f"{self.path}: the model knows elements {self.metadata['elements']}, not {unknown}"
            )

    def predict_ldos_from_descriptors(self, descriptors: np.ndarray) -> np.ndarray:
        """LDOS [..., nE] from descriptors [..., K] (float64)."""
        flat = torch.as_tensor(descriptors.reshape(-1, descriptors.shape[-1]), dtype=torch.float64)
        with torch.no_grad():
            ldos = self.module(flat.to(next(self.module.parameters()).dtype))
        return ldos.double().cpu().numpy().reshape(*descriptors.shape[:-1], -1)

    def predict_ldos(
        self, atoms: ase.Atoms, grid: tuple[int, int, int] | None = None
    ) -> np.ndarray:
        """LDOS [nx, ny, nz, nE] in 1/(eV A^3) on ``grid`` (default: the model's spacing)."""
        from mlsurrogate.descriptors import compute_grid_descriptors

        self._check_elements(atoms)
        grid = grid or self.default_grid(atoms)
        descriptors = compute_grid_descriptors(atoms, grid, self.params)
        return self.predict_ldos_from_descriptors(descriptors)

    def energy_terms(
        self, atoms: ase.Atoms, ldos: np.ndarray, core: torch.Tensor | None = None
    ) -> dict[str, float]:
        """Energy terms (eV) of a predicted LDOS for ``atoms``, E_ii and A included."""
        from mlsurrogate.ion_ion import ion_ion_energy

        charges = dict(zip(self.metadata["elements"], self.module.valence_charges))
        n_electrons = float(sum(charges[s] for s in atoms.get_chemical_symbols()))
        cell = torch.as_tensor(np.asarray(atoms.cell), dtype=torch.float64)
        terms, _ = self.module.functional.evaluate(
            torch.as_tensor(ldos, dtype=torch.float64), cell, n_electrons, False, core
        )
        out = {key: float(value) for key, value in terms.items()}
        out["ion_ion"] = ion_ion_energy(atoms, charges).energy
        out["free_energy"] = out["electronic"] + out["ion_ion"]
        return out

    def atom_energies(
        self, atoms: ase.Atoms, grid: tuple[int, int, int] | None = None
    ) -> np.ndarray:
        """Electronic free energy (A - E_ii, eV) shared among the atoms, as the pair
        style's per-atom energy: each grid point's share of A - E_ii split by Becke's
        fuzzy Voronoi cells, points with no atom within the cutoff by valence charge."""
        from mlsurrogate.descriptors import partition_to_atoms

        grid = grid or self.default_grid(atoms)
        ldos = torch.as_tensor(self.predict_ldos(atoms, grid), dtype=torch.float64)
        charges = dict(zip(self.metadata["elements"], self.module.valence_charges))
        valence = np.array([charges[s] for s in atoms.get_chemical_symbols()])
        cell = torch.as_tensor(np.asarray(atoms.cell), dtype=torch.float64)
        functional = self.module.functional
        voxel = abs(float(torch.linalg.det(cell))) / float(np.prod(grid))
        rows = ldos.reshape(-1, ldos.shape[-1])
        mu = functional.fermi_level(functional.dos(rows, voxel), float(valence.sum()))
        density = functional.density(rows, mu).reshape(grid)
        points = functional.band_free_points(rows, mu, voxel).reshape(grid)
        points = points + functional.potential_points(density, cell)
        shares, unclaimed = partition_to_atoms(atoms, grid, self.params, points[..., None].numpy())
        return shares[:, 0] + unclaimed[0] * valence / valence.sum()

    def energy(self, atoms: ase.Atoms, grid: tuple[int, int, int] | None = None) -> float:
        """Total free energy A (eV) of ``atoms``."""
        return self.energy_terms(atoms, self.predict_ldos(atoms, grid))["free_energy"]
