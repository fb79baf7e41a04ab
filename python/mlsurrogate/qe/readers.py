"""Readers of what pw.x and pp.x write: the pw.x printout and its clock, the XML, UPF
headers and core densities, cube files, the pp.x LDOS input, and MALA-layout LDOS arrays.

Everything returned is converted to eV and Angstrom (see :mod:`mlsurrogate.units`),
except :class:`Cube`, which keeps the file's atomic units. Every failure raises
:class:`QEError` naming the file and the problem.
"""

from __future__ import annotations

import math
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlsurrogate.qe.errors import EnergyWindowError, QEError
from mlsurrogate.units import BOHR_ANGSTROM, BOLTZMANN_EV_PER_K, HARTREE_EV, RYDBERG_EV


@dataclass(frozen=True)
class UpfInfo:
    element: str
    z_valence: float
    functional: str
    core_correction: bool
    norm_conserving: bool  # False: ultrasoft or PAW (augmentation charges)


def read_upf(path: str | os.PathLike[str]) -> UpfInfo:
    """Element, valence charge, functional, NLCC flag and type of a UPF v1 or v2 file."""
    path = Path(path)
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise QEError(f"cannot read pseudopotential {path}: {exc.strerror}") from exc
    header = re.search(r"<PP_HEADER(.*?)(/>|</PP_HEADER>)", text, re.S)
    if header is None:
        raise QEError(f"{path}: not a UPF pseudopotential (no <PP_HEADER>)")
    body = header.group(1)
    attributes = dict(re.findall(r'(\w+)\s*=\s*"([^"]*)"', body))
    try:
        if "z_valence" in attributes:  # UPF v2: attributes
            return UpfInfo(
                element=attributes["element"].strip(),
                z_valence=float(attributes["z_valence"].replace("D", "E").replace("d", "e")),
                functional=" ".join(attributes.get("functional", "").split()),
                core_correction=attributes.get("core_correction", "F").strip().upper()
                in ("T", ".TRUE.", "TRUE"),
                norm_conserving=attributes.get("pseudo_type", "NC").strip().upper() in ("NC", "SL"),
            )
        lines = body.strip("> \n").splitlines()  # UPF v1: one value per line, then a label

        def field_line(label: str) -> str:
            return next(line for line in lines if label in line)

        return UpfInfo(
            element=field_line("Element").split()[0],
            z_valence=float(field_line("Z valence").split()[0]),
            functional=" ".join(field_line("Exchange-Correlation").split()[:4]),
            core_correction=field_line("Nonlinear Core Correction").split()[0].upper()
            in ("T", ".TRUE."),
            norm_conserving=field_line("pseudopotential").split()[0].upper() in ("NC", "SL"),
        )
    except (KeyError, StopIteration, ValueError, IndexError) as exc:
        raise QEError(f"{path}: cannot read the UPF header ({exc})") from exc


def _upf_array(text: str, tag: str, path: Path) -> np.ndarray:
    match = re.search(rf"<{tag}(?:\s[^>]*)?>(.*?)</{tag}>", text, re.S)
    if match is None:
        raise QEError(f"{path}: no <{tag}> in the UPF file")
    try:
        return np.array(match.group(1).replace("D", "E").replace("d", "e").split(), dtype=float)
    except ValueError as exc:
        raise QEError(f"{path}: unreadable <{tag}> ({exc})") from exc


