"""Energies of snapshots next to Quantum ESPRESSO's own numbers; a model's errors on
snapshots and on held-out reference structures, with its uncertainty."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ase
import numpy as np
import torch

from mlsurrogate.data import Snapshot
from mlsurrogate.ion_ion import ion_ion_energy
from mlsurrogate.physics import LdosEnergy, core_density, core_form_factors, g_vectors
from mlsurrogate.units import BOHR_ANGSTROM, GPA_PER_EV_PER_CUBIC_ANGSTROM, RYDBERG_EV

if TYPE_CHECKING:
    from mlsurrogate.model import Model

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
        snap.require_full_grid("the energy terms of the DFT LDOS")
        attrs = snap.attrs
        functional = functional_for(snap)
        cell = torch.as_tensor(np.asarray(snap.atoms.cell), dtype=torch.float64)
        ldos = torch.as_tensor(snap.ldos[()], dtype=torch.float64)
        core = core_density_of(snap)
        terms, _ = functional.evaluate(ldos, cell, attrs["num_valence_electrons"], False, core)
        rows: list[TermComparison] = []
        if snap.density is not None:
            qe_terms, _, _ = functional.potential_terms(
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


def _density(functional: LdosEnergy, rows: np.ndarray, mu: float) -> np.ndarray:
    return functional.density(torch.as_tensor(rows, dtype=torch.float64), mu).numpy()


def _fermi_level(functional: LdosEnergy, dos: np.ndarray, n_val: float) -> float:
    return float(functional.fermi_level(torch.as_tensor(dos, dtype=torch.float64), n_val))


@dataclass(frozen=True)
class ModelErrors:
    """Errors of a model's prediction for one snapshot, against its DFT data. Of a
    compact snapshot the LDOS and density errors are over its stored points."""

    path: str
    natoms: int
    ldos_rmse: float  # 1/(eV A^3)
    ldos_relative: float  # RMSE / RMS of the DFT LDOS
    density_relative: float  # RMS density error / mean density (both from LDOS)
    band_meV_atom: float
    hartree_meV_atom: float
    total_meV_atom: float
    fermi_meV: float
    qe_total_per_atom: float  # eV
    predicted_total_per_atom: float  # eV
    force_rmse: float  # eV/A, over all components, vs QE's forces


def evaluate_model(
    model_path: str | os.PathLike[str], snapshots: list[str]
) -> tuple[list[ModelErrors], dict[str, np.ndarray]]:
    """Model vs DFT for each snapshot (full or compact); also the first snapshot's DOS
    (DFT and predicted)."""
    from mlsurrogate.model import Model

    model = Model.load(model_path)
    results: list[ModelErrors] = []
    dos_curves: dict[str, np.ndarray] = {}
    for path in snapshots:
        with Snapshot(path) as snap:
            if not np.allclose(snap.energies, model.energies):
                raise ValueError(f"{path}: its energy grid differs from the model's")
            if core_density_of(snap) is not None:
                raise ValueError(
                    f"{path}: its pseudopotentials have nonlinear core corrections, which "
                    "exported models do not support yet"
                )
            atoms, attrs, grid = snap.atoms, snap.attrs, snap.grid_shape
            energies, qe_forces = snap.energies, snap.reference("forces")
            points = snap.ldos_points
            reference = snap.ldos[()].astype(np.float64).reshape(-1, len(energies))
            dft_dos = snap.dos()
            functional = functional_for(snap)
        predicted = model.predict(atoms, grid)
        terms = predicted.terms
        natoms = len(atoms)
        n_val = float(attrs["num_valence_electrons"])
        rows = predicted.ldos.reshape(-1, predicted.ldos.shape[-1])
        compared = rows if points is None else rows[points]
        error = compared - reference
        # each density from its own LDOS's Fermi level
        ours = _density(functional, compared, float(terms["fermi_level"]))
        theirs = _density(functional, reference, _fermi_level(functional, dft_dos, n_val))
        results.append(
            ModelErrors(
                path=str(path),
                natoms=natoms,
                ldos_rmse=float(np.sqrt(np.mean(error**2))),
                ldos_relative=float(np.sqrt(np.mean(error**2) / np.mean(reference**2))),
                density_relative=float(np.sqrt(np.mean((ours - theirs) ** 2)) / np.mean(theirs)),
                band_meV_atom=1000 * (terms["band"] - attrs["energy_band_eV"]) / natoms,
                hartree_meV_atom=1000 * (terms["hartree"] - attrs["energy_hartree_eV"]) / natoms,
                total_meV_atom=1000 * (terms["free_energy"] - attrs["energy_total_eV"]) / natoms,
                fermi_meV=1000 * (terms["fermi_level"] - attrs["fermi_energy_eV"]),
                qe_total_per_atom=attrs["energy_total_eV"] / natoms,
                predicted_total_per_atom=terms["free_energy"] / natoms,
                force_rmse=float(np.sqrt(np.mean((predicted.forces - qe_forces) ** 2))),
            )
        )
        if not dos_curves:
            voxel = atoms.get_volume() / np.prod(grid)
            dos_curves = {
                "energies": energies,
                "dft": dft_dos,
                "predicted": rows.sum(0) * voxel,
                "fermi": np.array(attrs["fermi_energy_eV"]),
            }
    return results, dos_curves


def format_model_errors(errors: list[ModelErrors]) -> str:
    lines = [
        f"| {'snapshot':<28} | {'LDOS RMSE':>10} | {'LDOS rel':>8} | {'n rel':>7} | "
        f"{'dE_band':>8} | {'dE_H':>8} | {'dA':>8} | {'dE_F':>7} | {'F RMSE':>7} |",
        f"| {'':<28} | {'1/(eV A3)':>10} | {'':>8} | {'':>7} | {'meV/at':>8} | "
        f"{'meV/at':>8} | {'meV/at':>8} | {'meV':>7} | {'eV/A':>7} |",
    ]
    for e in errors:
        lines.append(
            f"| {Path(e.path).name:<28} | {e.ldos_rmse:10.2e} | {100 * e.ldos_relative:7.2f}% | "
            f"{100 * e.density_relative:6.2f}% | {e.band_meV_atom:+8.2f} | "
            f"{e.hartree_meV_atom:+8.2f} | {e.total_meV_atom:+8.2f} | {e.fermi_meV:+7.1f} | "
            f"{e.force_rmse:7.4f} |"
        )
    mean = {
        key: float(np.mean([abs(getattr(e, key)) for e in errors]))
        for key in ("band_meV_atom", "total_meV_atom", "fermi_meV")
    }
    forces = float(np.sqrt(np.mean([e.force_rmse**2 for e in errors])))
    lines.append(
        f"mean absolute errors: band energy {mean['band_meV_atom']:.2f} meV/atom, total free "
        f"energy {mean['total_meV_atom']:.2f} meV/atom, Fermi level {mean['fermi_meV']:.1f} meV; "
        f"force RMSE {forces:.4f} eV/A"
    )
    return "\n".join(lines)


def plot_model_errors(
    errors: list[ModelErrors], dos: dict[str, np.ndarray], directory: str | os.PathLike[str]
) -> list[Path]:
    """energy_parity.png (predicted vs QE free energy per atom) and dos.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    qe = np.array([e.qe_total_per_atom for e in errors])
    ours = np.array([e.predicted_total_per_atom for e in errors])
    figure, axes = plt.subplots(figsize=(4.5, 4.5))
    low, high = min(qe.min(), ours.min()), max(qe.max(), ours.max())
    pad = 0.05 * (high - low) + 1e-3
    axes.plot([low - pad, high + pad], [low - pad, high + pad], color="0.6", lw=1)
    axes.scatter(qe, ours, s=18)
    axes.set_xlabel("QE free energy (eV/atom)")
    axes.set_ylabel("mlsurrogate free energy (eV/atom)")
    axes.set_title("Total free energy")
    figure.tight_layout()
    parity = directory / "energy_parity.png"
    figure.savefig(parity, dpi=120)
    plt.close(figure)
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot(dos["energies"], dos["dft"], label="DFT (QE)", lw=1.5)
    axes.plot(dos["energies"], dos["predicted"], label="mlsurrogate", lw=1.2, ls="--")
    axes.axvline(float(dos["fermi"]), color="0.5", lw=0.8, ls=":")
    axes.set_xlabel("energy (eV)")
    axes.set_ylabel("DOS (states/eV per cell)")
    axes.set_title(Path(errors[0].path).name)
    axes.legend()
    figure.tight_layout()
    dos_path = directory / "dos.png"
    figure.savefig(dos_path, dpi=120)
    plt.close(figure)
    return [parity, dos_path]


