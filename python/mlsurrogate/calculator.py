"""The ASE calculator: an exported model as the Python face of ``pair_style mlsurrogate``.

It runs the pair style's electronic step in one process, with the same pieces: the native
descriptor kernel, the network, the model's scripted energy functional (steps 1-3 of
:mod:`mlsurrogate.physics`), back-propagation to dA/dB, the kernel's adjoint contraction
for forces and the strain derivative, and E_ii from LAMMPS's Ewald sum
(:mod:`mlsurrogate.ion_ion`). The network and its back-propagation run in the network's
dtype, the functional in float64, as in the pair style.

Results (ASE units: eV, eV/A, eV/A^3):

* ``energy``, ``free_energy``: the Mermin free energy A = A_el + E_ii, the quantity whose
  negative gradient the forces are (the pair style's ``pe``);
* ``forces``; ``stress`` (ASE's Voigt order xx yy zz yz xz xy, sigma = (1/V) dA/d(eps));
* ``energies``: per-atom A, the pair style's convention (``compute pe/atom``): each grid
  point's share of A_el by Becke's fuzzy Voronoi cells, E_ii per atom from LAMMPS;
* electronic extras: ``electronic_free_energy`` (A_el = A - E_ii) and ``ion_ion_energy``
  (E_ii), eV; ``fermi_level`` (eV), ``band_energy`` (eV), ``entropy_term`` (-TS,
  eV), ``electrons``, ``dos`` (states/eV on ``dos_energies``, eV), ``grid``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ase
import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes

from mlsurrogate.descriptors import (
    compute_grid_descriptors,
    descriptor_gradients,
    grid_for_spacing,
    partition_to_atoms,
)
from mlsurrogate.ion_ion import ion_ion_energy
from mlsurrogate.model import Model

# ASE's Voigt order of a symmetric 3 x 3 tensor
_VOIGT = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))


@dataclass(frozen=True)
class ElectronicStep:
    """The electronic part of a model's prediction for one structure (no E_ii)."""

    energy: float  # A_el = A - E_ii (eV)
    forces: np.ndarray  # -dA_el/dR (natoms, 3), eV/A
    strain_derivative: np.ndarray  # dA_el/d(eps) (3, 3), eV: atoms, grid and cell deformed
    atom_energies: np.ndarray  # A_el per atom (natoms,), eV (the pair style's convention)
    terms: dict[str, float]  # the functional's terms (eV per cell), mu, electron count
    dos: np.ndarray  # D(e) on the model's energy grid, states/eV


def _valence_charges(model: Model) -> dict[str, float]:
    return dict(zip(model.metadata["elements"], model.module.valence_charges))


def electronic_step(
    model: Model, atoms: ase.Atoms, grid: tuple[int, int, int], threads: int | None = None
) -> ElectronicStep:
    """The pair style's electronic step (``PairMLSurrogate::compute``) in one process.

    Strain derivative, as in the pair style and :mod:`mlsurrogate.physics`:
    dA/deps = sum_r beta dB/deps + (E_band - TS) I + dPhi/deps|_n - c N_val / D(mu) I.
    """
    module = model.module
    functional = module.functional
    params = model.params
    descriptors = compute_grid_descriptors(atoms, grid, params, threads=threads)
    weights = next(module.network.parameters())  # the network's device and dtype
    rows = torch.as_tensor(descriptors.reshape(-1, descriptors.shape[-1])).to(weights)
    with torch.no_grad():
        ldos = module(rows).double()
    cell = torch.as_tensor(np.asarray(atoms.cell), dtype=torch.float64, device=weights.device)
    voxel = abs(float(torch.linalg.det(cell))) / float(np.prod(grid))
    charges = _valence_charges(model)
    valence = np.array([charges[symbol] for symbol in atoms.get_chemical_symbols()])
    electrons = float(valence.sum())
    try:
        dos = functional.dos(ldos, voxel)
        mu = functional.fermi_level(dos, electrons)
        density = functional.density(ldos, mu).reshape(grid)
        terms, phi, phi_strain = functional.global_terms(dos, density, cell, mu)
    except RuntimeError as exc:  # TorchScript raises the functional's ValueErrors so
        raise ValueError(f"{model.path}: {exc}") from exc
    phi_rows = phi.reshape(-1)
    fermi_shift = functional.fermi_shift_part(ldos, mu, phi_rows)
    ldos_gradient = functional.ldos_gradient(mu, phi_rows, dos, fermi_shift, voxel)
    beta = module.descriptor_gradient(rows, ldos_gradient.to(weights))
    gradients = descriptor_gradients(
        atoms, grid, params, beta.double().cpu().numpy().reshape(descriptors.shape), threads=threads
    )
    values = {key: float(value) for key, value in terms.items()}
    c = values["edos_at_mu"] + float(fermi_shift)
    isotropic = values["band_free"] - c * electrons / values["dos_at_mu"]
    explicit = 0.5 * (phi_strain + phi_strain.T).cpu().numpy() + isotropic * np.eye(3)

    points = functional.band_free_points(ldos, mu, voxel).reshape(grid)
    points = points + functional.potential_points(density, cell)
    shares, unclaimed = partition_to_atoms(atoms, grid, params, points[..., None].cpu().numpy())
    return ElectronicStep(
        energy=values["electronic"],
        forces=gradients.forces,
        strain_derivative=gradients.strain_derivative + explicit,
        atom_energies=shares[:, 0] + unclaimed[0] * valence / electrons,
        terms=values,
        dos=dos.cpu().numpy(),
    )


