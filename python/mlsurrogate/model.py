"""The LDOS network and the exported surrogate model (one TorchScript file): the model
contract, Python side.

``LdosNetwork`` maps bispectrum descriptors to the LDOS at each grid point: feature-wise
standardization of the descriptors, a feed-forward network, and an output scale (the
LDOS is learned divided by its maximum over the training data, as MALA does).

``ModelSpec`` is everything needed to use a model besides its weights (elements, valence
charges, masses, grid spacing, descriptor keywords, energy grid, electronic temperature,
XC functional, provenance). ``SurrogateModel`` is what ``mlsurrogate export`` writes and
``pair_style mlsurrogate`` loads: the network, the energy functional
(:class:`mlsurrogate.physics.LdosEnergy`) and the spec, as typed module attributes and as
``metadata.json`` (an extra file of the TorchScript archive, readable with
``torch::jit::load(path, device, extra_files)``). ``Model`` is the Python user's handle:
``Model.load`` checks the format and version and reads the spec back.
"""

import contextlib
import dataclasses
import io
import json
import os
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import ase
import numpy as np
import torch

from mlsurrogate.data import params_from_json
from mlsurrogate.descriptors import (
    DESCRIPTOR_KEYWORDS,
    PER_ELEMENT_KEYWORDS,
    BispectrumParams,
    check_grid_fits_memory,
    compute_grid_descriptors,
    descriptor_gradients,
    grid_for_spacing,
    keyword_type,
    num_descriptors,
    partition_to_atoms,
)
from mlsurrogate.files import check_output_path, write_bytes_atomically
from mlsurrogate.ion_ion import IonIon, ion_ion_energy
from mlsurrogate.physics import LdosEnergy

