"""Settings of one pw.x + pp.x run and the input files written from them.

Units: the QE keywords keep QE's units (Ry for cutoffs and thresholds); the LDOS energy
grid is in eV, absolute (QE's zero). pp.x's ``degauss_ldos`` is read in eV by QE 6.7.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import ase
import ase.data
import numpy as np

from mlsurrogate.qe.readers import read_upf
from mlsurrogate.units import BOLTZMANN_EV_PER_K, RYDBERG_EV

DEFAULT_PSEUDO_DIR = "/usr/share/espresso/pseudo"
PREFIX = "pwscf"
OUTDIR = "out"
LDOS_STEM = "ldos_"
DENSITY_CUBE = "density.cube"
LDOS_NSCF_DIR = "ldos_nscf"  # the non-self-consistent run of the LDOS k-grid
LDOS_PROGRAMS = ("wavefunctions", "pp.x")
# Kernel names recorded in snapshots, keyed by the smearing names pw.x accepts.
BROADENING_KERNELS = {
    "fd": "fermi-dirac-derivative",
    "f-d": "fermi-dirac-derivative",
    "fermi-dirac": "fermi-dirac-derivative",
    "gaussian": "gaussian",
    "gauss": "gaussian",
    "mv": "marzari-vanderbilt",
    "m-v": "marzari-vanderbilt",
    "cold": "marzari-vanderbilt",
    "marzari-vanderbilt": "marzari-vanderbilt",
    "mp": "methfessel-paxton",
    "m-p": "methfessel-paxton",
    "methfessel-paxton": "methfessel-paxton",
}


@dataclass(frozen=True)
class QESettings:
    """DFT and LDOS settings of one pw.x + pp.x run (defaults: the bundled Al dataset).

    Energies of the LDOS grid are absolute (QE's zero), in eV: ``ldos_emin_ev``,
    ``ldos_emin_ev + ldos_spacing_ev``, ... up to ``ldos_emax_ev``.
    ``ldos_broadening_ev`` None means the SCF smearing width (k_B T).
    ``ldos_kpts`` / ``ldos_kspacing`` set the k-grid of the LDOS (a non-self-consistent
    pw.x run on the SCF's density); both None: the SCF's k-grid. Not for training labels:
    the functional then misses QE's energy by the density's first-order change (-17
    meV/atom for 32-atom Al, 6^3 on a 4^3 density; docs/qe-ingest.md); a denser SCF
    (``kpts``/``kspacing``) gives a k-converged LDOS that agrees with its energies.
    ``ldos_nscf_threshold_ry`` is that run's eigenvalue threshold (pw.x ``diago_thr_init``);
    pw.x's nscf default, conv_thr / N_el / 10 (1e-13 Ry here), costs 2-3x for no change
    in the LDOS (1e-5 of its largest value at 1e-8, as at 1e-10, on 32-atom Al).
    ``ldos_program``: ``"wavefunctions"`` (every energy in one pass over pw.x's
    wavefunctions, :mod:`mlsurrogate.qe.ldos`; norm-conserving pseudopotentials) or
    ``"pp.x"`` (QE's plot_num = 3, one pass per energy; any pseudopotential, the SCF's
    k-grid only).
    ``pw_command``/``pp_command`` are command lines, e.g. ``"mpirun -n 2 pw.x -nk 2"``;
    ``-in FILE`` is appended.
    """

    pseudopotentials: Mapping[str, str] = field(default_factory=lambda: {"Al": "Al.pz-vbc.UPF"})
    pseudo_dir: str = DEFAULT_PSEUDO_DIR
    ecutwfc_ry: float = 20.0
    ecutrho_ry: float | None = None
    kspacing: float = 0.2
    kpts: tuple[int, int, int] | None = None
    electronic_temperature_k: float = 933.0
    smearing: str = "fd"
    conv_thr_ry: float = 1e-10
    electron_maxstep: int = 100
    nbnd: int | None = None
    ldos_emin_ev: float = -5.0
    ldos_emax_ev: float = 11.0
    ldos_spacing_ev: float = 0.1
    ldos_broadening_ev: float | None = None
    ldos_kspacing: float | None = None
    ldos_kpts: tuple[int, int, int] | None = None
    ldos_program: str = "wavefunctions"
    ldos_nscf_threshold_ry: float = 1e-8
    pw_command: str = "pw.x"
    pp_command: str = "pp.x"

    def validate(self) -> None:
        checks = [
            (self.ecutwfc_ry > 0, f"ecutwfc_ry must be > 0, got {self.ecutwfc_ry}"),
            (self.kspacing > 0, f"kspacing must be > 0, got {self.kspacing}"),
            (
                self.electronic_temperature_k > 0,
                f"electronic_temperature_k must be > 0, got {self.electronic_temperature_k}",
            ),
            (self.conv_thr_ry > 0, f"conv_thr_ry must be > 0, got {self.conv_thr_ry}"),
            (self.ldos_spacing_ev > 0, f"ldos_spacing_ev must be > 0, got {self.ldos_spacing_ev}"),
            (
                self.ldos_emax_ev > self.ldos_emin_ev,
                f"ldos_emax_ev ({self.ldos_emax_ev}) must exceed ldos_emin_ev "
                f"({self.ldos_emin_ev})",
            ),
            (
                self.smearing.lower() in BROADENING_KERNELS,
                f"smearing {self.smearing!r} is not one of {sorted(BROADENING_KERNELS)}",
            ),
            (
                self.ldos_broadening_ev is None or self.ldos_broadening_ev > 0,
                f"ldos_broadening_ev must be > 0, got {self.ldos_broadening_ev}",
            ),
            (
                self.kpts is None or (len(self.kpts) == 3 and min(self.kpts) >= 1),
                f"kpts must be three integers >= 1, got {self.kpts}",
            ),
            (self.nbnd is None or self.nbnd >= 1, f"nbnd must be >= 1, got {self.nbnd}"),
            (
                self.ldos_kspacing is None or self.ldos_kspacing > 0,
                f"ldos_kspacing must be > 0, got {self.ldos_kspacing}",
            ),
            (
                self.ldos_kpts is None or (len(self.ldos_kpts) == 3 and min(self.ldos_kpts) >= 1),
                f"ldos_kpts must be three integers >= 1, got {self.ldos_kpts}",
            ),
            (
                self.ldos_nscf_threshold_ry > 0,
                f"ldos_nscf_threshold_ry must be > 0, got {self.ldos_nscf_threshold_ry}",
            ),
            (
                self.ldos_program in LDOS_PROGRAMS,
                f"ldos_program {self.ldos_program!r} is not one of {list(LDOS_PROGRAMS)}",
            ),
            (
                self.ldos_program == "pp.x"
                or BROADENING_KERNELS.get(self.smearing.lower())
                in ("fermi-dirac-derivative", "gaussian"),
                f"smearing {self.smearing!r}: the LDOS from wavefunctions broadens with the "
                "Fermi-Dirac or the Gaussian kernel (smearing 'fd' or 'gaussian'); for "
                "another use ldos_program 'pp.x'",
            ),
            (
                self.ldos_program == "wavefunctions"
                or (self.ldos_kpts is None and self.ldos_kspacing is None),
                "ldos_program 'pp.x' computes the LDOS on the SCF's k-grid only; drop "
                "ldos_kpts/ldos_kspacing or use ldos_program 'wavefunctions'",
            ),
            (
                self.electron_maxstep >= 1,
                f"electron_maxstep must be >= 1, got {self.electron_maxstep}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def degauss_ry(self) -> float:
        return BOLTZMANN_EV_PER_K * self.electronic_temperature_k / RYDBERG_EV

    @property
    def ldos_broadening(self) -> float:
        """Width of the LDOS broadening kernel in eV (pp.x ``degauss_ldos`` is in eV)."""
        if self.ldos_broadening_ev is None:
            return BOLTZMANN_EV_PER_K * self.electronic_temperature_k
        return self.ldos_broadening_ev

    @property
    def num_ldos_energies(self) -> int:
        return int(round((self.ldos_emax_ev - self.ldos_emin_ev) / self.ldos_spacing_ev)) + 1

    @property
    def ldos_energies(self) -> np.ndarray:
        """The LDOS energy grid, eV (absolute)."""
        return self.ldos_emin_ev + self.ldos_spacing_ev * np.arange(self.num_ldos_energies)


def _monkhorst_pack(
    atoms: ase.Atoms, kpts: tuple[int, int, int] | None, kspacing: float
) -> tuple[int, int, int]:
    """``kpts``, or ceil(|b_i| / kspacing) with b_i = 2 pi x reciprocal vectors."""
    if kpts is not None:
        return tuple(int(k) for k in kpts)  # type: ignore[return-value]
    lengths = 2.0 * math.pi * np.linalg.norm(atoms.cell.reciprocal(), axis=1)
    return tuple(max(1, math.ceil(b / kspacing - 1e-6)) for b in lengths)


def kpoint_grid(atoms: ase.Atoms, settings: QESettings) -> tuple[int, int, int]:
    """The SCF's k-grid: ``kpts``, else from ``kspacing``."""
    return _monkhorst_pack(atoms, settings.kpts, settings.kspacing)


def ldos_kpoint_grid(atoms: ase.Atoms, settings: QESettings) -> tuple[int, int, int]:
    """The LDOS k-grid: ``ldos_kpts``, else from ``ldos_kspacing``, else the SCF's."""
    if settings.ldos_kpts is None and settings.ldos_kspacing is None:
        return kpoint_grid(atoms, settings)
    return _monkhorst_pack(atoms, settings.ldos_kpts, settings.ldos_kspacing or settings.kspacing)


def valence_electrons(atoms: ase.Atoms, settings: QESettings) -> float:
    """Electrons of ``atoms`` with the pseudopotentials of ``settings`` (their Z valence)."""
    return sum(
        read_upf(Path(settings.pseudo_dir) / settings.pseudopotentials[s]).z_valence
        for s in atoms.get_chemical_symbols()
    )


def _number_of_bands(atoms: ase.Atoms, settings: QESettings) -> int:
    """Twice the occupied bands plus 4: for a free-electron-like metal that reaches well
    past E_F + 3 eV at every k-point (ingest checks the window is covered)."""
    if settings.nbnd is not None:
        return settings.nbnd
    return math.ceil(valence_electrons(atoms, settings)) + 4


def write_pw_input(atoms: ase.Atoms, settings: QESettings, *, ldos_nscf: bool = False) -> str:
    """pw.x input for ``atoms`` (cell and positions in Angstrom): the SCF, or with
    ``ldos_nscf`` the non-self-consistent run on the LDOS k-grid (no symmetry reduction
    beyond time reversal, so that the LDOS from the wavefunctions needs none)."""
    settings.validate()
    symbols = atoms.get_chemical_symbols()
    missing = sorted(set(symbols) - set(settings.pseudopotentials))
    if missing:
        raise ValueError(f"no pseudopotential given for element(s) {missing}")
    if not all(atoms.pbc):
        raise ValueError("pw.x needs a periodic cell: atoms.pbc must be all True")
    species = sorted(set(symbols))
    kx, ky, kz = (ldos_kpoint_grid if ldos_nscf else kpoint_grid)(atoms, settings)
    system = [
        "ibrav = 0",
        f"nat = {len(atoms)}",
        f"ntyp = {len(species)}",
        f"ecutwfc = {settings.ecutwfc_ry!r}",
        "occupations = 'smearing'",
        f"smearing = '{settings.smearing}'",
        f"degauss = {settings.degauss_ry!r}",
        f"nbnd = {_number_of_bands(atoms, settings)}",
    ]
    if settings.ecutrho_ry is not None:
        system.append(f"ecutrho = {settings.ecutrho_ry!r}")
    if ldos_nscf:
        system.append("nosym = .true.")
    lines = [
        "&control",
        f"  calculation = '{'nscf' if ldos_nscf else 'scf'}'",
        f"  prefix = '{PREFIX}'",
        f"  outdir = './{OUTDIR}'",
        f"  pseudo_dir = '{settings.pseudo_dir}'",
        # nscf: 'high' prints "Computing kpt #" per k-point (the progress bar counts them)
        *(["  verbosity = 'high'"] if ldos_nscf else ["  tprnfor = .true.", "  tstress = .true."]),
        "/",
        "&system",
        *(f"  {item}" for item in system),
        "/",
        "&electrons",
        f"  conv_thr = {settings.conv_thr_ry!r}",
        f"  electron_maxstep = {settings.electron_maxstep}",
        *([f"  diago_thr_init = {settings.ldos_nscf_threshold_ry!r}"] if ldos_nscf else []),
        "/",
        "ATOMIC_SPECIES",
        *(
            f"{s} {ase.data.atomic_masses[ase.data.atomic_numbers[s]]:.6f} "
            f"{settings.pseudopotentials[s]}"
            for s in species
        ),
        "CELL_PARAMETERS angstrom",
        *(" ".join(f"{x:.12f}" for x in row) for row in np.asarray(atoms.cell)),
        "ATOMIC_POSITIONS angstrom",
        *(f"{s} " + " ".join(f"{x:.12f}" for x in p) for s, p in zip(symbols, atoms.positions)),
        "K_POINTS automatic",
        f"{kx} {ky} {kz} 0 0 0",
    ]
    return "\n".join(lines) + "\n"


def write_pp_inputs(settings: QESettings) -> dict[str, str]:
    """pp.x inputs: ``pp_ldos.in`` (LDOS cubes, plot_num=3), ``pp_density.in`` (plot_num=0)."""
    settings.validate()
    common = [f"  prefix = '{PREFIX}'", f"  outdir = './{OUTDIR}'"]
    last_energy = float(settings.ldos_energies[-1])
    ldos = [
        "&inputpp",
        *common,
        f"  filplot = '{LDOS_STEM}'",
        "  plot_num = 3",
        f"  emin = {settings.ldos_emin_ev!r}",
        # pp.x makes int((emax - emin) / delta_e) + 1 energies; half a step past the last
        # energy keeps that count safe from rounding.
        f"  emax = {last_energy + 0.5 * settings.ldos_spacing_ev!r}",
        f"  delta_e = {settings.ldos_spacing_ev!r}",
        f"  degauss_ldos = {settings.ldos_broadening!r}",
        "/",
        "&plot",
        "  iflag = 3",
        "  output_format = 6",
        "  fileout = '.cube'",
        "/",
    ]
    density = [
        "&inputpp",
        *common,
        "  filplot = 'density_raw'",
        "  plot_num = 0",
        "/",
        "&plot",
        "  iflag = 3",
        "  output_format = 6",
        f"  fileout = '{DENSITY_CUBE}'",
        "/",
    ]
    return {"pp_ldos.in": "\n".join(ldos) + "\n", "pp_density.in": "\n".join(density) + "\n"}