@dataclass(frozen=True)
class ReferenceStructure:
    """A structure with QE's free energy, forces and stress: a held-out check needs no
    LDOS."""

    name: str
    atoms: ase.Atoms
    free_energy: float  # eV, QE's "!    total energy" (the free energy A with smearing)
    forces: np.ndarray  # (natoms, 3) eV/A
    stress: np.ndarray | None = None  # (3, 3) eV/A^3, QE's sign -(1/V) dE/deps; None: not run


def load_references(paths: Sequence[str | os.PathLike[str]]) -> list[ReferenceStructure]:
    """References from JSON files (``data/make_al_heldout.py``: name, symbols, cell_A,
    positions_A, qe_free_energy_eV, qe_forces_eV_A, optional qe_stress_eV_A3), snapshot
    files (.h5) or directories of either, sorted by name within a directory."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted([*path.glob("*.json"), *path.glob("*.h5")])
            if not found:
                raise ValueError(f"{path}: no reference structures (*.json or *.h5) in it")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"{path}: no such reference file or directory")
    references = []
    for path in files:
        if path.suffix == ".h5":
            with Snapshot(path) as snap:
                references.append(
                    ReferenceStructure(
                        path.stem,
                        snap.atoms,
                        float(snap.attrs["energy_total_eV"]),
                        snap.reference("forces"),
                        snap.reference("stress"),
                    )
                )
            continue
        try:
            data = json.loads(path.read_text())
            atoms = ase.Atoms(
                data["symbols"], positions=data["positions_A"], cell=data["cell_A"], pbc=True
            )
            references.append(
                ReferenceStructure(
                    str(data.get("name", path.stem)),
                    atoms,
                    float(data["qe_free_energy_eV"]),
                    np.asarray(data["qe_forces_eV_A"], dtype=np.float64).reshape(len(atoms), 3),
                    None
                    if data.get("qe_stress_eV_A3") is None
                    else np.asarray(data["qe_stress_eV_A3"], dtype=np.float64).reshape(3, 3),
                )
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"{path}: not a reference structure ({type(exc).__name__}: {exc}); expected "
                "the JSON of data/make_al_heldout.py or a snapshot .h5"
            ) from exc
    return references


@dataclass(frozen=True)
class ReferenceError:
    """A model's error on one reference structure, and its uncertainty (ensembles)."""

    name: str
    grid: tuple[int, int, int]
    energy_error: float  # (A - A_QE) / N, eV/atom
    atom_force_errors: np.ndarray  # (natoms,) |F_i - F_i,QE|, eV/A
    force_rmse: float  # over all components, eV/A
    reference_force_rms: float  # RMS of QE's force components, eV/A
    energy_uncertainty: float | None = None  # std over members of A/N, eV/atom
    atom_force_deviation: np.ndarray | None = None  # (natoms,) eV/A, deepmd's definition
    pressure_error: float | None = None  # P - P_QE, GPa; None: the reference has no stress

    @property
    def max_force_deviation(self) -> float | None:
        deviation = self.atom_force_deviation
        return None if deviation is None else float(deviation.max())

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        for key in ("atom_force_errors", "atom_force_deviation"):
            if record[key] is not None:
                record[key] = record[key].tolist()
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> ReferenceError:
        values = dict(record, grid=tuple(record["grid"]))
        for key in ("atom_force_errors", "atom_force_deviation"):
            if values[key] is not None:
                values[key] = np.asarray(values[key], dtype=np.float64)
        return cls(**values)


