"""The energy, force and stress terms of the training loss, and their QE targets.

Optional terms (``energy_weight``, ``force_weight``; beyond MALA, which fits the LDOS
only): every ``physics_every`` mini-batches one training snapshot, in turn, is predicted
on a coarse grid (``physics_spacing``), its free energy A and forces F = -dA/dR go
through the energy functional and descriptor derivatives, and
w_E ((A - A_QE) / N)^2 + w_F mean |F - F_QE|^2 is added to that step's loss. The forces
are beta . dB/dR with beta = dA/dB from back-propagation, with dA/dLDOS of the functional
at the current prediction held fixed while differentiating the loss (a first-order
approximation of its parameter gradient; the loss value itself is exact). Two ways to
contract, the same numbers (tested against each other):

* a stored dB/dR (central differences of the descriptors, 6N + 1 evaluations once per
  snapshot; [points, components, 3N] floats: 0.5 GB for 32 atoms on a 0.34 A grid,
  growing as N^2): each step is one product;
* the kernel's adjoint (DescriptorAdjoint, as the pair style does; memory O(points x
  components)): each step contracts beta by the adjoint and, for the loss's parameter
  gradient dL/dbeta = -sum_i (dL/dF_i) . dB/dR_i, differentiates the descriptors along
  dL/dF (one central difference): about five descriptor evaluations per step.

``physics_jacobian_gb`` says how much stored dB/dR the training may hold; snapshots
beyond it use the adjoint (all of them with 0).

The optional stress term (``stress_weight``) fits the strain derivatives of A to QE's
stress: for each of the six symmetric strains (x -> (I + h S) x of atoms, cell and grid
together) dA/dh = sum_r dA/dB . dB/dh (stored like dB/dR, or from the adjoint pass) + the
functional's explicit cell dependence (central differences in the cell at fixed LDOS);
the target is -V sigma_QE + W_ii (QE's sign: sigma = -(1/V) dE/deps; W_ii the E_ii
virial). Its parameter gradient is first order, as for the forces.

The optional Hartree term (``hartree_weight``) fits the Hartree energy of the predicted
density on the coarse grid to QE's printed E_H: w_H ((E_H - E_H,QE) / N)^2, by autograd
through the density at the predicted Fermi level. The free energy subtracts E_H with
nothing to cancel a long-wavelength density error, which E_H weighs by 1/G^2; in cells
whose density varies on the scale of the cell (voids, vacancies, liquids) that error is
most of the free energy's (docs/active-learning.md), and the term targets it alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mlsurrogate.descriptors import (
    BispectrumParams,
    compute_grid_descriptors,
    descriptor_gradients,
    grid_for_spacing,
)
from mlsurrogate.evaluate import core_density_of
from mlsurrogate.ion_ion import ion_ion_energy
from mlsurrogate.model import LdosNetwork
from mlsurrogate.physics import hartree_energy
from mlsurrogate.training.config import TrainingConfig
from mlsurrogate.training.dataset import SnapshotSource
from mlsurrogate.units import COULOMB_EV_ANGSTROM, GPA_PER_EV_PER_CUBIC_ANGSTROM


@dataclass
class SnapshotReference:
    """A snapshot's QE values and E_ii terms: what energy, force and stress errors are
    measured against (computed once)."""

    natoms: int
    electrons: float
    cell: torch.Tensor
    core: torch.Tensor | None
    e_ii: float
    ii_forces: np.ndarray  # [natoms, 3] eV/A
    ii_virial: np.ndarray  # [3, 3] eV, -dE_ii/deps
    qe_stress: np.ndarray  # [3, 3] eV/A^3, QE's sign: -(1/V) dE/deps
    qe_band: float
    qe_hartree: float
    qe_total: float
    qe_fermi: float


def snapshot_reference(source: SnapshotSource) -> SnapshotReference:
    snap = source.snapshot
    attrs = snap.attrs
    ion_ion = ion_ion_energy(snap.atoms, attrs["valence_charges"])
    return SnapshotReference(
        natoms=len(snap.atoms),
        electrons=float(attrs["num_valence_electrons"]),
        cell=torch.as_tensor(np.asarray(snap.atoms.cell), dtype=torch.float64),
        core=core_density_of(snap),
        e_ii=ion_ion.energy,
        ii_forces=ion_ion.forces,
        ii_virial=ion_ion.virial,
        qe_stress=snap.reference("stress"),
        qe_band=attrs["energy_band_eV"],
        qe_hartree=attrs["energy_hartree_eV"],
        qe_total=attrs["energy_total_eV"],
        qe_fermi=attrs["fermi_energy_eV"],
    )


ENERGY_ERROR_KEYS = ("band_meV_atom", "hartree_meV_atom", "total_meV_atom", "fermi_meV")


def energy_errors(
    network: LdosNetwork,
    functional: Any,
    source: SnapshotSource,
    target: SnapshotReference,
    device: str,
) -> dict[str, float]:
    """Band energy, Hartree energy, total free energy (meV/atom) and Fermi level (meV)
    errors vs QE; NaN while the predicted LDOS is unphysical (e.g. holds fewer than N_val
    electrons)."""
    x = source.grid_descriptors()
    with torch.no_grad():
        ldos = network(torch.as_tensor(x, device=device)).double().cpu()
    ldos = ldos.reshape(*source.grid_shape, -1)
    try:
        terms, _ = functional.evaluate(ldos, target.cell, target.electrons, False, target.core)
    except (ValueError, RuntimeError):  # TorchScript-style errors surface as RuntimeError
        return {key: math.nan for key in ENERGY_ERROR_KEYS}
    scale = 1000.0 / target.natoms
    return {
        "band_meV_atom": (float(terms["band"]) - target.qe_band) * scale,
        "hartree_meV_atom": (float(terms["hartree"]) - target.qe_hartree) * scale,
        "total_meV_atom": (float(terms["electronic"]) + target.e_ii - target.qe_total) * scale,
        "fermi_meV": (float(terms["fermi_level"]) - target.qe_fermi) * 1000.0,
    }


@dataclass
class CoarseGridTarget:
    """A snapshot's structure and descriptors on the coarse physics grid, with its
    targets: what the energy, force and stress terms of the loss need."""

    reference: SnapshotReference  # cell, electron count, QE and E_ii values
    atoms: Any  # ase.Atoms: the structure the descriptor derivatives are taken at
    params: BispectrumParams
    descriptors: torch.Tensor  # [P, K]
    # d(forces, dA/dh)/dbeta [P, K, 3N (+ 6 with stress)]: -dB/dR, dB/dh; None: adjoint
    jacobian: torch.Tensor | None
    grid: tuple[int, int, int]
    electronic_forces: torch.Tensor  # F_QE - F_ii [3N] (eV/A)
    with_stress: bool  # whether the stress term fits this snapshot
    electronic_strain_derivative: torch.Tensor  # target dA/dh [6]: -V sigma_QE + W_ii (eV)

    @property
    def electronic_energy(self) -> float:
        """A_QE - E_ii (eV)."""
        return self.reference.qe_total - self.reference.e_ii


# The six symmetric strains of the stress term, LAMMPS's Voigt order xx yy zz xy xz yz.
STRAINS = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))
STRAIN_STEP = 1e-4  # of the functional's central differences in the cell (float64)
# A (or strain): the largest atom move of every central difference of the descriptors,
# the stored dB/dR's and DescriptorAdjoint's backward (descriptors are smooth: ~1e-8)
DESCRIPTOR_STEP = 1e-4


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


def jacobian_bytes(atoms: Any, spacing: float, components: int, with_stress: bool) -> int:
    """Memory of a stored d(forces, dA/dh)/dbeta (float32) on the physics grid."""
    points = int(np.prod(physics_grid(atoms, spacing)))
    columns = 3 * len(atoms) + (len(STRAINS) if with_stress else 0)
    return 4 * points * components * columns


def physics_grid(atoms: Any, spacing: float) -> tuple[int, int, int]:
    # at least 2 points per direction: the functional's gradient terms need a neighbour
    return grid_for_spacing(atoms.cell, spacing, minimum=2)


def descriptor_jacobian(
    atoms: Any, grid: tuple[int, int, int], params: BispectrumParams, with_stress: bool
) -> np.ndarray:
    """-dB/dR per coordinate (and dB/dh per strain) [P, K, 3N (+ 6)], float32, by central
    differences of DESCRIPTOR_STEP."""

    def derivative(move: Any) -> np.ndarray:
        """d(descriptors)/d(step) [P, K] for ``move(atoms, signed step)``."""
        plus, minus = (
            compute_grid_descriptors(move(atoms, sign * DESCRIPTOR_STEP), grid, params)
            for sign in (1, -1)
        )
        difference = (plus - minus) / (2 * DESCRIPTOR_STEP)
        return difference.reshape(-1, plus.shape[-1]).astype(np.float32)

    def displaced(coordinate: int) -> Any:
        def move(atoms: Any, delta: float) -> Any:
            moved = atoms.copy()
            moved.positions[coordinate // 3, coordinate % 3] += delta
            return moved

        return move

    columns = [-derivative(displaced(c)) for c in range(3 * len(atoms))]
    if with_stress:
        columns += [
            derivative(lambda atoms, h, c=c: strained(atoms, c, h)) for c in range(len(STRAINS))
        ]
    return np.stack(columns, axis=-1)


def coarse_grid_target(
    source: SnapshotSource,
    reference: SnapshotReference,
    params: BispectrumParams,
    spacing: float,
    device: str,
    with_stress: bool = False,
    store_jacobian: bool = False,
) -> CoarseGridTarget:
    if reference.core is not None:
        raise ValueError(
            f"{source.path}: the energy/force terms of the loss do not handle core-corrected "
            "pseudopotentials yet; set energy_weight = force_weight = 0"
        )
    atoms = source.snapshot.atoms
    grid = physics_grid(atoms, spacing)
    descriptors = compute_grid_descriptors(atoms, grid, params)  # float64: small
    jacobian = None
    if store_jacobian:
        jacobian = torch.as_tensor(
            descriptor_jacobian(atoms, grid, params, with_stress), device=device
        )
    forces = source.snapshot.reference("forces") - reference.ii_forces
    volume = abs(float(np.linalg.det(np.asarray(atoms.cell))))
    strain_target = [
        -volume * reference.qe_stress[a, b] + reference.ii_virial[a, b] for a, b in STRAINS
    ]
    return CoarseGridTarget(
        reference=reference,
        atoms=atoms,
        params=params,
        descriptors=torch.as_tensor(descriptors.reshape(-1, descriptors.shape[-1]), device=device),
        jacobian=jacobian,
        grid=grid,
        electronic_forces=torch.as_tensor(forces.reshape(-1), dtype=torch.float32, device=device),
        with_stress=with_stress,
        electronic_strain_derivative=torch.as_tensor(strain_target, dtype=torch.float64),
    )


def contract(beta: torch.Tensor, target: CoarseGridTarget) -> torch.Tensor:
    """(F [3N], dA/dh [6]) of beta = dA/dB on the target's grid, differentiable in beta:
    through the stored Jacobian if the target has one, else by the adjoint."""
    if target.jacobian is None:
        return DescriptorAdjoint.apply(beta, target)
    product = torch.einsum("pk,pkc->c", beta, target.jacobian.to(beta.dtype))
    missing = 3 * target.reference.natoms + len(STRAINS) - product.numel()
    return torch.cat([product, product.new_zeros(missing)])  # no strains stored: zeros


class DescriptorAdjoint(torch.autograd.Function):
    """(F [3N], dE/dh [6]) of E = sum_p beta_p . B_p on a target's grid: F = -dE/dR by the
    kernel's adjoint, dE/dh for the strains of STRAINS from the same pass. Linear in beta;
    its backward, dL/dbeta_p = -sum_i g_F,i . dB_p/dR_i + sum_c g_h,c dB_p/dh_c, is the
    derivative of B along the deformation x -> (I + t G)(x - t g_F), G = sum_c g_h,c S_c,
    by a central difference (error ~ step^2: descriptors are smooth)."""

    @staticmethod
    def forward(ctx: Any, beta: torch.Tensor, target: CoarseGridTarget) -> torch.Tensor:
        ctx.target = target
        values = beta.detach().double().cpu().numpy().reshape(*target.grid, -1)
        gradients = descriptor_gradients(target.atoms, target.grid, target.params, values)
        strain = gradients.strain_derivative
        per_strain = [float(np.sum(strain * strain_matrix(c))) for c in range(len(STRAINS))]
        out = np.concatenate([gradients.forces.reshape(-1), per_strain])
        return torch.as_tensor(out, dtype=beta.dtype, device=beta.device)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        target = ctx.target
        atoms = target.atoms
        values = grad.detach().double().cpu().numpy()
        move = -values[: 3 * len(atoms)].reshape(-1, 3)
        deformation = sum(w * strain_matrix(c) for c, w in enumerate(values[3 * len(atoms) :]))
        # the largest atom displacement per unit t: the step is DESCRIPTOR_STEP in it
        size = float(np.abs(move + atoms.positions @ deformation.T).max())
        points, components = target.descriptors.shape
        if size == 0.0:
            return grad.new_zeros(points, components), None
        t = DESCRIPTOR_STEP / size

        def descriptors_at(signed_t: float) -> np.ndarray:
            moved = atoms.copy()
            moved.positions = atoms.positions + signed_t * move
            moved.set_cell(
                np.asarray(atoms.cell) @ (np.eye(3) + signed_t * deformation).T, scale_atoms=True
            )
            return compute_grid_descriptors(moved, target.grid, target.params)

        derivative = (descriptors_at(t) - descriptors_at(-t)) / (2.0 * t)
        return (
            torch.as_tensor(derivative.reshape(points, components), dtype=grad.dtype).to(
                grad.device
            ),
            None,
        )


@dataclass
class CoarsePrediction:
    """The network's free energy and its derivatives on a target's coarse grid."""

    energy: float  # electronic free energy A (eV)
    forces: torch.Tensor  # -dA/dR [3N] (eV/A), with graph
    strain_descriptor_part: torch.Tensor  # sum_r dA/dB . dB/dh [6] (eV), with graph
    linear: torch.Tensor  # sum_r dA/dd(r) . d(r): its parameter gradient is dA/dtheta
    ldos: torch.Tensor  # [P, E], with graph
    fermi_level: float  # eV


def predicted_energy_forces(
    network: LdosNetwork, functional: Any, target: CoarseGridTarget
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
    contracted = contract(beta, target)
    natoms3 = 3 * target.reference.natoms
    return CoarsePrediction(
        float(terms["electronic"]), contracted[:natoms3], contracted[natoms3:], linear, ldos,
        float(terms["fermi_level"]),
    )  # fmt: skip


def predicted_hartree(
    prediction: CoarsePrediction, functional: Any, target: CoarseGridTarget
) -> torch.Tensor:
    """E_H (eV) of the predicted density on the coarse grid, with graph (at the predicted
    Fermi level held fixed). E_H is a long-wavelength quantity: QE's density sampled on a
    0.36 A grid gives QE's E_H to 0.003 meV/atom (32-atom liquid, 48^3 grid)."""
    mu = torch.tensor(prediction.fermi_level, dtype=torch.float64)
    density = functional.density(prediction.ldos.double().cpu(), mu).reshape(target.grid)
    return hartree_energy(density, target.reference.cell, COULOMB_EV_ANGSTROM)


