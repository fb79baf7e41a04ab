"""Training LDOS networks on snapshot files, checkpoints, and export.

Mini-batches are grid points drawn across all training snapshots: every epoch visits the
x-planes of all snapshots (the HDF5 chunks) in a random order, a buffer of planes at a
time, and shuffles the points inside each buffer; only the buffer is in memory. The order
depends only on (seed, epoch), and the checkpoint holds the model, optimizer, scheduler
and torch RNG state, so a resumed run continues with exactly the losses of an
uninterrupted one.

Optional energy and force terms (``energy_weight``, ``force_weight``; beyond MALA, which
fits the LDOS only): every ``physics_every`` mini-batches one training snapshot, in turn,
is predicted on a coarse grid (``physics_spacing``), its free energy A and forces
F = -dA/dR go through the energy functional and descriptor derivatives, and
w_E ((A - A_QE) / N)^2 + w_F mean |F - F_QE|^2 is added to that step's loss. The forces
use dB/dR of the coarse grid (central finite differences of the descriptors, computed
once) and dA/dLDOS of the functional at the current prediction (held fixed while
differentiating the loss, a first-order approximation of its parameter gradient; the
loss value itself is exact).

The optional stress term (``stress_weight``) fits the strain derivatives of A to QE's
stress: for each of the six symmetric strains (x -> (I + h S) x of atoms, cell and grid
together) dA/dh = sum_r dA/dB . dB/dh (dB/dh once, by finite differences like dB/dR)
+ the functional's explicit cell dependence (central differences in the cell at fixed
LDOS); the target is -V sigma_QE + W_ii (QE's sign: sigma = -(1/V) dE/deps; W_ii the
E_ii virial). Its parameter gradient is first order, as for the forces.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlsurrogate.data import Snapshot, params_from_json
from mlsurrogate.descriptors import BispectrumParams, compute_grid_descriptors, num_descriptors
from mlsurrogate.evaluate import core_density_of, functional_for
from mlsurrogate.files import atomic_output
from mlsurrogate.ion_ion import ion_ion_energy
from mlsurrogate.model import (
    MODEL_FORMAT,
    MODEL_FORMAT_VERSION,
    LdosEnsemble,
    LdosNetwork,
    SurrogateModel,
)
from mlsurrogate.physics import integration_weights
from mlsurrogate.units import GPA_PER_EV_PER_CUBIC_ANGSTROM

CHECKPOINT_FORMAT = "mlsurrogate-checkpoint"
CHECKPOINT_VERSION = 1


@dataclass
class TrainingConfig:
    """Everything a training run depends on (TOML keys have the same names)."""

    train: list[str] = field(default_factory=list)
    validation: list[str] = field(default_factory=list)
    hidden: list[int] = field(default_factory=lambda: [400, 400])
    activation: str = "leaky_relu"
    dropout: float = 0.0
    batch_size: int = 1024
    learning_rate: float = 1e-3
    max_epochs: int = 100
    patience: int = 10  # epochs without validation improvement before stopping
    lr_patience: int = 3  # epochs on a plateau before the learning rate is cut
    lr_factor: float = 0.5
    buffer_planes: int = 64
    seed: int = 0
    device: str = "cpu"
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    energy_weight: float = 0.0  # 1/eV^2 on (free energy error per atom)^2
    force_weight: float = 0.0  # A^2/eV^2 on the mean squared force error
    # 1/eV^2 on the mean over the six strains of ((dA/deps - target) / N)^2
    stress_weight: float = 0.0
    physics_every: int = 20  # mini-batches between energy/force terms
    physics_start_epoch: int = 0  # LDOS-only epochs first: the terms need a physical LDOS
    # learning rate multiplied by this when the terms start: Adam steps every weight by
    # about the learning rate whatever a term's weight, and weights that only the energy
    # term drives coherently (e.g. output biases) overshoot by hundreds of meV/atom
    physics_lr_factor: float = 0.1
    physics_spacing: float = 0.5  # A, grid of the energy/force terms
    density_weight: float = 0.0  # on (density error / mean density)^2 per grid point
    # decay of an exponential moving average of the weights, which is what is validated,
    # kept as best and exported (0: the weights themselves)
    weight_averaging: float = 0.0
    descriptor_params: dict[str, Any] = field(default_factory=lambda: asdict(BispectrumParams()))

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> TrainingConfig:
        try:
            with open(path, "rb") as handle:
                raw = tomllib.load(handle)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"{path}: cannot read the training config ({exc})") from exc
        flat: dict[str, Any] = {}
        for key, value in raw.items():  # sections are only for readability
            if isinstance(value, dict) and key != "descriptor_params":
                flat.update(value)
            else:
                flat[key] = value
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(flat) - known)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; known: {sorted(known)}")
        base = Path(path).parent
        for key in ("train", "validation"):
            if key in flat:
                flat[key] = [str(base / p) for p in flat[key]]
        return cls(**flat)

    def params(self) -> BispectrumParams:
        raw = dict(self.descriptor_params)
        if raw.get("elements") is not None:
            raw["elements"] = tuple(raw["elements"])
        return BispectrumParams(**raw)

    def validate(self) -> None:
        if not self.train:
            raise ValueError("no training snapshots (train = [...])")
        if not self.validation:
            raise ValueError("no validation snapshots (validation = [...])")
        if self.physics_start_epoch < 0:
            raise ValueError(f"physics_start_epoch must be >= 0, got {self.physics_start_epoch}")
        if not 0.0 < self.physics_lr_factor <= 1.0:
            raise ValueError(f"physics_lr_factor must be in (0, 1], got {self.physics_lr_factor}")
        for key in ("batch_size", "max_epochs", "buffer_planes", "physics_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        for key in ("energy_weight", "force_weight", "stress_weight", "density_weight"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if not self.physics_spacing > 0:
            raise ValueError(f"physics_spacing must be > 0 A, got {self.physics_spacing}")
        if not 0.0 <= self.weight_averaging < 1.0:
            raise ValueError(f"weight_averaging must be in [0, 1), got {self.weight_averaging}")

    @property
    def uses_physics(self) -> bool:
        return self.energy_weight > 0 or self.force_weight > 0 or self.stress_weight > 0


class SnapshotSource:
    """Lazy per-plane access to a snapshot's descriptors and LDOS.

    Descriptors stored in the file are used if their parameters equal the model's; a
    file without descriptors gets them computed once, in memory.
    """

    def __init__(self, path: str, params: BispectrumParams) -> None:
        self.path = path
        self.snapshot = Snapshot(path)
        stored = self.snapshot.descriptors
        self._computed: np.ndarray | None = None
        if stored is not None:
            stored_params = params_from_json(stored.attrs["params"])
            if stored_params != params:
                raise ValueError(
                    f"{path}: its descriptors were computed with {asdict(stored_params)}, the "
                    f"model uses {asdict(params)}; run `mlsurrogate data descriptors` with the "
                    "model's parameters"
                )
        else:
            self._computed = compute_grid_descriptors(
                self.snapshot.atoms, self.snapshot.grid_shape, params
            ).astype(np.float32)
        self.grid_shape = self.snapshot.grid_shape

    def plane(self, ix: int) -> tuple[np.ndarray, np.ndarray]:
        """(descriptors, LDOS) of x-plane ix, flattened to [ny * nz, ...], float32."""
        ny, nz = self.grid_shape[1:]
        if self._computed is not None:
            descriptors = self._computed[ix]
        else:
            descriptors = self.snapshot.descriptors[ix]  # type: ignore[index]
        ldos = self.snapshot.ldos[ix]
        return descriptors.reshape(ny * nz, -1), ldos.reshape(ny * nz, -1).astype(np.float32)

    def all_points(self) -> tuple[np.ndarray, np.ndarray]:
        planes = [self.plane(ix) for ix in range(self.grid_shape[0])]
        return np.concatenate([p[0] for p in planes]), np.concatenate([p[1] for p in planes])


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
    return (integration_weights(functional.energies, mu) * volume / electrons).numpy()


def point_loss(
    network: LdosNetwork,
    x: torch.Tensor,
    y: torch.Tensor,
    density_rows: torch.Tensor | None,
    density_weight: float,
) -> torch.Tensor:
    """Mean squared LDOS error (in units of the output scale), plus ``density_weight``
    times the mean squared relative density error when ``density_rows`` (each point's
    ``density_weights``) are given."""
    error = network.scaled(x) - y / network.ldos_scale
    loss = (error**2).mean()
    if density_rows is not None:
        density_error = (error * density_rows).sum(1) * network.ldos_scale
        loss = loss + density_weight * (density_error**2).mean()
    return loss


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


@dataclass
class PhysicalTarget:
    """What a validation snapshot needs for energy errors (computed once)."""

    natoms: int
    electrons: float
    cell: torch.Tensor
    core: torch.Tensor | None
    e_ii: float
    ii_forces: np.ndarray  # [natoms, 3] eV/A
    ii_virial: np.ndarray  # [3, 3] eV, -dE_ii/deps
    qe_stress: np.ndarray  # [3, 3] eV/A^3, QE's sign: -(1/V) dE/deps
    qe_band: float
    qe_total: float
    qe_fermi: float


def physical_target(source: SnapshotSource) -> PhysicalTarget:
    snap = source.snapshot
    attrs = snap.attrs
    ion_ion = ion_ion_energy(snap.atoms, attrs["valence_charges"])
    return PhysicalTarget(
        natoms=len(snap.atoms),
        electrons=float(attrs["num_valence_electrons"]),
        cell=torch.as_tensor(np.asarray(snap.atoms.cell), dtype=torch.float64),
        core=core_density_of(snap),
        e_ii=ion_ion.energy,
        ii_forces=ion_ion.forces,
        ii_virial=ion_ion.virial,
        qe_stress=snap.reference("stress"),
        qe_band=attrs["energy_band_eV"],
        qe_total=attrs["energy_total_eV"],
        qe_fermi=attrs["fermi_energy_eV"],
    )


def energy_errors(
    network: LdosNetwork,
    functional: Any,
    source: SnapshotSource,
    target: PhysicalTarget,
    device: str,
) -> dict[str, float]:
    """Band energy, total free energy (meV/atom) and Fermi level (meV) errors vs QE;
    NaN while the predicted LDOS is unphysical (e.g. holds fewer than N_val electrons)."""
    x, _ = source.all_points()
    with torch.no_grad():
        ldos = network(torch.as_tensor(x, device=device)).double().cpu()
    ldos = ldos.reshape(*source.grid_shape, -1)
    try:
        terms, _ = functional.evaluate(ldos, target.cell, target.electrons, False, target.core)
    except (ValueError, RuntimeError):  # TorchScript-style errors surface as RuntimeError
        return {key: math.nan for key in ("band_meV_atom", "total_meV_atom", "fermi_meV")}
    scale = 1000.0 / target.natoms
    return {
        "band_meV_atom": (float(terms["band"]) - target.qe_band) * scale,
        "total_meV_atom": (float(terms["electronic"]) + target.e_ii - target.qe_total) * scale,
        "fermi_meV": (float(terms["fermi_level"]) - target.qe_fermi) * 1000.0,
    }


@dataclass
class PhysicsTarget:
    """A snapshot on a coarse grid, for the energy and force terms of the loss."""

    reference: PhysicalTarget  # cell, electron count, QE and E_ii values
    descriptors: torch.Tensor  # [P, K]
    jacobian: torch.Tensor  # [P, K, 3N]: dB/dR at the P coarse grid points
    grid: tuple[int, int, int]
    electronic_forces: torch.Tensor  # F_QE - F_ii [3N] (eV/A)
    # dB/dh [P, K, 6] for the strains of STRAINS (None: no stress term)
    strain_jacobian: torch.Tensor | None
    electronic_strain_derivative: torch.Tensor  # target dA/dh [6]: -V sigma_QE + W_ii (eV)

    @property
    def electronic_energy(self) -> float:
        """A_QE - E_ii (eV)."""
        return self.reference.qe_total - self.reference.e_ii


# The six symmetric strains of the stress term, LAMMPS's Voigt order xx yy zz xy xz yz.
STRAINS = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))
STRAIN_STEP = 1e-4  # of the functional's central differences in the cell (float64)


def strain_matrix(component: int) -> np.ndarray:
    """S of x -> (I + h S) x: dE/dh = dE/deps_ab for a symmetric strain (ab = ba)."""
    a, b = STRAINS[component]
    matrix = np.zeros((3, 3))
    matrix[a, b] = matrix[b, a] = 1.0 if a == b else 0.5
    return matrix


def strained(atoms: Any, component: int, h: float) -> Any:
    """A copy of ``atoms`` with atoms and cell deformed by I + h S (fractional
    coordinates, hence the grid, move with the cell)."""
    moved = atoms.copy()
    deformation = np.eye(3) + h * strain_matrix(component)
    moved.set_cell(np.asarray(atoms.cell) @ deformation.T, scale_atoms=True)
    return moved


def physics_target(
    source: SnapshotSource,
    reference: PhysicalTarget,
    params: BispectrumParams,
    spacing: float,
    device: str,
    with_stress: bool = False,
) -> PhysicsTarget:
    if reference.core is not None:
        raise ValueError(
            f"{source.path}: the energy/force terms of the loss do not handle core-corrected "
            "pseudopotentials yet; set energy_weight = force_weight = 0"
        )
    atoms = source.snapshot.atoms
    lengths = np.linalg.norm(np.asarray(atoms.cell), axis=1)
    grid = tuple(max(2, int(round(length / spacing))) for length in lengths)
    step = 1e-4  # A (or strain); descriptors are smooth, central differences good to ~1e-8

    def derivative(move: Any) -> np.ndarray:
        """d(descriptors)/d(step) [P, K] for ``move(atoms, signed step)``."""
        shifted = []
        for sign in (1.0, -1.0):
            values = compute_grid_descriptors(move(atoms, sign * step), grid, params)
            shifted.append(values.reshape(-1, values.shape[-1]))
        return ((shifted[0] - shifted[1]) / (2 * step)).astype(np.float32)

    def displaced(coordinate: int) -> Any:
        def move(atoms: Any, delta: float) -> Any:
            moved = atoms.copy()
            moved.positions[coordinate // 3, coordinate % 3] += delta
            return moved

        return move

    jacobian = np.stack([derivative(displaced(c)) for c in range(3 * len(atoms))], axis=-1)
    strain_jacobian = None
    if with_stress:
        strain_jacobian = torch.as_tensor(
            np.stack(
                [
                    derivative(lambda atoms, h, c=c: strained(atoms, c, h))
                    for c in range(len(STRAINS))
                ],
                axis=-1,
            ),
            device=device,
        )
    descriptors = compute_grid_descriptors(atoms, grid, params)  # float64: small
    forces = source.snapshot.reference("forces") - reference.ii_forces
    volume = abs(float(np.linalg.det(np.asarray(atoms.cell))))
    strain_target = [
        -volume * reference.qe_stress[a, b] + reference.ii_virial[a, b] for a, b in STRAINS
    ]
    return PhysicsTarget(
        reference=reference,
        descriptors=torch.as_tensor(descriptors.reshape(-1, descriptors.shape[-1]), device=device),
        jacobian=torch.as_tensor(jacobian, device=device),
        grid=grid,
        electronic_forces=torch.as_tensor(forces.reshape(-1), dtype=torch.float32, device=device),
        strain_jacobian=strain_jacobian,
        electronic_strain_derivative=torch.as_tensor(strain_target, dtype=torch.float64),
    )


@dataclass
class CoarsePrediction:
    """The network's free energy and its derivatives on a target's coarse grid."""

    energy: float  # electronic free energy A (eV)
    forces: torch.Tensor  # -dA/dR [3N] (eV/A), with graph
    linear: torch.Tensor  # sum_r dA/dd(r) . d(r): its parameter gradient is dA/dtheta
    ldos: torch.Tensor  # [P, E], with graph
    beta: torch.Tensor  # dA/dB [P, K] at the fixed cell, with graph


def predicted_energy_forces(
    network: LdosNetwork, functional: Any, target: PhysicsTarget
) -> CoarsePrediction | None:
    """A, forces and the pieces the stress term reuses; None while the predicted LDOS is
    unphysical (e.g. holds fewer than N_val electrons). Graphs are kept, so losses on
    the forces can be back-propagated (dA/dLDOS held fixed)."""
    dtype = network.feature_mean.dtype
    x = target.descriptors.detach().to(dtype).requires_grad_(True)
    ldos = network(x)
    try:
        # the functional differentiates internally (v_xc): a detached copy, not no_grad
        terms, gradient = functional.evaluate(
            ldos.detach().double().cpu().reshape(*target.grid, -1),
            target.reference.cell,
            target.reference.electrons,
            True,
        )
    except (ValueError, RuntimeError):  # TorchScript-style errors surface as RuntimeError
        return None
    linear = (gradient.detach().reshape(ldos.shape).to(ldos) * ldos).sum()
    beta = torch.autograd.grad(linear, x, create_graph=True)[0]  # dA/dB at every point
    forces = -torch.einsum("pk,pkc->c", beta, target.jacobian.to(dtype))
    return CoarsePrediction(float(terms["electronic"]), forces, linear, ldos, beta)


def predicted_strain_derivatives(
    prediction: CoarsePrediction, functional: Any, target: PhysicsTarget
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """dA/dh (eV, float64 [6]) for the strains of STRAINS and a tensor [6] whose parameter
    gradient is that of dA/dh (first order, as for the forces); None while the LDOS is
    unphysical in a strained cell.

    dA/dh = sum_r beta(r) . dB(r)/dh + dA/dh|_LDOS: the descriptor part exactly, the
    explicit cell part (voxel volume, Hartree and gradient terms, mu at fixed N_val) by
    central differences of the functional alone, all in float64."""
    assert target.strain_jacobian is not None
    ldos, cell = prediction.ldos, target.reference.cell
    fixed = ldos.detach().double().cpu().reshape(*target.grid, -1)
    descriptor_part = torch.einsum(
        "pk,pkc->c", prediction.beta, target.strain_jacobian.to(ldos.dtype)
    )
    explicit, explicit_graph = [], []
    for component in range(len(STRAINS)):
        energies, linears = [], []
        for sign in (1.0, -1.0):
            deformation = torch.eye(3, dtype=cell.dtype) + sign * STRAIN_STEP * torch.as_tensor(
                strain_matrix(component), dtype=cell.dtype
            )
            try:
                terms, gradient = functional.evaluate(
                    fixed, cell @ deformation.T, target.reference.electrons, True
                )
            except (ValueError, RuntimeError):  # TorchScript-style errors: RuntimeError
                return None
            energies.append(float(terms["electronic"]))
            linears.append((gradient.reshape(ldos.shape).to(ldos) * ldos).sum())
        explicit.append((energies[0] - energies[1]) / (2.0 * STRAIN_STEP))
        explicit_graph.append((linears[0] - linears[1]) / (2.0 * STRAIN_STEP))
    values = descriptor_part.detach().double().cpu() + torch.tensor(explicit, dtype=torch.float64)
    return values, descriptor_part + torch.stack(explicit_graph)


@dataclass
class PhysicsErrors:
    """A snapshot's errors in the energy, force and stress terms (squared, as fitted)."""

    energy_sq: float  # ((A - A_QE) / N)^2, (eV/atom)^2
    force_mse: float  # mean |F - F_QE|^2, (eV/A)^2
    stress_mse: float  # mean over the strains of ((dA/dh - target) / N)^2; 0 without
    gpa_per_ev_atom: float  # stress (GPa) of 1 eV/atom of dA/dh in this cell

    @property
    def stress_mse_gpa(self) -> float:
        return self.stress_mse * self.gpa_per_ev_atom**2


