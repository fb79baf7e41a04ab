"""Quantum ESPRESSO: write and run pw.x/pp.x, and read what they write.

A run directory made by :func:`run_qe` holds::

    pw.in  pw.out  out/<prefix>.save/data-file-schema.xml     (SCF)
    pp_ldos.in  pp_ldos.out  ldos_001.cube ... ldos_NNN.cube   (LDOS, pp.x plot_num=3)
    pp_density.in  pp_density.out  density.cube                (valence density, plot_num=0)

Everything read here is converted once to eV and Angstrom (see :mod:`mlsurrogate.units`).
Every failure raises :class:`QEError` with the file and the problem in its message.

LDOS broadening. pp.x 6.7 broadens each Kohn-Sham level with the SCF smearing kernel
of width ``degauss_ldos`` (for Fermi-Dirac smearing: -df/dx of the Fermi function).
The default width here equals the SCF smearing width k_B T. Then, exactly,
``integral_{-inf}^{mu} d(e, r) de`` is the Fermi-Dirac density at temperature T and
``integral_{-inf}^{mu} e D(e) de = E_band - TS`` (derived in the README, "LDOS
broadening"), so the stored LDOS carries the free energy with no deconvolution.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import ase
import ase.data
import numpy as np

from mlsurrogate.descriptors import BispectrumParams
from mlsurrogate.units import BOHR_ANGSTROM, BOLTZMANN_EV_PER_K, HARTREE_EV, RYDBERG_EV

DEFAULT_PSEUDO_DIR = "/usr/share/espresso/pseudo"
PREFIX = "pwscf"
OUTDIR = "out"
LDOS_STEM = "ldos_"
DENSITY_CUBE = "density.cube"
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


class QEError(RuntimeError):
    """A Quantum ESPRESSO run failed, or one of its files cannot be used."""


@dataclass(frozen=True)
class QESettings:
    """DFT and LDOS settings of one pw.x + pp.x run (defaults: the bundled Al dataset).

    Energies of the LDOS grid are absolute (QE's zero), in eV: ``ldos_emin_ev``,
    ``ldos_emin_ev + ldos_spacing_ev``, ... up to ``ldos_emax_ev``.
    ``ldos_broadening_ev`` None means the SCF smearing width (k_B T).
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


def kpoint_grid(atoms: ase.Atoms, settings: QESettings) -> tuple[int, int, int]:
    """``settings.kpts``, or ceil(|b_i| / kspacing) with b_i = 2 pi x reciprocal vectors."""
    if settings.kpts is not None:
        return tuple(int(k) for k in settings.kpts)  # type: ignore[return-value]
    lengths = 2.0 * math.pi * np.linalg.norm(atoms.cell.reciprocal(), axis=1)
    return tuple(max(1, math.ceil(b / settings.kspacing - 1e-6)) for b in lengths)


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


def write_pw_input(atoms: ase.Atoms, settings: QESettings) -> str:
    """pw.x SCF input for ``atoms`` (cell and positions in Angstrom)."""
    settings.validate()
    symbols = atoms.get_chemical_symbols()
    missing = sorted(set(symbols) - set(settings.pseudopotentials))
    if missing:
        raise ValueError(f"no pseudopotential given for element(s) {missing}")
    if not all(atoms.pbc):
        raise ValueError("pw.x needs a periodic cell: atoms.pbc must be all True")
    species = sorted(set(symbols))
    kx, ky, kz = kpoint_grid(atoms, settings)
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
    lines = [
        "&control",
        "  calculation = 'scf'",
        f"  prefix = '{PREFIX}'",
        f"  outdir = './{OUTDIR}'",
        f"  pseudo_dir = '{settings.pseudo_dir}'",
        "  tprnfor = .true.",
        "  tstress = .true.",
        "/",
        "&system",
        *(f"  {item}" for item in system),
        "/",
        "&electrons",
        f"  conv_thr = {settings.conv_thr_ry!r}",
        f"  electron_maxstep = {settings.electron_maxstep}",
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
    last_energy = (
        settings.ldos_emin_ev + (settings.num_ldos_energies - 1) * settings.ldos_spacing_ev
    )
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


def _qe_error_message(text: str) -> str:
    """The message inside QE's %%%% error block, if any."""
    match = re.search(r"%{10,}\n(.*?)\n\s*%{10,}", text, re.S)
    return " ".join(match.group(1).split()) if match else ""


def _run_program(
    command: str,
    input_name: str,
    directory: Path,
    count: Callable[[], int],
    report: Callable[[int], None],
    diagnose: Callable[[str], str | None] = lambda text: None,
) -> str:
    """Run ``command -in input_name`` in ``directory``; output to <input stem>.out.

    ``count`` measures progress (e.g. cube files written) and ``report`` receives it
    while the program runs. ``diagnose`` turns a known failure in the output into a
    specific message, checked before the generic exit-code error.
    """
    argv = shlex.split(command) + ["-in", input_name]
    if shutil.which(argv[0]) is None:
        raise QEError(
            f"{argv[0]!r} not found on PATH (command {command!r}). Install Quantum ESPRESSO "
            "(Debian: apt-get install quantum-espresso quantum-espresso-data) or pass the "
            "full path of pw.x/pp.x."
        )
    output_path = directory / (Path(input_name).stem + ".out")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    if os.geteuid() == 0:  # Open MPI's mpirun refuses root unless told (containers, CI)
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    with open(output_path, "w") as output:
        process = subprocess.Popen(
            argv, cwd=directory, stdout=output, stderr=subprocess.STDOUT, env=env
        )
        while process.poll() is None:
            time.sleep(0.25)
            report(count())
    report(count())
    text = output_path.read_text(errors="replace")
    problem = diagnose(text)
    if problem:
        raise QEError(f"{output_path}: {problem}")
    if process.returncode != 0 or "JOB DONE" not in text:
        detail = _qe_error_message(text) or " | ".join(text.strip().splitlines()[-5:])
        raise QEError(
            f"{command!r} failed on {directory / input_name} (exit code {process.returncode}); "
            f"see {output_path}: {detail}"
        )
    return text


def mpi_commands(ranks: int) -> dict[str, str]:
    """``pw_command`` and ``pp_command`` of QESettings for ``ranks`` MPI ranks with
    Debian's QE: it is linked to Debian's Open MPI, so its ``/usr/bin/mpirun`` (not the
    launcher of another MPI on PATH), and k-point pools for pw.x. Serial without it."""
    if ranks > 1 and Path("/usr/bin/mpirun").exists():
        launcher = f"/usr/bin/mpirun -n {ranks}"
        return {"pw_command": f"{launcher} pw.x -nk {ranks}", "pp_command": f"{launcher} pp.x"}
    return {"pw_command": "pw.x", "pp_command": "pp.x"}


def run_pw(
    atoms: ase.Atoms,
    settings: QESettings,
    directory: str | os.PathLike[str],
    *,
    progress: bool = True,
) -> Path:
    """Run the pw.x SCF in ``directory`` (pw.in, pw.out, out/); return the directory."""
    from tqdm import tqdm

    settings.validate()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pw.in").write_text(write_pw_input(atoms, settings))

    def scf_iterations() -> int:
        out = directory / "pw.out"
        return out.read_text(errors="replace").count("total energy  ") if out.exists() else 0

    with tqdm(desc="pw.x scf iterations", unit="it", disable=not progress) as bar:
        _run_program(
            settings.pw_command,
            "pw.in",
            directory,
            scf_iterations,
            lambda n: bar.update(n - bar.n),
            diagnose=lambda text: (
                None
                if "convergence NOT achieved" not in text
                else f"the SCF did not converge in {settings.electron_maxstep} iterations "
                f"(conv_thr {settings.conv_thr_ry} Ry); raise electron_maxstep"
            ),
        )
    return directory


def run_qe(
    atoms: ase.Atoms,
    settings: QESettings,
    directory: str | os.PathLike[str],
    *,
    progress: bool = True,
) -> Path:
    """Run pw.x (SCF), then pp.x for LDOS cubes and the valence density, in ``directory``."""
    from tqdm import tqdm

    directory = run_pw(atoms, settings, directory, progress=progress)
    for name, text in write_pp_inputs(settings).items():
        (directory / name).write_text(text)

    def cubes() -> int:
        return len(list(directory.glob(f"{LDOS_STEM}*.cube")))

    for stale in directory.glob(f"{LDOS_STEM}*.cube"):  # of an earlier run in this directory
        stale.unlink()

    with tqdm(
        total=settings.num_ldos_energies, desc="pp.x LDOS", unit="cube", disable=not progress
    ) as bar:
        _run_program(
            settings.pp_command, "pp_ldos.in", directory, cubes, lambda n: bar.update(n - bar.n)
        )
    _run_program(settings.pp_command, "pp_density.in", directory, lambda: 0, lambda n: None)
    # pp.x also leaves its intermediate plot files; the cubes hold the same data.
    for raw in [*directory.glob(f"{LDOS_STEM}[0-9][0-9][0-9]"), directory / "density_raw"]:
        raw.unlink(missing_ok=True)
    return directory


# ----------------------------------------------------------------------------- readers


@dataclass(frozen=True)
class UpfInfo:
    element: str
    z_valence: float
    functional: str
    core_correction: bool


def read_upf(path: str | os.PathLike[str]) -> UpfInfo:
    """Element, valence charge, functional and NLCC flag of a UPF v1 or v2 file."""
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

    @property
    def band_energy(self) -> float:
        """sum_k w_k sum_n f_nk e_nk (the weights carry the spin degeneracy)."""
        return float(np.sum(self.kweights[:, None] * self.occupations * self.eigenvalues))

    @property
    def electron_count(self) -> float:
        return float(np.sum(self.kweights[:, None] * self.occupations))


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


_NAMELIST_VALUE = r"\s*=\s*([-+0-9.eEdD]+)"


def read_ldos_energy_grid(path: str | os.PathLike[str]) -> tuple[float, float, float, float]:
    """``(emin, emax, delta_e, degauss_ldos)`` in eV from a pp.x plot_num=3 input."""
    path = Path(path)
    if not path.is_file():
        raise QEError(
            f"missing energy-grid file {path}: the pp.x LDOS input (emin, emax, delta_e, "
            "degauss_ldos) is needed to know the energy of each cube"
        )
    text = path.read_text(errors="replace")
    values = {}
    for key in ("emin", "emax", "delta_e", "degauss_ldos"):
        match = re.search(rf"\b{key}{_NAMELIST_VALUE}", text, re.I)
        if match is None:
            raise QEError(f"{path}: no {key} in the pp.x input")
        values[key] = float(match.group(1).replace("d", "e").replace("D", "e"))
    if (
        not re.search(rf"\bplot_num{_NAMELIST_VALUE}", text)
        or int(
            re.search(rf"\bplot_num{_NAMELIST_VALUE}", text).group(1)  # type: ignore[union-attr]
        )
        != 3
    ):
        raise QEError(f"{path}: not an LDOS input (plot_num = 3 expected)")
    return values["emin"], values["emax"], values["delta_e"], values["degauss_ldos"]


def electronic_temperature_k(degauss_ev: float) -> float:
    """Temperature whose k_B T equals the smearing width."""
    return degauss_ev / BOLTZMANN_EV_PER_K


# ----------------------------------------------------------------------------- ingest

_LDOS_TO_EV_ANGSTROM = 1.0 / (RYDBERG_EV * BOHR_ANGSTROM**3)  # 1/(Ry bohr^3) -> 1/(eV A^3)
_DENSITY_TO_ANGSTROM = 1.0 / BOHR_ANGSTROM**3
# A level this many broadening widths outside the window has negligible weight inside it
# (Fermi-Dirac derivative tail exp(-x): < 1e-5 of a state).
_WINDOW_MARGIN_WIDTHS = 12.0


def _find_xml(directory: Path) -> Path:
    found = sorted(directory.glob("**/*.save/data-file-schema.xml"))
    if not found:
        raise QEError(f"{directory}: no <prefix>.save/data-file-schema.xml (pw.x XML) found")
    if len(found) > 1:
        raise QEError(f"{directory}: several pw.x XML files {[str(p) for p in found]}; keep one")
    return found[0]


def _ldos_cubes(directory: Path, steps: float) -> list[Path]:
    """The LDOS cubes in energy order; every index 1..count must be present.

    pp.x writes int(steps) + 1 cubes, steps = (emax - emin) / delta_e. When steps is
    an integer up to rounding, pp.x's own rounding decides, so either count is accepted.
    """
    pattern = re.compile(rf"{re.escape(LDOS_STEM)}(\d+)\.cube$")
    by_index = {
        int(m.group(1)): p for p in directory.iterdir() if (m := pattern.match(p.name)) is not None
    }
    count = math.floor(steps + 1e-6) + 1
    if abs(steps - round(steps)) < 1e-6 and count - 1 in by_index and count not in by_index:
        count -= 1
    missing = [i for i in range(1, count + 1) if i not in by_index]
    extra = sorted(set(by_index) - set(range(1, count + 1)))
    if missing or extra:
        names = [f"{LDOS_STEM}{i:03d}.cube" for i in missing[:5]]
        raise QEError(
            f"{directory}: the energy grid of pp_ldos.in has {count} energies, but "
            + (f"LDOS files are missing: {', '.join(names)}" if missing else "")
            + (" and " if missing and extra else "")
            + (f"there are extra LDOS files with indices {extra[:5]}" if extra else "")
        )
    return [by_index[i] for i in range(1, count + 1)]


def _check_cube_geometry(cube: Cube, path: Path, reference: Cube, reference_path: Path) -> None:
    if cube.data.shape != reference.data.shape:
        raise QEError(
            f"{path}: grid {cube.data.shape} differs from {reference_path} ({reference.data.shape})"
        )
    if not np.allclose(cube.voxel, reference.voxel, atol=1e-5):
        raise QEError(f"{path}: cell differs from {reference_path}")


def _check_cube_matches_run(cube: Cube, path: Path, run: PwResult) -> None:
    cell_bohr = run.cell / BOHR_ANGSTROM
    if tuple(cube.data.shape) != tuple(run.fft_grid):
        raise QEError(f"{path}: grid {cube.data.shape} differs from pw.x's FFT grid {run.fft_grid}")
    if not np.allclose(cube.cell, cell_bohr, atol=1e-4):
        raise QEError(f"{path}: cell differs from the pw.x run's cell (another run's cube?)")
    if len(cube.numbers) != len(run.symbols):
        raise QEError(f"{path}: {len(cube.numbers)} atoms, the pw.x run has {len(run.symbols)}")
    frac = (cube.positions - run.positions / BOHR_ANGSTROM) @ np.linalg.inv(cell_bohr)
    if np.abs(frac - np.round(frac)).max() > 1e-4:
        raise QEError(f"{path}: atom positions differ from the pw.x run (another run's cube?)")


def _check_window_covers_bands(run: PwResult, emin: float, emax: float, width: float) -> None:
    margin = _WINDOW_MARGIN_WIDTHS * width
    lowest = float(run.eigenvalues.min())
    if emin > lowest - margin:
        raise QEError(
            f"LDOS window starts at {emin:.3f} eV, but the lowest band is at {lowest:.3f} eV: "
            f"occupied states are cut off; use emin <= {lowest - margin:.2f} eV"
        )
    top_band_floor = float(run.eigenvalues[:, -1].min())
    if top_band_floor < emax + margin:
        raise QEError(
            f"LDOS window ends at {emax:.3f} eV, but the highest computed band "
            f"({run.eigenvalues.shape[1]}) comes down to {top_band_floor:.3f} eV: states above "
            "it are missing in the window; "
            "rerun pw.x with more bands (nbnd)"
        )


def ingest(
    directory: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    descriptor_params: BispectrumParams | None = None,
    ldos_mantissa_bits: int = 23,
    threads: int | None = None,
    progress: bool = True,
) -> Path:
    """Turn a run directory (layout of :func:`run_qe`) into one snapshot file.

    ``descriptor_params`` None stores no descriptors (add them later with
    :func:`mlsurrogate.data.add_descriptors`). ``ldos_mantissa_bits`` < 23 rounds the
    stored LDOS (see :func:`mlsurrogate.data.round_mantissa`); the default keeps it exact.
    """
    from tqdm import tqdm

    from mlsurrogate.data import round_mantissa, write_snapshot
    from mlsurrogate.descriptors import compute_grid_descriptors

    directory = Path(directory)
    if not directory.is_dir():
        raise QEError(f"{directory}: not a directory")
    pw_out = directory / "pw.out"
    printed = read_pw_output(pw_out)
    xml_path = _find_xml(directory)
    run = read_pw_xml(xml_path)
    if not run.converged:
        raise QEError(f"{xml_path}: the SCF did not converge; this run cannot be used")
    for term in ("total", "one_electron", "hartree", "xc", "ewald", "smearing"):
        if abs(printed[term] - run.energies[term]) > 1e-6 * RYDBERG_EV:
            raise QEError(
                f"{pw_out} and {xml_path} disagree on the {term} energy "
                f"({printed[term]:.8f} vs {run.energies[term]:.8f} eV): files of different runs?"
            )
    kernel = BROADENING_KERNELS.get(run.smearing.lower())
    if kernel is None:
        raise QEError(f"{xml_path}: smearing {run.smearing!r} unknown; LDOS kernel undefined")
    emin, emax, spacing, width = read_ldos_energy_grid(directory / "pp_ldos.in")
    steps = (emax - emin) / spacing
    _check_window_covers_bands(run, emin, emin + spacing * math.floor(steps + 1e-6), width)
    cubes = _ldos_cubes(directory, steps)
    energies = emin + spacing * np.arange(len(cubes))
    upf_paths = {
        s: Path(run.pseudo_dir) / f if (Path(run.pseudo_dir) / f).is_file() else directory / f
        for s, f in run.pseudopotentials.items()
    }
    upf = {s: read_upf(p) for s, p in upf_paths.items()}
    core_densities = {
        s: read_upf_core_density(upf_paths[s]) for s, u in upf.items() if u.core_correction
    }
    nval = sum(upf[s].z_valence for s in run.symbols)
    if abs(nval - run.nelec) > 1e-6:
        raise QEError(
            f"{xml_path}: {run.nelec} electrons, but the UPF valence charges sum to {nval}: "
            "charged cells are not supported"
        )

    first = read_cube(cubes[0])
    _check_cube_matches_run(first, cubes[0], run)
    ldos = np.empty((*first.data.shape, len(cubes)), dtype=np.float32)
    for index, path in enumerate(tqdm(cubes, desc="reading LDOS cubes", disable=not progress)):
        cube = first if index == 0 else read_cube(path)
        _check_cube_geometry(cube, path, first, cubes[0])
        stated = re.search(r"Energy\s*=\s*(\S+)\s*eV", cube.comment)
        if stated is None or abs(float(stated.group(1)) - energies[index]) > 1e-3:
            raise QEError(
                f"{path}: header energy {stated.group(1) if stated else '(none)'} eV, "
                f"but pp_ldos.in puts cube {index + 1} at {energies[index]:.4f} eV"
            )
        ldos[..., index] = cube.data * _LDOS_TO_EV_ANGSTROM
    if ldos_mantissa_bits < 23:
        ldos = round_mantissa(ldos, ldos_mantissa_bits)

    density = None
    density_path = directory / DENSITY_CUBE
    if density_path.exists():
        cube = read_cube(density_path)
        _check_cube_geometry(cube, density_path, first, cubes[0])
        density = cube.data * _DENSITY_TO_ANGSTROM

    atoms = ase.Atoms(run.symbols, positions=run.positions, cell=run.cell, pbc=True)
    descriptors = None
    if descriptor_params is not None:
        descriptors = compute_grid_descriptors(
            atoms, ldos.shape[:3], descriptor_params, threads=threads, progress=progress
        )
    attributes = {
        "energy_min_eV": float(emin),
        "energy_spacing_eV": float(spacing),
        "ldos_units": "1/(eV*Angstrom^3)",
        "ldos_broadening_kernel": kernel,
        "ldos_broadening_eV": float(width),
        "ldos_mantissa_bits": int(ldos_mantissa_bits),
        "electronic_temperature_K": electronic_temperature_k(run.degauss),
        "smearing": run.smearing,
        "smearing_width_eV": run.degauss,
        "fermi_energy_eV": run.fermi_energy,
        "num_valence_electrons": float(nval),
        "valence_charges": {s: u.z_valence for s, u in upf.items()},
        "masses": run.masses,
        "pseudopotentials": run.pseudopotentials,
        "core_correction": {s: u.core_correction for s, u in upf.items()},
        "xc_functional": run.functional,
        "ecutwfc_eV": run.ecutwfc,
        "ecutrho_eV": run.ecutrho,
        "kpoint_grid": np.array(run.kpoint_grid, dtype=np.int64),
        "qe_version": f"Quantum ESPRESSO {run.qe_version}",
        "source": str(directory.resolve()),
        **{f"energy_{term}_eV": value for term, value in run.energies.items()},
        "energy_band_eV": run.band_energy,
    }
    reference = {
        "forces": run.forces,
        "stress": run.stress,
        "eigenvalues": run.eigenvalues,
        "occupations": run.occupations,
        "kweights": run.kweights,
    }
    return write_snapshot(
        output,
        atoms=atoms,
        energies=energies,
        ldos=ldos,
        reference=reference,
        attributes=attributes,
        density=density,
        descriptors=descriptors,
        descriptor_params=descriptor_params,
        core_densities=core_densities,
    )