ACTIVATIONS = ("leaky_relu", "relu", "tanh", "silu", "gelu")
MODEL_FORMAT = "mlsurrogate-model"
MODEL_FORMAT_VERSION = 3
# written into every training checkpoint, so that a checkpoint is recognised by content
CHECKPOINT_FORMAT = "mlsurrogate-checkpoint"
_REEXPORT = "export the model again with `mlsurrogate export`"


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
    """descriptors [points, K] -> LDOS [points, nE] in 1/(eV A^3).

    With ``dropout`` p > 0, a dropout layer follows each hidden layer's activation. In
    training it drops units per grid point (torch.nn.Dropout); for MC dropout,
    :meth:`forward_sampled` runs one sampled network, whose keep-masks come from
    :meth:`dropout_masks` (Gal and Ghahramani, ICML 2016: each stochastic pass is one
    thinned network).
    """

    # class-level attribute types for TorchScript
    hidden_widths: list[int]
    dropout_layers: list[int]
    # MC-dropout seeds: torch's CPU generator keeps the low 32 bits of a seed; this range
    # is also a LAMMPS integer's
    SEED_LIMIT: Final[int] = 2**31

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
        self.dropout = float(dropout)
        self.hidden_widths = [int(h) for h in hidden]
        # positions of the dropout layers in `layers`, one per hidden layer
        self.dropout_layers = [
            index for index, layer in enumerate(layers) if isinstance(layer, torch.nn.Dropout)
        ]
        self.register_buffer("feature_mean", torch.zeros(num_features))
        self.register_buffer("feature_scale", torch.ones(num_features))
        self.register_buffer("ldos_scale", torch.ones(()))

    def scaled(self, descriptors: torch.Tensor) -> torch.Tensor:
        """The network output: LDOS / ldos_scale (what the loss compares)."""
        return self.layers((descriptors - self.feature_mean) / self.feature_scale)

    def forward(self, descriptors: torch.Tensor) -> torch.Tensor:
        return self.scaled(descriptors) * self.ldos_scale

    @torch.jit.export
    def dropout_masks(self, seed: int, pass_index: int) -> list[torch.Tensor]:
        """The keep-masks of sampled network ``pass_index`` of ``seed``, one per hidden
        layer (float64, on the CPU): each unit kept with probability 1 - p, kept units
        scaled by 1 / (1 - p) (inverted dropout). A CPU generator (Mersenne Twister)
        seeded with ``seed`` draws torch.rand([pass_index + 1, sum of hidden widths]); row
        ``pass_index`` (u < p: dropped), split by layer, is the pass's. So pass t depends on
        (seed, t) alone, and Python and the pair style's libtorch, running this same code,
        draw identical masks."""
        if self.dropout == 0.0:
            raise ValueError(
                "the network has no dropout layers: MC dropout needs a network trained "
                "with dropout > 0"
            )
        if not (0 <= seed < self.SEED_LIMIT and pass_index >= 0):
            raise ValueError(
                f"MC dropout needs 0 <= seed < 2^31 and pass >= 0, got seed {seed}, "
                f"pass {pass_index}"
            )
        # TorchScript makes this generator one object of the method: seeded on every call,
        # it draws the same masks on every call
        generator = torch.Generator()
        generator.manual_seed(seed)
        units = sum(self.hidden_widths)
        uniform = torch.rand([pass_index + 1, units], generator=generator, dtype=torch.float64)
        keep = (uniform[pass_index] >= self.dropout).to(torch.float64) / (1.0 - self.dropout)
        return list(keep.split(self.hidden_widths))

    @torch.jit.export
    def forward_sampled(
        self, descriptors: torch.Tensor, seed: int, pass_index: int
    ) -> torch.Tensor:
        """LDOS of sampled network ``pass_index`` of ``seed``: :meth:`forward` with each
        dropout layer replaced by its mask from :meth:`dropout_masks`, the same for every
        grid point (one network per pass, whatever the structure's size or MPI split)."""
        masks = self.dropout_masks(seed, pass_index)
        hidden = (descriptors - self.feature_mean) / self.feature_scale
        site = 0
        for index, layer in enumerate(self.layers):
            if site < len(masks) and index == self.dropout_layers[site]:
                hidden = hidden * masks[site].to(hidden)
                site += 1
            else:
                hidden = layer(hidden)
        return hidden * self.ldos_scale


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


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything needed to use a model besides its weights: the model contract.

    Written once by ``mlsurrogate.export`` into both the TorchScript attributes (what
    ``pair_style mlsurrogate`` reads) and ``metadata.json``; read back by
    :meth:`Model.load`. Per-element values follow ``elements`` (LAMMPS types 1, 2, ...).
    ``provenance`` (training data, configs, histories) goes to ``metadata.json`` only.
    """

    elements: tuple[str, ...]
    valence_charges: tuple[float, ...]
    masses: tuple[float, ...]  # g/mol
    grid_spacing_A: float  # of the training data; the default grid of a structure
    descriptor_params: BispectrumParams  # elements = the model's elements
    energies_eV: tuple[float, ...]  # the LDOS energy grid, absolute
    electronic_temperature_K: float
    xc_functional: str  # as QE names it (e.g. "PZ")
    ldos_broadening_kernel: str
    ldos_broadening_eV: float
    # p of the network's dropout layers, what MC dropout samples with; 0 for a network
    # without dropout and for an ensemble (its uncertainty is the members' spread)
    dropout_probability: float
    provenance: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    format: str = MODEL_FORMAT
    format_version: int = MODEL_FORMAT_VERSION

    def __post_init__(self) -> None:
        count = len(self.elements)
        for name in ("valence_charges", "masses"):
            if len(getattr(self, name)) != count:
                raise ValueError(f"ModelSpec.{name} needs one value per element {self.elements}")
        if self.descriptor_params.elements != tuple(self.elements):
            raise ValueError("ModelSpec.descriptor_params.elements must be the model's elements")
        if not 0.0 <= self.dropout_probability < 1.0:
            raise ValueError(
                f"ModelSpec.dropout_probability must be in [0, 1), got {self.dropout_probability}"
            )

    @property
    def cutoff_A(self) -> float:
        """Largest neighbour cutoff of the descriptor kernel: 2 rcutfac R_j over elements j."""
        return 2.0 * float(self.descriptor_params.rcutfac) * max(self.keyword("radius"))

    def keyword(self, name: str) -> Any:
        """A descriptor keyword as the TorchScript attribute holds it (per-element list
        for radius and weight)."""
        value = getattr(self.descriptor_params, name)
        cast = keyword_type(name)
        if name in PER_ELEMENT_KEYWORDS:
            return [
                cast(value[e]) if isinstance(value, dict) else cast(value) for e in self.elements
            ]
        return cast(value)

    def to_json(self) -> str:
        raw = dataclasses.asdict(self)
        raw["descriptor_params"] = dataclasses.asdict(self.descriptor_params)
        raw["provenance"] = dict(self.provenance)
        raw["cutoff_A"] = self.cutoff_A
        return json.dumps(raw, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str) -> "ModelSpec":
        """The spec of ``metadata.json`` text; ValueError naming ``source`` and the
        problem (other format, other version, a missing key: no defaults are assumed)."""
        raw = json.loads(text)
        if raw.get("format") != MODEL_FORMAT:
            raise ValueError(f"{source}: not an mlsurrogate model (format {raw.get('format')!r})")
        if raw.get("format_version") != MODEL_FORMAT_VERSION:
            raise ValueError(
                f"{source}: model format version {raw.get('format_version')}; this mlsurrogate "
                f"reads version {MODEL_FORMAT_VERSION}: {_REEXPORT}"
            )
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [name for name in names if name not in raw]
        missing += [
            f"descriptor_params.{k}"
            for k in (*DESCRIPTOR_KEYWORDS, "elements")
            if k not in raw.get("descriptor_params", {})
        ]
        if missing:
            raise ValueError(f"{source}: metadata.json has no {', '.join(missing)}: {_REEXPORT}")
        values = {name: raw[name] for name in names}
        values["descriptor_params"] = params_from_json(json.dumps(raw["descriptor_params"]))
        for name in ("elements", "valence_charges", "masses", "energies_eV"):
            values[name] = tuple(values[name])
        return cls(**values)


class SurrogateModel(torch.nn.Module):
    """Network + energy functional + the spec as typed attributes; TorchScript-exportable.

    The attribute names and types are the interface with the C++ pair style:
    format, format_version, elements, valence_charges, masses, grid_spacing, cutoff,
    the descriptor keywords (names of the BispectrumParams fields; radius and weight per
    model element), dropout_probability and metadata_json. A network with dropout offers
    ``network.forward_sampled`` (MC dropout, :meth:`LdosNetwork.forward_sampled`).
    """

    # class-level attribute types for TorchScript (this module has no postponed
    # annotations: TorchScript cannot resolve class annotations given as strings)
    elements: list[str]
    valence_charges: list[float]
    masses: list[float]
    radius: list[float]
    weight: list[float]

    def __init__(
        self, network: LdosNetwork | LdosEnsemble, functional: LdosEnergy, spec: ModelSpec
    ) -> None:
        super().__init__()
        network_dropout = network.dropout if isinstance(network, LdosNetwork) else 0.0
        if network_dropout != spec.dropout_probability:
            raise ValueError(
                f"the spec's dropout_probability {spec.dropout_probability} is not the "
                f"network's {network_dropout} (an ensemble's is 0)"
            )
        self.network = network
        self.functional = functional
        self.format = spec.format
        self.format_version = int(spec.format_version)
        self.elements = list(spec.elements)
        self.valence_charges = [float(z) for z in spec.valence_charges]
        self.masses = [float(m) for m in spec.masses]
        self.grid_spacing = float(spec.grid_spacing_A)
        self.cutoff = float(spec.cutoff_A)
        self.dropout_probability = float(spec.dropout_probability)
        for name in DESCRIPTOR_KEYWORDS:  # as LAMMPS compute sna/grid keywords
            setattr(self, name, spec.keyword(name))
        self.metadata_json = spec.to_json()

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


@contextlib.contextmanager
def _torchscript() -> Iterator[None]:
    """torch 2.13 marks TorchScript deprecated; it stays the format libtorch loads in C++
    without Python (the pair style), so its warnings are silenced here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def save_model(model: SurrogateModel, path: str | os.PathLike[str]) -> Path:
    """Script and save atomically, with ``metadata.json`` as an extra file."""
    check_output_path(path)
    buffer = io.BytesIO()
    with _torchscript():
        scripted = torch.jit.script(model)
        torch.jit.save(scripted, buffer, _extra_files={"metadata.json": model.metadata_json})
    return write_bytes_atomically(path, buffer.getvalue())