def evaluate_references(
    model: Model,
    references: Sequence[ReferenceStructure],
    spacing: float | None = None,
    threads: int | None = None,
    progress: bool = False,
) -> list[ReferenceError]:
    """The model's free-energy and force errors (E_ii by LAMMPS's Ewald sum) on each
    reference, with the members' spread when the model is an ensemble. Grid: the model's
    training spacing unless ``spacing`` (A)."""
    from tqdm import tqdm

    from mlsurrogate.descriptors import grid_for_spacing

    ensemble = model.ensemble_size > 1
    results = []
    for reference in tqdm(references, desc="held-out", disable=not progress, leave=False):
        atoms = reference.atoms
        grid = grid_for_spacing(atoms.cell, spacing) if spacing else model.default_grid(atoms)
        prediction = model.predict(atoms, grid, threads=threads, uncertainty=ensemble)
        difference = prediction.forces - reference.forces
        spread = prediction.uncertainty
        pressure_error = None
        if reference.stress is not None:
            # P = tr(sigma) / 3 with QE's sigma = -(1/V) dA/deps (positive when compressed)
            pressure = -np.trace(prediction.strain_derivative) / (3.0 * atoms.get_volume())
            pressure_error = GPA_PER_EV_PER_CUBIC_ANGSTROM * (
                pressure - np.trace(reference.stress) / 3.0
            )
        results.append(
            ReferenceError(
                name=reference.name,
                grid=tuple(int(n) for n in grid),
                energy_error=(prediction.free_energy - reference.free_energy) / len(atoms),
                atom_force_errors=np.linalg.norm(difference, axis=1),
                force_rmse=float(np.sqrt(np.mean(difference**2))),
                reference_force_rms=float(np.sqrt(np.mean(reference.forces**2))),
                energy_uncertainty=None if spread is None else spread.energy_per_atom,
                atom_force_deviation=None if spread is None else spread.atom_force_deviation,
                pressure_error=pressure_error,
            )
        )
    return results