def read_upf_core_density(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Radial mesh ``r``, its Jacobian ``rab`` (A) and the core density ``rho`` (1/A^3)
    of a UPF file with a nonlinear core correction (PP_R, PP_RAB, PP_NLCC)."""
    path = Path(path)
    text = path.read_text(errors="replace")
    r = _upf_array(text, "PP_R", path)
    rab = _upf_array(text, "PP_RAB", path)
    rho = _upf_array(text, "PP_NLCC", path)
    if not (r.size == rab.size == rho.size):
        raise QEError(f"{path}: PP_R, PP_RAB and PP_NLCC have different lengths")
    return {"r": r * BOHR_ANGSTROM, "rab": rab * BOHR_ANGSTROM, "rho": rho / BOHR_ANGSTROM**3}


# A level this many broadening widths outside the window has negligible weight inside it
# (Fermi-Dirac derivative tail exp(-x): < 1e-5 of a state).
WINDOW_MARGIN_WIDTHS = 12.0


@dataclass
class PwResult:
    """What pw.x wrote to its XML (eV, Angstrom); energies by QE's names."""

    symbols: list[str]
    cell: np.ndarray  # (3, 3), rows are lattice vectors
    positions: np.ndarray  # (natoms, 3)
    masses: dict[str, float]
    pseudopotentials: dict[str, str]
    pseudo_dir: str
    nelec: float
    fermi_energy: float
    smearing: str
    degauss: float
    functional: str
    ecutwfc: float
    ecutrho: float
    fft_grid: tuple[int, int, int]
    kpoint_grid: tuple[int, int, int]
    energies: dict[str, float]
    forces: np.ndarray  # (natoms, 3) eV/A
    stress: np.ndarray  # (3, 3) eV/A^3, QE's sign (negative pressure = tension)
    eigenvalues: np.ndarray  # (nk, nbnd) eV
    occupations: np.ndarray  # (nk, nbnd), 0..1 per spin channel
    kweights: np.ndarray  # (nk,), sum 2: spin degeneracy included
    qe_version: str
    converged: bool
    symmetry_count: int  # operations pw.x reduced the k-points with (1: none, or nosym)

    @property
    def band_energy(self) -> float:
        """sum_k w_k sum_n f_nk e_nk (the weights carry the spin degeneracy)."""
        return float(np.sum(self.kweights[:, None] * self.occupations * self.eigenvalues))

    @property
    def electron_count(self) -> float:
        return float(np.sum(self.kweights[:, None] * self.occupations))

    def check_ldos_window(self, emin: float, emax: float, width: float) -> None:
        """EnergyWindowError unless the window [emin, emax] (eV) reaches 12 broadening
        ``width``s below the lowest band and the highest band stays that far above emax
        at every k-point (so that no broadened state is cut off)."""
        self.check_ldos_window_start(emin, width)
        if self.bands_for_window_end(emax, width) is not None:
            raise EnergyWindowError(
                f"LDOS window ends at {emax:.3f} eV, but the highest computed band "
                f"({self.eigenvalues.shape[1]}) comes down to "
                f"{float(self.eigenvalues[:, -1].min()):.3f} eV: states above it are missing "
                "in the window; rerun pw.x with more bands (nbnd)"
            )

    def check_ldos_window_start(self, emin: float, width: float) -> None:
        """The start half of :meth:`check_ldos_window`: no more bands can fix it."""
        margin = WINDOW_MARGIN_WIDTHS * width
        lowest = float(self.eigenvalues.min())
        if emin > lowest - margin:
            raise EnergyWindowError(
                f"LDOS window starts at {emin:.3f} eV, but the lowest band is at {lowest:.3f} "
                f"eV: occupied states are cut off; use emin <= {lowest - margin:.2f} eV"
            )

    def bands_for_window_end(self, emax: float, width: float) -> int | None:
        """None if the highest band stays 12 ``width``s above ``emax`` at every k-point;
        else how many bands would, estimated by free-electron counting from the band
        bottom (N(E) ~ (E - E_0)^(3/2)) with 10 % to spare."""
        needed = emax + WINDOW_MARGIN_WIDTHS * width
        floor = float(self.eigenvalues[:, -1].min())
        if floor >= needed:
            return None
        bottom = float(self.eigenvalues.min())
        bands = self.eigenvalues.shape[1]
        return math.ceil(1.1 * bands * ((needed - bottom) / (floor - bottom)) ** 1.5)


def _floats(element: ET.Element | None, path: Path, what: str) -> np.ndarray:
    if element is None or element.text is None:
        raise QEError(f"{path}: no {what} in the XML")
    try:
        return np.array(element.text.split(), dtype=np.float64)
    except ValueError as exc:
        raise QEError(f"{path}: unreadable {what} ({exc})") from exc


def read_pw_xml(path: str | os.PathLike[str]) -> PwResult:
    """Read ``<prefix>.save/data-file-schema.xml`` (QE >= 6.2 schema)."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise QEError(f"{path}: not a readable XML file ({exc})") from exc
    output = root.find("output")
    if output is None or not root.tag.endswith("espresso"):
        raise QEError(f"{path}: not a pw.x XML file (no <espresso><output>)")
    bands = output.find("band_structure")
    structure = output.find("atomic_structure")
    if bands is None or structure is None:
        raise QEError(f"{path}: no band structure or atomic structure in the XML output")
    if (bands.findtext("lsda") or "false").strip() == "true" or (
        bands.findtext("noncolin") or "false"
    ).strip() == "true":
        raise QEError(f"{path}: spin-polarized or noncollinear runs are not supported")
    cell = np.stack(
        [_floats(structure.find(f"cell/a{i}"), path, f"cell vector a{i}") for i in (1, 2, 3)]
    )
    atoms = structure.findall("atomic_positions/atom")
    symbols = [a.get("name", "") for a in atoms]
    positions = np.stack([_floats(a, path, "atomic position") for a in atoms])
    species = output.findall("atomic_species/species")
    ks = bands.findall("ks_energies")
    if not ks:
        raise QEError(f"{path}: no Kohn-Sham energies in the XML")
    total = output.find("total_energy")
    if total is None:
        raise QEError(f"{path}: no <total_energy> in the XML")

    def hartree(tag: str) -> float:
        value = total.findtext(tag)
        if value is None:
            raise QEError(f"{path}: no <{tag}> in <total_energy>")
        return float(value) * HARTREE_EV

    energies = {
        "total": hartree("etot"),
        "hartree": hartree("ehart"),
        "xc": hartree("etxc"),
        "ewald": hartree("ewald"),
        "smearing": hartree("demet"),
        "vtxc": hartree("vtxc"),
    }
    energies["one_electron"] = (
        energies["total"]
        - energies["hartree"]
        - energies["xc"]
        - energies["ewald"]
        - energies["smearing"]
    )
    energies["internal"] = energies["total"] - energies["smearing"]
    smearing = bands.find("smearing")
    forces = output.find("forces")
    stress = output.find("stress")
    natoms = len(symbols)
    creator = root.find("general_info/creator")
    try:
        return PwResult(
            symbols=symbols,
            cell=cell * BOHR_ANGSTROM,
            positions=positions * BOHR_ANGSTROM,
            masses={s.get("name", ""): float(s.findtext("mass") or "nan") for s in species},
            pseudopotentials={s.get("name", ""): s.findtext("pseudo_file", "") for s in species},
            pseudo_dir=_attribute(output.find("atomic_species"), "pseudo_dir"),
            nelec=float(bands.findtext("nelec", "nan")),
            fermi_energy=float(bands.findtext("fermi_energy", "nan")) * HARTREE_EV,
            smearing=(smearing.text or "").strip() if smearing is not None else "none",
            degauss=float(_attribute(smearing, "degauss", "0")) * HARTREE_EV,
            functional=output.findtext("dft/functional", "").strip(),
            ecutwfc=float(output.findtext("basis_set/ecutwfc", "nan")) * HARTREE_EV,
            ecutrho=float(output.findtext("basis_set/ecutrho", "nan")) * HARTREE_EV,
            fft_grid=_int_attributes(output.find("basis_set/fft_grid"), ("nr1", "nr2", "nr3")),
            kpoint_grid=_int_attributes(
                bands.find("starting_k_points/monkhorst_pack"), ("nk1", "nk2", "nk3")
            ),
            energies=energies,
            forces=(
                _floats(forces, path, "forces").reshape(natoms, 3) * HARTREE_EV / BOHR_ANGSTROM
                if forces is not None
                else np.full((natoms, 3), np.nan)
            ),
            stress=(
                _floats(stress, path, "stress").reshape(3, 3) * HARTREE_EV / BOHR_ANGSTROM**3
                if stress is not None
                else np.full((3, 3), np.nan)
            ),
            eigenvalues=np.stack([_floats(k.find("eigenvalues"), path, "eigenvalues") for k in ks])
            * HARTREE_EV,
            occupations=np.stack([_floats(k.find("occupations"), path, "occupations") for k in ks]),
            kweights=np.array([float(_attribute(k.find("k_point"), "weight")) for k in ks]),
            qe_version=_attribute(creator, "VERSION"),
            converged=output.findtext("convergence_info/scf_conv/convergence_achieved", "")
            .strip()
            .lower()
            == "true",
            symmetry_count=(
                1
                if (root.findtext("input/symmetry_flags/nosym") or "").strip() == "true"
                else int(output.findtext("symmetries/nsym", "1"))
            ),
        )
    except ValueError as exc:
        raise QEError(f"{path}: malformed pw.x XML ({exc})") from exc


def _attribute(element: ET.Element | None, name: str, default: str = "") -> str:
    return default if element is None else element.get(name, default)


def _int_attributes(element: ET.Element | None, names: tuple[str, str, str]) -> tuple[int, ...]:
    return tuple(int(_attribute(element, n, "0")) for n in names)


# Printed energy lines of pw.x (Ry), by the names PwResult.energies uses.
_PRINTED_ENERGIES = {
    "total": r"^!\s+total energy\s+=\s+(\S+) Ry",
    "one_electron": r"one-electron contribution\s+=\s+(\S+) Ry",
    "hartree": r"hartree contribution\s+=\s+(\S+) Ry",
    "xc": r"xc contribution\s+=\s+(\S+) Ry",
    "ewald": r"ewald contribution\s+=\s+(\S+) Ry",
    "smearing": r"smearing contrib\. \(-TS\)\s+=\s+(\S+) Ry",
    "internal": r"internal energy E=F\+TS\s+=\s+(\S+) Ry",
}


def read_pw_output(path: str | os.PathLike[str]) -> dict[str, float]:
    """Energy terms pw.x printed (eV, last SCF), with the Fermi energy as ``fermi``."""
    path = Path(path)
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise QEError(f"cannot read pw.x output {path}: {exc.strerror}") from exc
    if "Program PWSCF" not in text:
        raise QEError(f"{path}: not a pw.x output (no 'Program PWSCF' header)")
    if "convergence NOT achieved" in text or "convergence has been achieved" not in text:
        raise QEError(f"{path}: the SCF did not converge; this run cannot be used")
    printed: dict[str, float] = {}
    for name, pattern in _PRINTED_ENERGIES.items():
        values = re.findall(pattern, text, re.M)
        if not values:
            raise QEError(f"{path}: no '{name}' energy line; pw.x output incomplete?")
        printed[name] = float(values[-1]) * RYDBERG_EV
    fermi = re.findall(r"the Fermi energy is\s+(\S+) ev", text)
    if not fermi:
        raise QEError(f"{path}: no Fermi energy line; smearing run expected")
    printed["fermi"] = float(fermi[-1])
    return printed


def _seconds(*parts: str | None) -> float:
    """Days, hours, minutes, seconds (each possibly missing) -> seconds."""
    return sum(unit * float(part or 0) for unit, part in zip((86400, 3600, 60, 1), parts))


def read_pw_clock(path: str | os.PathLike[str]) -> dict[str, float]:
    """{"cpu": s, "wall": s} of the final 'PWSCF : ... CPU ... WALL' line of a pw.x output
    (QE prints "5.76s", "2m36.51s", "1h36m" or "1d 2h 5m": minutes past an hour)."""
    path = Path(path)
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise QEError(f"cannot read pw.x output {path}: {exc.strerror}") from exc
    clock = r"(?:(\d+)d)?\s*(?:(\d+)h)?\s*(?:(\d+)m)?\s*(?:([0-9.]+)s)?"
    matches = list(re.finditer(rf"PWSCF\s*:\s*{clock}\s*CPU\s+{clock}\s*WALL", text))
    if not matches or not any(matches[-1].groups()[4:]):
        raise QEError(f"{path}: no 'PWSCF ... CPU ... WALL' line: the pw.x run did not end")
    groups = matches[-1].groups()
    return {"cpu": _seconds(*groups[:4]), "wall": _seconds(*groups[4:])}


@dataclass
class Cube:
    """A Gaussian cube file as QE writes it (atomic units, values as in the file)."""

    data: np.ndarray  # (n1, n2, n3), index order [i1, i2, i3]
    voxel: np.ndarray  # (3, 3) bohr, rows are the step vectors
    origin: np.ndarray  # (3,) bohr
    numbers: np.ndarray  # (natoms,)
    positions: np.ndarray  # (natoms, 3) bohr
    comment: str

    @property
    def cell(self) -> np.ndarray:
        return self.voxel * np.array(self.data.shape)[:, None]


def read_cube(path: str | os.PathLike[str]) -> Cube:
    """Read a cube file, checking every count; values stay in the file's units."""
    path = Path(path)
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        raise QEError(f"cannot read cube file {path}: {exc.strerror}") from exc
    try:
        natoms = int(lines[2].split()[0])
        origin = np.array(lines[2].split()[1:4], dtype=np.float64)
        axes = [lines[3 + i].split() for i in range(3)]
        shape = tuple(int(a[0]) for a in axes)
        voxel = np.array([a[1:4] for a in axes], dtype=np.float64)
        atom_lines = [lines[6 + i].split() for i in range(abs(natoms))]
        numbers = np.array([int(a[0]) for a in atom_lines])
        positions = np.array([a[2:5] for a in atom_lines], dtype=np.float64).reshape(-1, 3)
    except (IndexError, ValueError) as exc:
        raise QEError(f"{path}: not a cube file (bad header: {exc})") from exc
    if natoms < 0 or min(shape) <= 0:
        raise QEError(f"{path}: unsupported cube header (natoms {natoms}, grid {shape})")
    if any(n < 0 for n in shape):
        voxel = voxel / BOHR_ANGSTROM  # a negative count means Angstrom units
    try:
        values = np.array(" ".join(lines[6 + natoms :]).split(), dtype=np.float64)
    except ValueError as exc:
        raise QEError(f"{path}: corrupt cube data ({exc})") from exc
    expected = shape[0] * shape[1] * shape[2]
    if values.size != expected:
        raise QEError(
            f"{path}: truncated or corrupt cube: {values.size} values for a "
            f"{shape[0]}x{shape[1]}x{shape[2]} grid ({expected} expected)"
        )
    if not np.all(np.isfinite(values)):
        raise QEError(f"{path}: cube holds NaN or infinite values")
    return Cube(
        data=values.reshape(shape),  # cube order: first index slowest, as [i1, i2, i3]
        voxel=voxel,
        origin=origin,
        numbers=numbers,
        positions=positions,
        comment=lines[1].strip(),
    )


_NAMELIST_NUMBER = r"\s*=\s*([-+0-9.eEdD]+)"
_NAMELIST_STRING = r"\s*=\s*['\"]([^'\"]*)['\"]"


@dataclass(frozen=True)
class LdosEnergyGrid:
    """The energy grid of a pp.x plot_num=3 input: energies emin + i * spacing (eV),
    broadened with width ``width`` (``degauss_ldos``, eV in QE 6.7)."""

    emin: float
    emax: float
    spacing: float
    width: float
    filplot: str
    fileout: str

    @property
    def count(self) -> int:
        """pp.x writes int((emax - emin) / delta_e) + 1 energies (the largest count that
        rounding of an integer step count can give: see ``count_is_ambiguous``)."""
        return math.floor((self.emax - self.emin) / self.spacing + 1e-6) + 1

    @property
    def count_is_ambiguous(self) -> bool:
        """True when (emax - emin) / delta_e is an integer up to rounding: then pp.x's own
        rounding decides whether the last energy is written."""
        steps = (self.emax - self.emin) / self.spacing
        return abs(steps - round(steps)) < 1e-6

    def pp_name(self, index: int) -> str:
        """The file name pp.x gives the cube of energy ``index`` (0-based)."""
        return f"{self.filplot}{index + 1:03d}{self.fileout}"


def read_ldos_energy_grid(path: str | os.PathLike[str]) -> LdosEnergyGrid:
    """The energy grid and broadening width of a pp.x plot_num=3 input."""
    path = Path(path)
    if not path.is_file():
        raise QEError(
            f"missing energy-grid file {path}: the pp.x LDOS input (emin, emax, delta_e, "
            "degauss_ldos) is needed to know the energy of each cube"
        )
    text = path.read_text(errors="replace")
    plot_num = re.search(rf"\bplot_num{_NAMELIST_NUMBER}", text, re.I)
    if plot_num is None or int(float(plot_num.group(1))) != 3:
        raise QEError(f"{path}: not an LDOS input (plot_num = 3 expected)")
    values = {}
    for key in ("emin", "emax", "delta_e", "degauss_ldos"):
        match = re.search(rf"\b{key}{_NAMELIST_NUMBER}", text, re.I)
        if match is None:
            raise QEError(f"{path}: no {key} in the pp.x input")
        values[key] = float(match.group(1).replace("d", "e").replace("D", "e"))
    if not values["delta_e"] > 0 or not values["degauss_ldos"] > 0:
        raise QEError(f"{path}: delta_e and degauss_ldos must be > 0")
    names = {}
    for key in ("filplot", "fileout"):
        match = re.search(rf"\b{key}{_NAMELIST_STRING}", text, re.I)
        names[key] = match.group(1).strip() if match else ""
    return LdosEnergyGrid(
        emin=values["emin"],
        emax=values["emax"],
        spacing=values["delta_e"],
        width=values["degauss_ldos"],
        filplot=names["filplot"],
        fileout=names["fileout"],
    )


def electronic_temperature_k(degauss_ev: float) -> float:
    """Temperature whose k_B T equals the smearing width."""
    return degauss_ev / BOLTZMANN_EV_PER_K


def read_mala_ldos(path: str | os.PathLike[str], grid: tuple[int, ...]) -> np.ndarray:
    """A MALA LDOS array (``.npy``, [nx, ny, nz, nE] in MALA's unit 1/(eV A^3), grid
    point (ix, iy, iz) at fractional (ix/nx, iy/ny, iz/nz) as in the cubes it was read
    from) as float32, checked against the run's FFT ``grid``."""
    path = Path(path)
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise QEError(f"{path}: not a readable .npy array ({exc})") from exc
    if array.ndim != 4 or tuple(array.shape[:3]) != tuple(grid):
        raise QEError(
            f"{path}: MALA LDOS of shape {array.shape}; [nx, ny, nz, nE] with the pw.x FFT "
            f"grid {tuple(grid)} expected"
        )
    values = np.asarray(array, dtype=np.float32)
    if not np.all(np.isfinite(values)):
        raise QEError(f"{path}: the LDOS array holds NaN or infinite values")
    return values