def file_kind(path: str | os.PathLike[str]) -> str:
    """ "model" (TorchScript archive), "checkpoint" (an mlsurrogate training checkpoint),
    "torch.save" (another torch.save file), "missing" or "other", from the zip contents
    (nothing is unpickled)."""
    if not Path(path).is_file():
        return "missing"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if any(name.endswith("/constants.pkl") or "/code/" in name for name in names):
                return "model"
            pickles = [name for name in names if name.endswith("/data.pkl")]
            if pickles:
                marker = CHECKPOINT_FORMAT.encode()
                return "checkpoint" if marker in archive.read(pickles[0]) else "torch.save"
    except (zipfile.BadZipFile, OSError):
        pass
    return "other"


# what to do when one kind of file is given where another is expected
_WRONG_KIND = {
    ("model", "checkpoint"): "is a training checkpoint, not a model: run "
    "`mlsurrogate export {path} -o model.pt` and use model.pt",
    ("checkpoint", "model"): "is an exported model, not a training checkpoint: give the "
    "checkpoint written by `mlsurrogate train -o CKPT` (a model cannot be trained further "
    "or exported again)",
}


def require_file_kind(path: str | os.PathLike[str], expected: str) -> str:
    """:func:`file_kind` of ``path``; ValueError if it is missing or the other of
    model/checkpoint than ``expected``, saying what to give instead."""
    kind = file_kind(path)
    if kind == "missing":
        raise ValueError(f"{path}: no such {expected} file")
    advice = _WRONG_KIND.get((expected, kind))
    if advice:
        raise ValueError(f"{path} {advice.format(path=path)}")
    return kind