def physics_loss(
    network: LdosNetwork, functional: Any, target: PhysicsTarget, config: TrainingConfig
) -> tuple[torch.Tensor, PhysicsErrors] | None:
    """The loss term to back-propagate and the errors, or None while the predicted LDOS
    is unphysical."""
    predicted = predicted_energy_forces(network, functional, target)
    if predicted is None:
        return None
    energy, forces, linear = predicted.energy, predicted.forces, predicted.linear
    force_mse = ((forces - target.electronic_forces.to(forces)) ** 2).mean()
    natoms = target.reference.natoms
    energy_error = (energy - target.electronic_energy) / natoms
    # d/dtheta of (energy error)^2 = 2 (error) dA/dtheta / N
    loss = (
        config.energy_weight * 2.0 * energy_error * linear / natoms
        + config.force_weight * force_mse
    )
    stress_mse = 0.0
    if config.stress_weight > 0 and target.strain_jacobian is not None:
        strain = predicted_strain_derivatives(predicted, functional, target)
        if strain is None:
            return None
        values, graphs = strain
        errors = (values - target.electronic_strain_derivative) / natoms  # eV/atom
        # d/dtheta of mean (error)^2 = 2 mean (error d(dA/dh)/dtheta) / N
        loss = loss + config.stress_weight * 2.0 * (errors.to(graphs) * graphs).mean() / natoms
        stress_mse = float(errors.pow(2).mean())
    volume = abs(float(torch.linalg.det(target.reference.cell)))
    return loss, PhysicsErrors(
        energy_sq=energy_error**2,
        force_mse=float(force_mse.detach()),
        stress_mse=stress_mse,
        gpa_per_ev_atom=natoms / volume * GPA_PER_EV_PER_CUBIC_ANGSTROM,
    )


