"""The LDOS from pw.x's wavefunctions (one pass over all energies) against pp.x's cubes,
the LDOS on a denser k-grid (a non-self-consistent pw.x run), and bad input."""

from __future__ import annotations

import math
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk

from conftest import TINY_SETTINGS, tiny_atoms
from mlsurrogate.data import Snapshot
from mlsurrogate.qe import (
    EnergyWindowError,
    NonSelfConsistentLdosWarning,
    QEError,
    QESettings,
    compute_ldos,
    ingest,
    read_ldos_file,
    read_pw_xml,
    run_ldos,
    run_qe,
)
from mlsurrogate.qe.ldos import kernel_values
from mlsurrogate.qe.wavefunctions import read_wavefunctions

pytestmark = [
    pytest.mark.qe,
    pytest.mark.filterwarnings("ignore::mlsurrogate.qe.ApproximateIntegrationWarning"),
]
WAVEFUNCTIONS = replace(TINY_SETTINGS, ldos_program="wavefunctions")
# pp.x prints cubes with 5 significant digits: the two LDOS agree to that, relative to
# the largest value (3e-5 measured on 32-atom Al, benchmarks/ldos_kpoints.py --pp-x)
CUBE_PRECISION = 1e-4
ASYMMETRIC = replace(TINY_SETTINGS, kpts=(3, 3, 3), nbnd=16, ldos_emin_ev=-10.0)


def _scf_copy(scf_run: Path, directory: Path) -> Path:
    """The SCF of ``scf_run`` (input, output, save directory) without its LDOS."""
    directory.mkdir()
    for name in ("pw.in", "pw.out"):
        shutil.copy2(scf_run / name, directory / name)
    shutil.copytree(scf_run / "out", directory / "out")
    return directory


def _ldos(snapshot: Path) -> np.ndarray:
    with Snapshot(snapshot) as snap:
        return snap.ldos[()]


def _two_atom_cell():
    """Two displaced atoms in a simple-cubic Al cell: no symmetry left to reduce k."""
    atoms = bulk("Al", "sc", a=2.9).repeat((2, 1, 1))
    atoms.positions[0] += (0.07, -0.03, 0.05)
    return atoms


@pytest.fixture(scope="module")
def asymmetric_run(tmp_path_factory) -> Path:
    """SCF + pp.x cubes of a structure without symmetry (pw.x uses its wavefunctions)."""
    return run_qe(
        _two_atom_cell(), ASYMMETRIC, tmp_path_factory.mktemp("asym") / "run", progress=False
    )


def test_ldos_from_the_scf_wavefunctions_equals_pp_x(asymmetric_run, tmp_path):
    run = _scf_copy(asymmetric_run, tmp_path / "run")
    settings = replace(ASYMMETRIC, ldos_program="wavefunctions")
    assert read_pw_xml(run / "out/pwscf.save/data-file-schema.xml").symmetry_count == 1
    run_ldos(_two_atom_cell(), settings, run, progress=False)
    assert not (run / "ldos_nscf").exists()  # the SCF's own wavefunctions were used
    ours = _ldos(ingest(run, tmp_path / "ours.h5", progress=False))
    cubes = _ldos(ingest(asymmetric_run, tmp_path / "pp.h5", progress=False))
    assert ours.shape == cubes.shape
    assert np.abs(ours - cubes).max() < CUBE_PRECISION * np.abs(cubes).max()