def _load(path: str | os.PathLike[str], device: str, extra: dict[str, Any]) -> Any:
    with _torchscript():
        return torch.jit.load(str(path), map_location=device, _extra_files=extra)


def _read_model(path: str | os.PathLike[str], device: str) -> tuple[Any, ModelSpec, str]:
    """(module, spec, metadata.json text) of an exported model; ValueError naming the
    file and what to do for anything else."""
    if require_file_kind(path, "model") != "model":
        raise ValueError(f"{path}: not a TorchScript model file written by `mlsurrogate export`")
    extra = {"metadata.json": ""}
    try:
        module = _load(path, device, extra)
    except (RuntimeError, ValueError, OSError) as exc:
        raise ValueError(f"{path}: not a readable TorchScript model ({exc})") from exc
    if not extra["metadata.json"]:
        raise ValueError(f"{path}: no metadata.json: not an mlsurrogate model")
    spec = ModelSpec.from_json(extra["metadata.json"], str(path))
    if getattr(module, "format_version", None) != spec.format_version:
        raise ValueError(f"{path}: its attributes and metadata.json disagree: {_REEXPORT}")
    return module, spec, extra["metadata.json"]


def load_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``metadata.json`` of an exported model (checked like :meth:`Model.load`)."""
    return json.loads(_read_model(path, "cpu")[2])


_SCRIPT_ERROR = re.compile(r"builtins\.(\w+Error): (.*)", re.DOTALL)


def model_error_message(exc: BaseException) -> str:
    """The user-facing text of an error raised inside a model's TorchScript code: the
    original message without the interpreter traceback, and for an LDOS that holds too
    few electrons or a Fermi level outside the energy grid, what it means."""
    text = str(exc)
    found = _SCRIPT_ERROR.search(text)
    message = found.group(2).strip().splitlines()[0] if found else text.strip().splitlines()[-1]
    if "fewer than N_val" in message or "does not cover mu" in message:
        return (
            f"the predicted LDOS is unphysical ({message}): the grid may be too coarse "
            "(use the model's grid spacing or finer) or the structure outside the training "
            "data"
        )
    return message


def check_dropout_passes(passes: int, seed: int) -> None:
    """ValueError unless ``passes`` is 0 (no MC dropout) or >= 2 (one sampled network has
    no spread) and ``seed`` is in [0, 2^31) (:meth:`LdosNetwork.dropout_masks`)."""
    if passes < 0 or passes == 1:
        raise ValueError(f"dropout_passes must be 0 or >= 2, got {passes}")
    if not 0 <= seed < LdosNetwork.SEED_LIMIT:
        raise ValueError(f"the MC-dropout seed must be in [0, 2^31), got {seed}")


def _sampled_network(
    network: Any, seed: int, pass_index: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Sampled network ``pass_index`` of ``seed`` (:meth:`LdosNetwork.forward_sampled`)."""
    return lambda rows: network.forward_sampled(rows, seed, pass_index)