def rank_correlations(errors: Sequence[ReferenceError]) -> tuple[float, float]:
    """Spearman's rho between energy uncertainty and |energy error| over the structures,
    and between per-atom force deviation and per-atom force error over all atoms."""
    from scipy.stats import spearmanr

    if any(e.energy_uncertainty is None for e in errors):
        raise ValueError("rank correlations need an ensemble's uncertainty on every structure")
    if len(errors) < 3:
        raise ValueError(f"rank correlations need >= 3 structures, got {len(errors)}")
    energy = spearmanr(
        [e.energy_uncertainty for e in errors], [abs(e.energy_error) for e in errors]
    ).statistic
    force = spearmanr(
        np.concatenate([e.atom_force_deviation for e in errors]),
        np.concatenate([e.atom_force_errors for e in errors]),
    ).statistic
    return float(energy), float(force)


def format_reference_errors(errors: Sequence[ReferenceError]) -> str:
    """Markdown table of :func:`evaluate_references`, and the rank correlations for an
    ensemble."""
    ensemble = all(e.energy_uncertainty is not None for e in errors)
    lines = [
        "| structure | grid | A - A_QE (meV/atom) | F RMSE (eV/A) | RMS F_QE (eV/A) "
        "| P - P_QE (GPa) |" + (" dE unc. (meV/atom) | max dF (eV/A) |" if ensemble else ""),
        "|---|---|---:|---:|---:|---:|" + ("---:|---:|" if ensemble else ""),
    ]
    for e in errors:
        pressure = "-" if e.pressure_error is None else f"{e.pressure_error:+.2f}"
        row = (
            f"| {e.name} | {'x'.join(map(str, e.grid))} | {1000 * e.energy_error:+.1f} "
            f"| {e.force_rmse:.3f} | {e.reference_force_rms:.3f} | {pressure} |"
        )
        if ensemble:
            row += f" {1000 * e.energy_uncertainty:.1f} | {e.max_force_deviation:.3f} |"
        lines.append(row)
    if ensemble and len(errors) >= 3:
        energy_rho, force_rho = rank_correlations(errors)
        atoms = sum(len(e.atom_force_errors) for e in errors)
        lines.append(
            f"Spearman rho: energy uncertainty vs |A - A_QE| {energy_rho:+.3f} ({len(errors)} "
            f"structures); per-atom force deviation vs force error {force_rho:+.3f} ({atoms} atoms)"
        )
    return "\n".join(lines)


def plot_calibration(errors: Sequence[ReferenceError], path: str | os.PathLike[str]) -> Path:
    """Scatter plots of error against uncertainty: per structure (energy) and per atom
    (force), with the rank correlations in the titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    energy_rho, force_rho = rank_correlations(errors)
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    for e in errors:
        left.scatter(1000 * e.energy_uncertainty, 1000 * abs(e.energy_error), s=30)
        left.annotate(e.name, (1000 * e.energy_uncertainty, 1000 * abs(e.energy_error)),
                      fontsize=7, xytext=(3, 3), textcoords="offset points")  # fmt: skip
        right.scatter(e.atom_force_deviation, e.atom_force_errors, s=8, label=e.name)
    left.set_xlabel("energy uncertainty (meV/atom)")
    left.set_ylabel("|A - A_QE| (meV/atom)")
    left.set_title(f"per structure, Spearman rho = {energy_rho:+.2f}")
    right.set_xlabel("force deviation (eV/A)")
    right.set_ylabel("|F - F_QE| (eV/A)")
    right.set_title(f"per atom, Spearman rho = {force_rho:+.2f}")
    right.legend(fontsize=7)
    from matplotlib.ticker import NullFormatter

    for axes in (left, right):
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overlap
        axes.yaxis.set_minor_formatter(NullFormatter())
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