def test_ldos_of_a_symmetric_cell_comes_from_an_unreduced_nscf_and_equals_pp_x(
    tiny_qe_run, tmp_path
):
    """One fcc atom: the SCF used 48 symmetries, pp.x symmetrises its LDOS; the one pass
    runs on a nosym nscf of the same 4x4x4 grid. Both must agree."""
    assert read_pw_xml(tiny_qe_run / "out/pwscf.save/data-file-schema.xml").symmetry_count > 1
    run = _scf_copy(tiny_qe_run, tmp_path / "run")
    run_ldos(tiny_atoms(), WAVEFUNCTIONS, run, progress=False)
    assert (run / "ldos_nscf" / "pw.out").is_file()
    assert not (run / "ldos_nscf" / "out").exists(), "the nscf wavefunctions were kept"
    ours = ingest(run, tmp_path / "ours.h5", progress=False)  # the nscf output is no SCF's
    cubes = _ldos(ingest(tiny_qe_run, tmp_path / "pp.h5", progress=False))
    assert np.abs(_ldos(ours) - cubes).max() < CUBE_PRECISION * np.abs(cubes).max()
    with Snapshot(ours) as snap:
        assert list(snap.attrs["ldos_kpoint_grid"]) == [4, 4, 4]


def test_window_past_the_scf_bands_gets_an_nscf_with_more_bands(asymmetric_run, tmp_path):
    """A window end that the SCF's 16 bands do not reach (as for the 32-atom liquid with
    the default band count): the LDOS comes from a nosym nscf on the same k-grid with
    more bands, and equals pp.x's cubes where those cover the window."""
    scf = read_pw_xml(asymmetric_run / "out/pwscf.save/data-file-schema.xml")
    floor = float(scf.eigenvalues[:, -1].min())
    spacing = ASYMMETRIC.ldos_spacing_ev
    emax = ASYMMETRIC.ldos_emin_ev + spacing * np.ceil((floor - ASYMMETRIC.ldos_emin_ev) / spacing)
    settings = replace(ASYMMETRIC, ldos_program="wavefunctions", ldos_emax_ev=float(emax))
    with pytest.raises(EnergyWindowError, match="rerun pw.x with more bands"):
        scf.check_ldos_window(settings.ldos_emin_ev, emax, settings.ldos_broadening)
    bands = scf.bands_for_window_end(emax, settings.ldos_broadening)
    assert bands is not None and bands > scf.eigenvalues.shape[1]
    run = _scf_copy(asymmetric_run, tmp_path / "run")
    run_ldos(_two_atom_cell(), settings, run, progress=False)
    assert f"nbnd = {bands}" in (run / "ldos_nscf" / "pw.in").read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonSelfConsistentLdosWarning)  # the SCF's own k-grid
        ours = _ldos(ingest(run, tmp_path / "ours.h5", progress=False))
    cubes = _ldos(ingest(asymmetric_run, tmp_path / "pp.h5", progress=False))
    common = cubes.shape[-1]
    assert ours.shape[-1] > common
    assert np.abs(ours[..., :common] - cubes).max() < CUBE_PRECISION * np.abs(cubes).max()


def test_denser_ldos_kgrid_is_recorded_and_holds_the_electrons(tiny_qe_run, tmp_path):
    run = _scf_copy(tiny_qe_run, tmp_path / "run")
    run_ldos(tiny_atoms(), replace(WAVEFUNCTIONS, ldos_kpts=(6, 6, 6)), run, progress=False)
    computed = read_ldos_file(run / "ldos.h5")
    assert computed.kpoint_grid == (6, 6, 6)
    assert computed.kweights.sum() == pytest.approx(2.0, abs=1e-10)
    assert len(computed.kweights) > 100  # the full 6^3 grid up to time reversal
    with pytest.warns(NonSelfConsistentLdosWarning, match=r"non-self-consistent run on a "
                      r"\(6, 6, 6\) k-grid.*differs from QE's total energy by"):  # fmt: skip
        snapshot = ingest(run, tmp_path / "dense.h5", progress=False)
    coarse = ingest(tiny_qe_run, tmp_path / "coarse.h5", progress=False)
    with Snapshot(snapshot) as snap, Snapshot(coarse) as ref:
        assert list(snap.attrs["ldos_kpoint_grid"]) == [6, 6, 6]
        assert list(snap.attrs["kpoint_grid"]) == [4, 4, 4]  # the SCF's energies stay
        assert snap.attrs["energy_total_eV"] == ref.attrs["energy_total_eV"]
        ldos = snap.ldos[()].astype(np.float64)
        # every |psi_nk|^2 integrates to 1 over the cell: the states in the window are the
        # broadened eigenvalues of the 6^3 k-set summed over the energy grid
        states = ldos.sum() * snap.atoms.get_volume() / math.prod(ldos.shape[:3])
        x = (snap.energies[:, None, None] - computed.eigenvalues[None]) / computed.width
        expected = (
            np.einsum("ekn,k->", kernel_values(computed.kernel, x), computed.kweights)
            / computed.width
        )
        assert states == pytest.approx(expected, rel=1e-5)
        assert np.abs(ldos - ref.ldos[()]).max() > 1e-3 * np.abs(ldos).max()  # k matters


