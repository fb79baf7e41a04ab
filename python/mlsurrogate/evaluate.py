"""Energies of snapshots next to Quantum ESPRESSO's own numbers."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from mlsurrogate.data import Snapshot
from mlsurrogate.ion_ion import ion_ion_energy
from mlsurrogate.physics import LdosEnergy, core_density, core_form_factors, g_vectors
from mlsurrogate.units import BOHR_ANGSTROM, RYDBERG_EV

# QE's functional names (XML <dft><functional>) -> ours
_XC_NAMES = {"PZ": "lda_pz", "SLA-PZ": "lda_pz", "LDA": "lda_pz", "PBE": "pbe"}


def xc_of(qe_name: str) -> str:
    key = qe_name.strip().upper()
    if key not in _XC_NAMES:
        raise ValueError(f"XC functional {qe_name!r} is not supported (LDA PZ or PBE)")
    return _XC_NAMES[key]


def functional_for(snap: Snapshot) -> LdosEnergy:
    """The energy functional matching a snapshot's DFT settings."""
    attrs = snap.attrs
    return LdosEnergy(
        snap.energies,
        attrs["electronic_temperature_K"],
        xc_of(attrs["xc_functional"]),
        attrs["ldos_broadening_kernel"],
        attrs["ldos_broadening_eV"],
    )


def core_density_of(snap: Snapshot) -> torch.Tensor | None:
    """The core density on the snapshot's grid, or None without core corrections."""
    corrected = sorted(e for e, flag in snap.attrs["core_correction"].items() if flag)
    if not corrected:
        return None
    atoms = snap.atoms
    cell = torch.as_tensor(np.asarray(atoms.cell), dtype=torch.float64)
    g_norm = torch.sqrt((g_vectors(cell, snap.grid_shape) ** 2).sum(-1)).numpy()
    # QE keeps the G inside the density-cutoff sphere: |G|^2 (bohr^-2) <= ecutrho (Ry)
    g_max = np.sqrt(snap.attrs["ecutrho_eV"] / RYDBERG_EV) / BOHR_ANGSTROM
    form_factors = np.stack(
        [core_form_factors(snap.core_density_radial(e), g_norm, g_max) for e in corrected]
    )
    symbols = atoms.get_chemical_symbols()
    index = {e: i for i, e in enumerate(corrected)}
    keep = [i for i, s in enumerate(symbols) if s in index]
    return core_density(
        cell,
        torch.as_tensor(atoms.positions[keep], dtype=torch.float64),
        torch.as_tensor([index[symbols[i]] for i in keep], dtype=torch.int64),
        torch.as_tensor(form_factors, dtype=torch.complex128),
    )


@dataclass(frozen=True)
class TermComparison:
    name: str
    ours: float  # eV per cell
    qe: float  # eV per cell (nan where QE prints no such term)
    source: str  # what ours was computed from


def evaluate_dft(path: str | os.PathLike[str]) -> tuple[list[TermComparison], int]:
    """Every energy term from the snapshot's DFT LDOS (and from QE's density where that
    is the fairer test), next to QE's values. Returns the rows and the atom count."""
    with Snapshot(path) as snap:
        attrs = snap.attrs
        functional = functional_for(snap)
        cell = torch.as_tensor(np.asarray(snap.atoms.cell), dtype=torch.float64)
        ldos = torch.as_tensor(snap.ldos[()], dtype=torch.float64)
        core = core_density_of(snap)
        terms, _ = functional.evaluate(ldos, cell, attrs["num_valence_electrons"], False, core)
        rows: list[TermComparison] = []
        if snap.density is not None:
            qe_terms, _ = functional.potential_terms(
                torch.as_tensor(snap.density[()], dtype=torch.float64), cell, core
            )
            rows += [
                TermComparison(
                    "E_H", float(qe_terms["hartree"]), attrs["energy_hartree_eV"], "QE n"
                ),
                TermComparison("E_xc", float(qe_terms["xc"]), attrs["energy_xc_eV"], "QE n"),
                TermComparison(
                    "int v_xc n", float(qe_terms["vxc_n"]), attrs["energy_vtxc_eV"], "QE n"
                ),
            ]
        e_ii = ion_ion_energy(snap.atoms, attrs["valence_charges"]).energy
        natoms = len(snap.atoms)
        qe_band = attrs["energy_band_eV"]
        rows += [
            TermComparison("E_ii (LAMMPS Ewald)", e_ii, attrs["energy_ewald_eV"], "atoms"),
            TermComparison("band energy", float(terms["band"]), qe_band, "LDOS"),
            TermComparison("-TS", float(terms["entropy"]), attrs["energy_smearing_eV"], "LDOS"),
            TermComparison(
                "E_band - TS",
                float(terms["band_free"]),
                qe_band + attrs["energy_smearing_eV"],
                "LDOS",
            ),
            TermComparison("E_H", float(terms["hartree"]), attrs["energy_hartree_eV"], "LDOS"),
            TermComparison("E_xc", float(terms["xc"]), attrs["energy_xc_eV"], "LDOS"),
            TermComparison(
                "one-electron",
                float(terms["one_electron"]),
                attrs["energy_one_electron_eV"],
                "LDOS",
            ),
            TermComparison(
                "total free energy A",
                float(terms["electronic"]) + e_ii,
                attrs["energy_total_eV"],
                "LDOS + E_ii",
            ),
            TermComparison(
                "Fermi level", float(terms["fermi_level"]), attrs["fermi_energy_eV"], "LDOS"
            ),
        ]
    return rows, natoms


def format_comparison(path: str | os.PathLike[str]) -> str:
    rows, natoms = evaluate_dft(path)
    lines = [
        f"{path}: {natoms} atoms; energies in eV per cell, differences in meV/atom "
        "(Fermi level: meV)",
        f"  {'term':<22}{'from':<13}{'mlsurrogate':>17}{'QE':>17}{'diff':>12}",
    ]
    for row in rows:
        scale = 1.0 if row.name == "Fermi level" else 1.0 / natoms
        diff = 1000.0 * (row.ours - row.qe) * scale
        lines.append(f"  {row.name:<22}{row.source:<13}{row.ours:17.6f}{row.qe:17.6f}{diff:+12.4f}")
    return "\n".join(lines)