def predicted_strain_derivatives(
    prediction: CoarsePrediction, functional: Any, target: CoarseGridTarget
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """dA/dh (eV, float64 [6]) for the strains of STRAINS and a tensor [6] whose parameter
    gradient is that of dA/dh (first order, as for the forces); None while the LDOS is
    unphysical in a strained cell.

    dA/dh = sum_r beta(r) . dB(r)/dh + dA/dh|_LDOS: the descriptor part exactly, the
    explicit cell part (voxel volume, Hartree and gradient terms, mu at fixed N_val) by
    central differences of the functional alone, all in float64."""
    ldos, cell = prediction.ldos, target.reference.cell
    fixed = ldos.detach().double().cpu()
    ldos_sum = ldos.sum(0)
    descriptor_part = prediction.strain_descriptor_part
    explicit, explicit_graph = [], []
    for component in range(len(STRAINS)):
        energies, linears = [], []
        for sign in (1.0, -1.0):
            deformation = torch.eye(3, dtype=cell.dtype) + sign * STRAIN_STEP * torch.as_tensor(
                strain_matrix(component), dtype=cell.dtype
            )
            deformed = cell @ deformation.T
            voxel = float(torch.abs(torch.linalg.det(deformed))) / len(fixed)
            try:
                terms, phi, mu, dos = functional.solve(
                    fixed, target.grid, voxel, deformed, target.reference.electrons
                )
                phi = phi.reshape(-1)
                shift_part = functional.fermi_shift_part(fixed, mu, phi)
                offset, weights, shift = functional.gradient_factors(mu, dos, shift_part, voxel)
            except (ValueError, RuntimeError):  # TorchScript-style errors: RuntimeError
                return None
            energies.append(float(terms["electronic"]))
            # sum_r,j dA/dd_j(r) d_j(r) (dA/dd of the deformed cell, ``ldos_gradient``), in
            # the factored form: linear in the prediction, so its parameter gradient is A's
            linears.append(
                (offset.to(ldos) * ldos_sum).sum()
                + ((phi - shift).to(ldos) * (ldos @ weights.to(ldos))).sum()
            )
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
    hartree_sq: float  # ((E_H - E_H,QE) / N)^2, (eV/atom)^2; 0 without the term
    gpa_per_ev_atom: float  # stress (GPa) of 1 eV/atom of dA/dh in this cell

    @property
    def stress_mse_gpa(self) -> float:
        return self.stress_mse * self.gpa_per_ev_atom**2


def physics_loss(
    network: LdosNetwork, functional: Any, target: CoarseGridTarget, config: TrainingConfig
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
    hartree_sq = 0.0
    if config.hartree_weight > 0:
        hartree_error = (
            predicted_hartree(predicted, functional, target) - target.reference.qe_hartree
        ) / natoms
        loss = loss + config.hartree_weight * (hartree_error**2).to(loss)
        hartree_sq = float(hartree_error.detach()) ** 2
    stress_mse = 0.0
    if config.stress_weight > 0 and target.with_stress:
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
        hartree_sq=hartree_sq,
        gpa_per_ev_atom=natoms / volume * GPA_PER_EV_PER_CUBIC_ANGSTROM,
    )