class MLSurrogateCalculator(Calculator):
    """ASE calculator of an exported mlsurrogate model.

    ``model``: a model file (``mlsurrogate export``) or a loaded :class:`Model`. The grid is
    ``grid`` (nx, ny, nz) if given, else the cell split at ``spacing`` (A; default: the
    model's training spacing). ``threads``: descriptor-kernel and torch threads (default:
    all usable cores).
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress", "energies"]

    def __init__(
        self,
        model: Model | str | os.PathLike[str],
        grid: Sequence[int] | None = None,
        spacing: float | None = None,
        device: str = "cpu",
        threads: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if grid is not None and spacing is not None:
            raise ValueError("give either grid or spacing, not both")
        if grid is not None and (len(grid) != 3 or any(int(n) != n or n < 1 for n in grid)):
            raise ValueError(f"grid must be three positive integers, got {grid!r}")
        if spacing is not None and not spacing > 0:
            raise ValueError(f"spacing must be a positive length (A), got {spacing!r}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.model = model if isinstance(model, Model) else Model.load(model, device)
        self.grid = None if grid is None else tuple(int(n) for n in grid)
        self.spacing = spacing
        self.threads = threads

    def grid_for(self, atoms: ase.Atoms) -> tuple[int, int, int]:
        """The grid this calculator uses for ``atoms``."""
        if self.grid is not None:
            return self.grid
        spacing = self.spacing or self.model.metadata["grid_spacing_A"]
        return grid_for_spacing(np.asarray(atoms.cell), spacing)

    def calculate(
        self,
        atoms: ase.Atoms | None = None,
        properties: Sequence[str] = ("energy",),
        system_changes: Sequence[str] = all_changes,
    ) -> None:
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        self.model._check_elements(atoms)
        grid = self.grid_for(atoms)
        electronic = electronic_step(self.model, atoms, grid, self.threads)
        ion_ion = ion_ion_energy(atoms, _valence_charges(self.model))

        volume = abs(atoms.get_volume())
        # sigma = (1/V) dA/deps; the E_ii virial W = sum r (x) f is -dE_ii/deps
        strain_derivative = electronic.strain_derivative - ion_ion.virial
        strain_derivative = 0.5 * (strain_derivative + strain_derivative.T)
        energy = electronic.energy + ion_ion.energy
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "forces": electronic.forces + ion_ion.forces,
            "stress": np.array([strain_derivative[a, b] for a, b in _VOIGT]) / volume,
            "energies": electronic.atom_energies + ion_ion.atom_energies,
            "electronic_free_energy": electronic.energy,
            "ion_ion_energy": ion_ion.energy,
            "fermi_level": electronic.terms["fermi_level"],
            "band_energy": electronic.terms["band"],
            "entropy_term": electronic.terms["entropy"],
            "electrons": electronic.terms["electrons"],
            "dos": electronic.dos,
            "dos_energies": self.model.energies,
            "grid": grid,
        }
