"""The ASE calculator: an exported model as the Python face of ``pair_style mlsurrogate``.

:meth:`mlsurrogate.model.Model.predict` runs the pair style's electronic step in one
process with the same pieces (descriptor kernel, network, the model's scripted energy
functional, back-propagation, adjoint contraction, E_ii from LAMMPS's Ewald sum); this
class gives its results ASE's names and units.

Results (eV, eV/A, eV/A^3):

* ``energy``, ``free_energy``: the Mermin free energy A = A_el + E_ii, the quantity whose
  negative gradient the forces are (the pair style's ``pe``);
* ``forces``; ``stress`` (ASE's Voigt order xx yy zz yz xz xy, sigma = (1/V) dA/d(eps));
* ``energies``: A per atom, the pair style's convention (``compute pe/atom``): each grid
  point's share of A_el by Becke's fuzzy Voronoi cells, E_ii per atom from LAMMPS;
* electronic extras: ``electronic_free_energy`` (A_el = A - E_ii) and ``ion_ion_energy``
  (E_ii), eV; ``fermi_level`` (eV), ``band_energy`` (eV), ``entropy_term`` (-TS, eV),
  ``electrons``, ``dos`` (states/eV on ``dos_energies``, eV), ``grid``;
* uncertainty, for an ensemble model or with ``dropout_passes`` (MC dropout: sampled
  networks): each member through the functional on its own (:meth:`Model.predict_uncertainty`):
  ``energy_uncertainty`` (standard deviation of A/N, eV/atom), ``forces_uncertainty``
  (per atom, sqrt(<|F - <F>|^2>), eV/A: deepmd-kit's model deviation),
  ``fermi_level_uncertainty`` (eV) and ``dos_uncertainty`` (states/eV).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import ase
import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes

from mlsurrogate.descriptors import grid_for_spacing
from mlsurrogate.model import Model, check_dropout_passes

WORST_ATOMS = 5  # atoms named by the force-deviation warning, as in the pair style


class UncertaintyWarning(UserWarning):
    """A prediction whose ensemble (or MC-dropout) force deviation is above the threshold."""


# ASE's Voigt order of a symmetric 3 x 3 tensor
_VOIGT = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))


class MLSurrogateCalculator(Calculator):
    """ASE calculator of an exported mlsurrogate model.

    ``model``: a model file (``mlsurrogate export``) or a loaded :class:`Model`. The grid is
    ``grid`` (nx, ny, nz) if given, else the cell split at ``spacing`` (A; default: the
    model's training spacing), rounded half up as in the pair style. ``device``: where
    the network and functional run (a loaded model keeps its own). ``threads``: the
    descriptor kernel's and torch's threads (default: all usable cores; torch's setting
    is process-wide). ``uncertainty``: compute the members' spread (default: for ensemble
    models; each member costs about one more prediction); ``dropout_passes``: MC-dropout
    passes for a network trained with dropout (turns ``uncertainty`` on), T sampled
    networks of ``seed`` (the same networks at every call, as in the pair style).
    ``warn_force_deviation`` (eV/A): an :class:`UncertaintyWarning` naming the worst atoms
    when any atom's force deviation exceeds it (the pair style's ``warn``; metatomic's
    uncertainty threshold).
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress", "energies"]

    def __init__(
        self,
        model: Model | str | os.PathLike[str],
        grid: Sequence[int] | None = None,
        spacing: float | None = None,
        device: str = "cpu",
        threads: int | None = None,
        uncertainty: bool | None = None,
        dropout_passes: int = 0,
        seed: int = 0,
        warn_force_deviation: float | None = None,
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
        check_dropout_passes(dropout_passes, seed)
        if warn_force_deviation is not None and not warn_force_deviation > 0:
            raise ValueError(
                "warn_force_deviation must be a positive force (eV/A), got "
                f"{warn_force_deviation!r}"
            )
        self.model = model if isinstance(model, Model) else Model.load(model, device)
        self.grid = None if grid is None else tuple(int(n) for n in grid)
        self.spacing = spacing
        self.threads = threads
        self.dropout_passes = dropout_passes
        self.seed = seed
        if uncertainty is None:
            uncertainty = dropout_passes > 0 or self.model.ensemble_size > 1
        if warn_force_deviation is not None and not uncertainty:
            raise ValueError("warn_force_deviation needs the uncertainty (uncertainty=True)")
        self.uncertainty = uncertainty
        self.warn_force_deviation = warn_force_deviation

    def grid_for(self, atoms: ase.Atoms) -> tuple[int, int, int]:
        """The grid this calculator uses for ``atoms``."""
        if self.grid is not None:
            return self.grid
        if self.spacing is not None:
            return grid_for_spacing(atoms.cell, self.spacing)
        return self.model.default_grid(atoms)

    def calculate(
        self,
        atoms: ase.Atoms | None = None,
        properties: Sequence[str] = ("energy",),
        system_changes: Sequence[str] = all_changes,
    ) -> None:
        super().calculate(atoms, properties, system_changes)
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        grid = self.grid_for(self.atoms)
        prediction = self.model.predict(
            self.atoms, grid, self.threads, self.uncertainty, self.dropout_passes, self.seed
        )
        sigma = prediction.strain_derivative / abs(self.atoms.get_volume())
        terms = prediction.terms
        self.results = {
            "energy": prediction.free_energy,
            "free_energy": prediction.free_energy,
            "forces": prediction.forces,
            "stress": np.array([sigma[a, b] for a, b in _VOIGT]),
            "energies": prediction.atom_energies,
            "electronic_free_energy": terms["electronic"],
            "ion_ion_energy": terms["ion_ion"],
            "fermi_level": terms["fermi_level"],
            "band_energy": terms["band"],
            "entropy_term": terms["entropy"],
            "electrons": terms["electrons"],
            "dos": prediction.dos,
            "dos_energies": self.model.energies,
            "grid": grid,
        }
        spread = prediction.uncertainty
        if spread is not None:
            self.results.update(
                energy_uncertainty=spread.energy_per_atom,
                forces_uncertainty=spread.atom_force_deviation,
                fermi_level_uncertainty=spread.fermi_level,
                dos_uncertainty=spread.dos_deviation,
            )
            self._warn_if_uncertain(spread.atom_force_deviation)

    def _warn_if_uncertain(self, deviation: np.ndarray) -> None:
        threshold = self.warn_force_deviation
        if threshold is None or not deviation.max() > threshold:
            return
        above = np.flatnonzero(deviation > threshold)
        worst = above[np.argsort(-deviation[above])][:WORST_ATOMS]
        names = ", ".join(f"{i} ({deviation[i]:.4g} eV/A)" for i in worst)
        warnings.warn(
            f"{len(above)} atoms have a force deviation above {threshold} eV/A; the worst, by "
            f"index: {names}. The structure may be outside the model's training data",
            UncertaintyWarning,
            stacklevel=3,
        )