@dataclasses.dataclass(frozen=True)
class Uncertainty:
    """The spread of a prediction over ensemble members or MC-dropout passes, each taken
    through the energy functional and the adjoint on its own (not only the mean LDOS).
    Deviations follow deepmd-kit's model deviation: the force deviation of an atom is
    sqrt(<|F - <F>|^2>) over members, the energy deviation the standard deviation of A/N."""

    free_energies: np.ndarray  # (members,) A of each member, eV
    fermi_levels: np.ndarray  # (members,) eV
    forces: np.ndarray  # (members, natoms, 3) eV/A
    dos: np.ndarray  # (members, nE) states/eV

    @property
    def energy_per_atom(self) -> float:
        """Standard deviation of A / N over the members, eV/atom."""
        return float(np.std(self.free_energies) / self.forces.shape[1])

    @property
    def atom_force_deviation(self) -> np.ndarray:
        """(natoms,) sqrt(<|F_i - <F_i>|^2>), eV/A."""
        spread = self.forces - self.forces.mean(axis=0)
        return np.sqrt((spread**2).sum(axis=2).mean(axis=0))

    @property
    def max_force_deviation(self) -> float:
        return float(self.atom_force_deviation.max())

    @property
    def fermi_level(self) -> float:
        """Standard deviation of the Fermi level over the members, eV."""
        return float(np.std(self.fermi_levels))

    @property
    def dos_deviation(self) -> np.ndarray:
        """(nE,) standard deviation of D(e) over the members, states/eV."""
        return self.dos.std(axis=0)


@dataclasses.dataclass(frozen=True)
class Prediction:
    """What a model predicts for one structure on one grid (eV, A)."""

    ldos: np.ndarray  # [nx, ny, nz, nE] 1/(eV A^3)
    dos: np.ndarray  # [nE] states/eV on the model's energy grid
    terms: dict[str, float]  # the functional's terms per cell, mu, electrons, ion_ion, A
    electronic_forces: np.ndarray  # (natoms, 3): -d(A - E_ii)/dR
    electronic_strain_derivative: np.ndarray  # (3, 3): d(A - E_ii)/d(eps)
    electronic_atom_energies: np.ndarray  # (natoms,): A - E_ii per atom (pair style rule)
    ion_ion: IonIon
    uncertainty: Uncertainty | None = None  # the members' spread, when asked for

    @property
    def free_energy(self) -> float:
        """A = A_el + E_ii, the energy whose negative gradient the forces are."""
        return self.terms["free_energy"]

    @property
    def forces(self) -> np.ndarray:
        return self.electronic_forces + self.ion_ion.forces

    @property
    def strain_derivative(self) -> np.ndarray:
        """dA/d(eps), symmetric (3, 3), for atoms, grid and cell deformed together (the
        E_ii virial W = sum r (x) f is -dE_ii/deps)."""
        total = self.electronic_strain_derivative - self.ion_ion.virial
        return 0.5 * (total + total.T)

    @property
    def atom_energies(self) -> np.ndarray:
        """A per atom: the pair style's split of A - E_ii plus LAMMPS's E_ii per atom."""
        return self.electronic_atom_energies + self.ion_ion.atom_energies


@dataclasses.dataclass(frozen=True)
class _ElectronicPass:
    """One network's pass through the functional's steps (docs/energy-functional.md)."""

    ldos: torch.Tensor  # [points, nE] float64
    dos: torch.Tensor
    mu: torch.Tensor
    density: torch.Tensor  # [nx, ny, nz]
    terms: dict[str, float]
    phi_strain: torch.Tensor  # 3 x 3
    fermi_shift: float
    beta: np.ndarray  # dA/dB, shaped like the descriptors