def _loss_over(
    network: LdosNetwork,
    sources: Sequence[SnapshotSource],
    density_table: torch.Tensor | None,
    density_weight: float,
    device: str,
) -> float:
    """``point_loss`` over all points of the sources (each weighted by its points)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for index, source in enumerate(sources):
            x, y = source.all_points()
            rows = None if density_table is None else density_table[index].expand(len(x), -1)
            loss = point_loss(
                network,
                torch.as_tensor(x, device=device),
                torch.as_tensor(y, device=device),
                rows,
                density_weight,
            )
            total += float(loss) * len(x)
            count += len(x)
    return total / count


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_output(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError as exc:
        raise ValueError(f"{path}: no such checkpoint") from exc
    except Exception as exc:  # torch raises many types for damaged files
        raise ValueError(f"{path}: corrupt or unreadable checkpoint ({exc})") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an mlsurrogate checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {state.get('version')} not supported")
    return state


def _network_for(config: TrainingConfig, num_features: int, num_energies: int) -> LdosNetwork:
    return LdosNetwork(num_features, num_energies, config.hidden, config.activation, config.dropout)


def train(
    config: TrainingConfig,
    checkpoint: str | os.PathLike[str],
    *,
    resume: bool = False,
    stop_after_epoch: int | None = None,
    progress: bool = True,
    log: Any = print,
) -> list[dict[str, float]]:
    """Train (or resume) and write ``checkpoint`` after every epoch; return the history.

    ``stop_after_epoch`` ends the run after that epoch (to test resuming).
    """
    from tqdm import tqdm

    config.validate()
    checkpoint = Path(checkpoint)
    if config.threads:
        torch.set_num_threads(config.threads)
    params = config.params()
    train_sources = [SnapshotSource(p, params) for p in config.train]
    validation_sources = [SnapshotSource(p, params) for p in config.validation]
    energies = train_sources[0].snapshot.energies
    for source in train_sources + validation_sources:
        if not np.array_equal(source.snapshot.energies, energies):
            raise ValueError(f"{source.path}: its energy grid differs from {config.train[0]}")
    elements = params.elements or tuple(sorted(set(train_sources[0].snapshot.atoms.symbols)))
    num_features = num_descriptors(params, len(elements))
    if resume:  # before any long set-up work
        state = load_checkpoint(checkpoint)
        if state["config"] != asdict(config):
            raise ValueError(f"{checkpoint}: written with a different config; cannot resume")
    functional = functional_for(validation_sources[0].snapshot)
    targets = [physical_target(s) for s in validation_sources]

    def density_table(sources: list[SnapshotSource]) -> torch.Tensor | None:
        if config.density_weight == 0:
            return None
        rows = np.stack([density_weights(s, functional) for s in sources])
        return torch.as_tensor(rows, dtype=torch.float32, device=config.device)

    train_density, validation_density = (
        density_table(train_sources),
        density_table(validation_sources),
    )
    physics_train: list[PhysicsTarget] = []
    physics_validation: list[PhysicsTarget] = []
    if config.uses_physics:
        log("energy/force terms: descriptor derivatives on the coarse grids (once)")

        def coarse(source: SnapshotSource, reference: PhysicalTarget) -> PhysicsTarget:
            return physics_target(
                source,
                reference,
                params,
                config.physics_spacing,
                config.device,
                with_stress=config.stress_weight > 0,
            )

        physics_train = [
            coarse(s, physical_target(s))
            for s in tqdm(train_sources, desc="dB/dR", disable=not progress, leave=False)
        ]
        physics_validation = [coarse(s, t) for s, t in zip(validation_sources, targets)]

    torch.manual_seed(config.seed)  # the initial weights; a resumed run loads its own
    network = _network_for(config, num_features, len(energies))
    if resume:
        network.load_state_dict(state["network"])
    else:
        fit_scalers(network, train_sources)
    network.to(config.device)
    # the averaged copy (Polyak averaging) smooths the step-to-step noise of SGD, which
    # moves the integrated energies by several meV/atom between epochs
    averaged = (
        torch.optim.swa_utils.AveragedModel(
            network,
            multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(config.weight_averaging),
        )
        if config.weight_averaging > 0
        else None
    )
    evaluated = averaged.module if averaged is not None else network
    optimizer = torch.optim.Adam(network.parameters(), lr=config.learning_rate)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=config.lr_factor, patience=config.lr_patience
    )
    history: list[dict[str, float]] = []
    best_loss, best_state, stale, start_epoch = math.inf, None, 0, 0
    if resume:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if averaged is not None:
            averaged.load_state_dict(state["averaged"])
        torch.set_rng_state(state["torch_rng"])
        history = state["history"]
        best_loss, best_state, stale = state["best_loss"], state["best_network"], state["stale"]
        start_epoch = state["epoch"] + 1

    total_points = sum(int(np.prod(s.grid_shape)) for s in train_sources)
    for epoch in range(start_epoch, config.max_epochs):
        physics = bool(physics_train) and epoch >= config.physics_start_epoch
        if physics and epoch == config.physics_start_epoch:
            for group in optimizer.param_groups:
                group["lr"] *= config.physics_lr_factor
            # a new objective from here: forget the best value and plateau of the old one
            best_loss, stale = math.inf, 0
            scheduler.best, scheduler.num_bad_epochs = scheduler.mode_worse, 0
        network.train()
        running, seen = 0.0, 0
        with tqdm(
            total=total_points, desc=f"epoch {epoch}", unit="pt", disable=not progress, leave=False
        ) as bar:
            for step, (x, y, owner) in enumerate(
                batches(train_sources, config.batch_size, config.buffer_planes, config.seed, epoch)
            ):
                loss = point_loss(
                    network,
                    torch.as_tensor(x, device=config.device),
                    torch.as_tensor(y, device=config.device),
                    None if train_density is None else train_density[torch.as_tensor(owner)],
                    config.density_weight,
                )
                running += loss.item() * len(x)
                if physics and (step + 1) % config.physics_every == 0:
                    turn = (step + 1) // config.physics_every - 1
                    term = physics_loss(
                        network, functional, physics_train[turn % len(physics_train)], config
                    )
                    if term is not None:
                        loss = loss + term[0]
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if averaged is not None:
                    averaged.update_parameters(network)
                seen += len(x)
                bar.update(len(x))
        network.eval()
        evaluated.eval()
        validation_loss = _loss_over(
            evaluated, validation_sources, validation_density, config.density_weight, config.device
        )
        errors = [
            energy_errors(evaluated, functional, s, t, config.device)
            for s, t in zip(validation_sources, targets)
        ]
        objective, force_rmse, stress_rmse = validation_loss, math.nan, math.nan
        if physics:
            checks = [physics_loss(evaluated, functional, t, config) for t in physics_validation]
            if any(c is None for c in checks):  # unphysical LDOS: no energy, no forces
                objective = math.inf
            else:
                found = [c[1] for c in checks]
                energy_mse = float(np.mean([e.energy_sq for e in found]))
                force_mse = float(np.mean([e.force_mse for e in found]))
                stress_mse = float(np.mean([e.stress_mse for e in found]))
                objective += (
                    config.energy_weight * energy_mse
                    + config.force_weight * force_mse
                    + config.stress_weight * stress_mse
                )
                force_rmse = math.sqrt(force_mse)
                if config.stress_weight > 0:
                    stress_rmse = math.sqrt(np.mean([e.stress_mse_gpa for e in found]))
        record = {
            "epoch": epoch,
            "train_loss": running / seen,
            "validation_loss": validation_loss,
            "validation_objective": objective,
            "force_rmse": force_rmse,
            "stress_rmse_GPa": stress_rmse,
            "learning_rate": optimizer.param_groups[0]["lr"],
            **{
                key: float(np.mean([abs(e[key]) for e in errors]))
                for key in ("band_meV_atom", "total_meV_atom", "fermi_meV")
            },
        }
        history.append(record)
        log(
            f"epoch {epoch:4d}  train {record['train_loss']:.3e}  validation "
            f"{validation_loss:.3e}  |dE_band| {record['band_meV_atom']:.2f}  |dA| "
            f"{record['total_meV_atom']:.2f} meV/atom  |dE_F| {record['fermi_meV']:.1f} meV  "
            f"lr {record['learning_rate']:.1e}"
            + (f"  F RMSE {force_rmse:.3f} eV/A" if physics else "")
            + (f"  stress RMSE {stress_rmse:.2f} GPa" if physics and config.stress_weight else "")
        )
        scheduler.step(objective)
        if objective < best_loss:
            best_loss, stale = objective, 0
            best_state = {k: v.detach().cpu().clone() for k, v in evaluated.state_dict().items()}
        else:
            stale += 1
        _save_checkpoint(
            checkpoint,
            {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "config": asdict(config),
                "epoch": epoch,
                "network": {k: v.detach().cpu() for k, v in network.state_dict().items()},
                "averaged": averaged.state_dict() if averaged is not None else None,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "history": history,
                "best_loss": best_loss,
                "best_network": best_state,
                "stale": stale,
                "num_features": num_features,
                "energies": energies,
                "elements": list(elements),
                "snapshot_attrs": _model_attributes(validation_sources[0].snapshot),
            },
        )
        waiting = bool(physics_train) and epoch < config.physics_start_epoch
        if stale >= config.patience and not waiting:
            log(f"early stop: no validation improvement for {config.patience} epochs")
            break
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            break
    return history


def _model_attributes(snap: Snapshot) -> dict[str, Any]:
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


def build_model(
    checkpoints: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    dtype: torch.dtype = torch.float64,
) -> SurrogateModel:
    """The best network of a checkpoint with its functional and metadata; with several
    checkpoints (the same data and descriptors, e.g. different seeds), their ensemble."""
    from mlsurrogate.evaluate import xc_of
    from mlsurrogate.physics import LdosEnergy

    paths = [checkpoints] if isinstance(checkpoints, (str, os.PathLike)) else list(checkpoints)
    if not paths:
        raise ValueError("no checkpoint to export")
    states = [load_checkpoint(path) for path in paths]
    state = states[0]
    config = TrainingConfig(**state["config"])
    networks = []
    for path, other in zip(paths, states):
        for key in ("num_features", "elements", "snapshot_attrs"):
            if other[key] != state[key]:
                raise ValueError(f"{path}: its {key} differ from {paths[0]}'s; cannot ensemble")
        if not np.array_equal(other["energies"], state["energies"]):
            raise ValueError(f"{path}: its energy grid differs from {paths[0]}'s")
        member_config = TrainingConfig(**other["config"])
        if member_config.params() != config.params():
            raise ValueError(f"{path}: its descriptor parameters differ from {paths[0]}'s")
        network = _network_for(member_config, other["num_features"], len(other["energies"]))
        network.load_state_dict(other["best_network"] or other["network"])
        networks.append(network.to(dtype).eval())
    info = state["snapshot_attrs"]
    if any(info["core_correction"].values()):
        raise ValueError("export of models with nonlinear core corrections is not supported yet")
    elements = state["elements"]
    functional = LdosEnergy(
        state["energies"],
        info["electronic_temperature_K"],
        xc_of(info["xc_functional"]),
        info["ldos_broadening_kernel"],
        info["ldos_broadening_eV"],
    )
    metadata = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "elements": elements,
        "descriptor_params": asdict(config.params()),
        "energies_eV": [float(e) for e in state["energies"]],
        "training": [{"config": st["config"], "history": st["history"]} for st in states],
        **info,
    }
    return SurrogateModel(
        networks[0] if len(networks) == 1 else LdosEnsemble(networks),
        functional,
        config.params(),
        elements,
        [info["valence_charges"][e] for e in elements],
        [info["masses"][e] for e in elements],
        info["grid_spacing_A"],
        metadata,
    )