def test_wavefunction_file_errors_name_the_file(tiny_qe_run, tmp_path):
    wfc = tmp_path / "wfc1.dat"
    data = (tiny_qe_run / "out/pwscf.save/wfc1.dat").read_bytes()
    assert read_wavefunctions(tiny_qe_run / "out/pwscf.save/wfc1.dat").coefficients.shape[0] == 10
    wfc.write_bytes(data[: len(data) // 2])
    with pytest.raises(QEError, match=r"wfc1\.dat: truncated record"):
        read_wavefunctions(wfc)
    wfc.write_bytes(b"not fortran at all")
    with pytest.raises(QEError, match=r"wfc1\.dat: "):
        read_wavefunctions(wfc)


def test_missing_wavefunctions_are_a_clear_error(asymmetric_run, tmp_path):
    run = _scf_copy(asymmetric_run, tmp_path / "run")
    for wfc in (run / "out/pwscf.save").glob("wfc*.dat"):
        wfc.unlink()
    with pytest.raises(QEError, match=r"(\d+) of \1 wavefunction files missing"):
        compute_ldos(run / "out/pwscf.save", np.array([0.0, 1.0]), 0.3, "fermi-dirac-derivative")


def test_ultrasoft_pseudopotential_stops_before_pw_x(tmp_path):
    settings = QESettings(pseudopotentials={"Cu": "Cu.pz-d-rrkjus.UPF"}, kpts=(2, 2, 2))
    with pytest.raises(QEError, match=r"Cu\.pz-d-rrkjus\.UPF: Cu is ultrasoft or PAW.*pp\.x"):
        run_qe(bulk("Cu", "fcc", a=3.6), settings, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"smearing": "mv"}, r"smearing 'mv': the LDOS from wavefunctions"),
        ({"ldos_program": "pp.x", "ldos_kpts": (6, 6, 6)}, r"'pp\.x' computes the LDOS on the SCF"),
        ({"ldos_program": "pw.x"}, r"ldos_program 'pw\.x' is not one of"),
        ({"ldos_kpts": (6, 6)}, r"ldos_kpts must be three integers"),
        ({"ldos_kspacing": -0.1}, r"ldos_kspacing must be > 0"),
    ],
)
def test_bad_ldos_settings_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        QESettings(**change).validate()


def test_ldos_file_next_to_cubes_is_ambiguous(tiny_qe_run, tmp_path):
    run = Path(shutil.copytree(tiny_qe_run, tmp_path / "run"))
    scf_only = _scf_copy(tiny_qe_run, tmp_path / "scf")
    run_ldos(tiny_atoms(), WAVEFUNCTIONS, scf_only, progress=False)
    shutil.copy2(scf_only / "ldos.h5", run / "ldos.h5")
    with pytest.raises(QEError, match=r"both an LDOS file .*ldos\.h5.* and LDOS cubes"):
        ingest(run, tmp_path / "x.h5", progress=False)
    # naming the cubes chooses them
    ingest(run, tmp_path / "x.h5", ldos="ldos_*.cube", progress=False)