class Model:
    """An exported model in Python: LDOS, energies and metadata for ``ase.Atoms``.

    Errors from the model's TorchScript code (torch.jit.Error, e.g. an unphysical predicted
    LDOS) surface as ValueError with :func:`model_error_message`'s text.
    """

    def __init__(self, module: torch.jit.ScriptModule, spec: ModelSpec, path: Path):
        self.module = module
        self.spec = spec
        self.path = path

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str = "cpu") -> "Model":
        module, spec, _ = _read_model(path, device)
        return cls(module, spec, Path(path))

    @property
    def metadata(self) -> dict[str, Any]:
        """``metadata.json`` as a dict (the spec's fields, cutoff_A and provenance)."""
        return json.loads(self.spec.to_json())

    @property
    def params(self) -> BispectrumParams:
        return self.spec.descriptor_params

    @property
    def energies(self) -> np.ndarray:
        return np.asarray(self.spec.energies_eV)

    def default_grid(self, atoms: ase.Atoms) -> tuple[int, int, int]:
        """Grid points per cell vector at the model's training grid spacing."""
        return grid_for_spacing(atoms.cell, self.spec.grid_spacing_A)

    def _check_elements(self, atoms: ase.Atoms) -> None:
        unknown = sorted(set(atoms.get_chemical_symbols()) - set(self.spec.elements))
        if unknown:
            raise ValueError(
                f"{self.path}: the model knows elements {list(self.spec.elements)}, not {unknown}"
            )

    def _valence(self, atoms: ase.Atoms) -> np.ndarray:
        charges = dict(zip(self.spec.elements, self.spec.valence_charges))
        return np.array([charges[s] for s in atoms.get_chemical_symbols()])

    def predict_ldos_from_descriptors(self, descriptors: np.ndarray) -> np.ndarray:
        """LDOS [..., nE] from descriptors [..., K] (float64)."""
        flat = torch.as_tensor(descriptors.reshape(-1, descriptors.shape[-1]), dtype=torch.float64)
        with torch.no_grad():
            ldos = self.module(flat.to(next(self.module.network.parameters())))
        return ldos.double().cpu().numpy().reshape(*descriptors.shape[:-1], -1)

    def _descriptors(
        self, atoms: ase.Atoms, grid: tuple[int, int, int] | None, threads: int | None = None
    ) -> np.ndarray:
        """Descriptors on ``grid`` (default: the model's spacing), after the element and
        memory checks (descriptors and LDOS of every point are held at once)."""
        self._check_elements(atoms)
        grid = grid or self.default_grid(atoms)
        width = num_descriptors(self.params, len(self.spec.elements)) + len(self.spec.energies_eV)
        check_grid_fits_memory(int(np.prod(grid)), width, f"{self.path} on grid {tuple(grid)}")
        return compute_grid_descriptors(atoms, grid, self.params, threads=threads)

    def predict_ldos(
        self, atoms: ase.Atoms, grid: tuple[int, int, int] | None = None
    ) -> np.ndarray:
        """LDOS [nx, ny, nz, nE] in 1/(eV A^3) on ``grid`` (default: the model's spacing)."""
        return self.predict_ldos_from_descriptors(self._descriptors(atoms, grid))

    def _inputs(
        self, atoms: ase.Atoms, grid: tuple[int, int, int] | None, threads: int | None
    ) -> tuple[tuple[int, int, int], np.ndarray, torch.Tensor, torch.Tensor]:
        """(grid, descriptors, their rows on the network's device and dtype, cell)."""
        grid = tuple(grid or self.default_grid(atoms))
        descriptors = self._descriptors(atoms, grid, threads)
        weights = next(self.module.network.parameters())  # the network's device and dtype
        rows = torch.as_tensor(descriptors.reshape(-1, descriptors.shape[-1])).to(weights)
        cell = torch.as_tensor(np.asarray(atoms.cell), dtype=torch.float64, device=weights.device)
        return grid, descriptors, rows, cell

    def _electronic_pass(
        self,
        network: Any,
        rows: torch.Tensor,
        shape: tuple[int, ...],
        cell: torch.Tensor,
        electrons: float,
    ) -> _ElectronicPass:
        """LDOS of ``network`` and the functional's steps 1-3, then dA/dLDOS at fixed N_val
        back-propagated through the same forward pass to beta = dA/dB (equal to the
        exported ``descriptor_gradient``, which the pair style calls)."""
        grid = shape[:3]
        inputs = rows.detach().requires_grad_(True)
        output = network(inputs)
        ldos = output.detach().double()
        voxel = abs(float(torch.linalg.det(cell))) / float(np.prod(grid))
        functional = self.module.functional
        try:
            dos = functional.dos(ldos, voxel)
            mu = functional.fermi_level(dos, electrons)
            density = functional.density(ldos, mu).reshape(grid)
            terms, phi, phi_strain = functional.global_terms(dos, density, cell, mu)
        except (RuntimeError, torch.jit.Error) as exc:
            raise ValueError(f"{self.path}: {model_error_message(exc)}") from exc
        phi_rows = phi.reshape(-1)
        fermi_shift = functional.fermi_shift_part(ldos, mu, phi_rows)
        ldos_gradient = functional.ldos_gradient(mu, phi_rows, dos, fermi_shift, voxel)
        (beta,) = torch.autograd.grad([output], [inputs], [ldos_gradient.to(output)])
        return _ElectronicPass(
            ldos=ldos,
            dos=dos,
            mu=mu,
            density=density,
            terms={key: float(value) for key, value in terms.items()},
            phi_strain=phi_strain,
            fermi_shift=float(fermi_shift),
            beta=beta.double().cpu().numpy().reshape(shape),
        )

    def predict(
        self,
        atoms: ase.Atoms,
        grid: tuple[int, int, int] | None = None,
        threads: int | None = None,
        uncertainty: bool = False,
        dropout_passes: int = 0,
        seed: int = 0,
    ) -> Prediction:
        """Everything the pair style computes (``PairMLSurrogate::compute``), in one process
        and with the same pieces: the network in its dtype on its device, the functional's
        steps in float64 (docs/energy-functional.md), dA/dLDOS at fixed N_val
        back-propagated to beta = dA/dB, the adjoint kernel for forces and the strain
        derivative, E_ii by LAMMPS's Ewald sum. The electronic strain derivative is
        sum_r beta dB/deps + (E_band - TS) I + dPhi/deps|_n - c N_val / D(mu) I.
        ``grid`` defaults to the model's spacing; ``threads`` is the kernel's thread count.
        With ``uncertainty``, also the members' (or ``dropout_passes`` sampled networks')
        spread (:meth:`predict_uncertainty`) from the same descriptors and E_ii."""
        networks = self._uncertainty_networks(dropout_passes, seed) if uncertainty else []
        grid, descriptors, rows, cell = self._inputs(atoms, grid, threads)
        valence = self._valence(atoms)
        electrons = float(valence.sum())
        step = self._electronic_pass(self.module, rows, descriptors.shape, cell, electrons)
        gradients = descriptor_gradients(atoms, grid, self.params, step.beta, threads=threads)
        values = dict(step.terms)
        c = values["edos_at_mu"] + step.fermi_shift
        isotropic = values["band_free"] - c * electrons / values["dos_at_mu"]
        symmetric = 0.5 * (step.phi_strain + step.phi_strain.T).cpu().numpy()
        explicit = symmetric + isotropic * np.eye(3)

        functional = self.module.functional
        voxel = abs(float(torch.linalg.det(cell))) / float(np.prod(grid))
        points = functional.band_free_points(step.ldos, step.mu, voxel).reshape(grid)
        points = (points + functional.potential_points(step.density, cell)).cpu().numpy()
        shares, unclaimed = partition_to_atoms(atoms, grid, self.params, points[..., None])
        ion_ion = ion_ion_energy(atoms, dict(zip(self.spec.elements, self.spec.valence_charges)))
        values["ion_ion"] = ion_ion.energy
        values["free_energy"] = values["electronic"] + ion_ion.energy
        spread = None
        if uncertainty:
            inputs = (grid, descriptors, rows, cell)
            spread = self._spread(atoms, networks, threads, ion_ion, inputs)
        return Prediction(
            ldos=step.ldos.cpu().numpy().reshape(*grid, -1),
            dos=step.dos.cpu().numpy(),
            terms=values,
            electronic_forces=gradients.forces,
            electronic_strain_derivative=gradients.strain_derivative + explicit,
            electronic_atom_energies=shares[:, 0] + unclaimed[0] * valence / electrons,
            ion_ion=ion_ion,
            uncertainty=spread,
        )

    @property
    def ensemble_size(self) -> int:
        """Networks of an ensemble model; 1 for a single network."""
        network = self.module.network
        return len(list(network.members.children())) if hasattr(network, "members") else 1

    def has_dropout(self) -> bool:
        """Whether the model's network can be sampled for MC dropout (a single network
        trained with dropout > 0)."""
        return self.spec.dropout_probability > 0.0

    def predict_uncertainty(
        self,
        atoms: ase.Atoms,
        grid: tuple[int, int, int] | None = None,
        dropout_passes: int = 0,
        seed: int = 0,
        threads: int | None = None,
    ) -> Uncertainty:
        """Each ensemble member's energy, Fermi level, DOS and forces, each through the
        functional and the adjoint; or, with ``dropout_passes`` T >= 2, those of T sampled
        networks of a network trained with dropout (MC dropout: pass t is
        ``LdosNetwork.forward_sampled(rows, seed, t)``, one keep-mask per hidden unit for
        all grid points; the same ``seed`` gives the same networks)."""
        networks = self._uncertainty_networks(dropout_passes, seed)
        ion_ion = ion_ion_energy(atoms, dict(zip(self.spec.elements, self.spec.valence_charges)))
        inputs = self._inputs(atoms, grid, threads)
        return self._spread(atoms, networks, threads, ion_ion, inputs)

    def _uncertainty_networks(
        self, dropout_passes: int, seed: int
    ) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """The networks whose spread is the uncertainty; ValueError if there is none."""
        network = self.module.network
        if dropout_passes:
            check_dropout_passes(dropout_passes, seed)
            if self.ensemble_size > 1:
                raise ValueError(
                    f"{self.path}: MC dropout samples one network, but this model is an "
                    f"ensemble of {self.ensemble_size}: its uncertainty is the members' "
                    "spread (leave dropout_passes at 0)"
                )
            if not self.has_dropout():
                raise ValueError(
                    f"{self.path}: the network was trained without dropout, so MC dropout "
                    "gives no spread; train with dropout > 0 or export an ensemble"
                )
            return [_sampled_network(network, seed, t) for t in range(dropout_passes)]
        if self.ensemble_size > 1:
            return list(network.members.children())
        raise ValueError(
            f"{self.path}: one network without dropout passes has no uncertainty: export "
            "an ensemble (`mlsurrogate export A.ckpt B.ckpt ... -o model.pt`) or give "
            "dropout_passes for a network trained with dropout"
        )

    def _spread(
        self,
        atoms: ase.Atoms,
        networks: list[Callable[[torch.Tensor], torch.Tensor]],
        threads: int | None,
        ion_ion: IonIon,
        inputs: tuple[tuple[int, int, int], np.ndarray, torch.Tensor, torch.Tensor],
    ) -> Uncertainty:
        """Every network through :meth:`_electronic_pass` and the adjoint."""
        grid, descriptors, rows, cell = inputs
        electrons = float(self._valence(atoms).sum())
        energies, fermi_levels, forces, dos = [], [], [], []
        for network in networks:
            step = self._electronic_pass(network, rows, descriptors.shape, cell, electrons)
            electronic = descriptor_gradients(
                atoms, grid, self.params, step.beta, threads=threads
            ).forces
            energies.append(step.terms["electronic"] + ion_ion.energy)
            fermi_levels.append(step.terms["fermi_level"])
            forces.append(electronic + ion_ion.forces)
            dos.append(step.dos.cpu().numpy())
        return Uncertainty(
            free_energies=np.array(energies),
            fermi_levels=np.array(fermi_levels),
            forces=np.stack(forces),
            dos=np.stack(dos),
        )

    def energy_terms(
        self, atoms: ase.Atoms, ldos: np.ndarray, core: torch.Tensor | None = None
    ) -> dict[str, float]:
        """Energy terms (eV) of a predicted LDOS for ``atoms``, E_ii and A included."""
        charges = dict(zip(self.spec.elements, self.spec.valence_charges))
        cell = torch.as_tensor(np.asarray(atoms.cell), dtype=torch.float64)
        try:
            terms, _ = self.module.functional.evaluate(
                torch.as_tensor(ldos, dtype=torch.float64),
                cell,
                float(self._valence(atoms).sum()),
                False,
                core,
            )
        except (RuntimeError, torch.jit.Error) as exc:
            raise ValueError(f"{self.path}: {model_error_message(exc)}") from exc
        out = {key: float(value) for key, value in terms.items()}
        out["ion_ion"] = ion_ion_energy(atoms, charges).energy
        out["free_energy"] = out["electronic"] + out["ion_ion"]
        return out

    def energy(self, atoms: ase.Atoms, grid: tuple[int, int, int] | None = None) -> float:
        """Total free energy A (eV) of ``atoms``."""
        return self.energy_terms(atoms, self.predict_ldos(atoms, grid))["free_energy"]
