"""Quantum ESPRESSO pipeline: real pw.x + pp.x runs, ingest, and bad input."""

from __future__ import annotations

import math
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from conftest import (
    TINY_SETTINGS,
    broadened_ldos_run,
    run_with_file_size_limit,
    tiny_atoms,
    venv_tool,
)
from mlsurrogate import cli
from mlsurrogate.data import REQUIRED_ATTRIBUTES, Snapshot, round_mantissa, summary
from mlsurrogate.descriptors import BispectrumParams, compute_grid_descriptors
from mlsurrogate.evaluate import evaluate_dft
from mlsurrogate.files import OutputError
from mlsurrogate.qe import (
    ApproximateIntegrationWarning,
    QEError,
    QESettings,
    find_run_files,
    ingest,
    mpi_commands,
    read_cube,
    read_pw_clock,
    read_pw_output,
    read_pw_xml,
    read_upf,
    run_qe,
    write_pw_input,
)
from mlsurrogate.units import BOHR_ANGSTROM, BOLTZMANN_EV_PER_K, RYDBERG_EV

# TINY_SETTINGS broaden the LDOS by 0.3 eV, not k_B T: every ingest of that run warns that
# its integrals are approximate. Tests of the warning catch it with pytest.warns.
pytestmark = [
    pytest.mark.qe,
    pytest.mark.filterwarnings("ignore::mlsurrogate.qe.ApproximateIntegrationWarning"),
]
SMALL_PARAMS = BispectrumParams(twojmax=2)


def fermi_cdf(x: np.ndarray) -> np.ndarray:
    """Integral of the Fermi-Dirac derivative kernel -f'(t) from -inf to x."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def no_leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if ".part" in p.name]


@pytest.fixture(scope="module")
def tiny_snapshot(tiny_qe_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("snap") / "tiny.h5"
    return ingest(tiny_qe_run, out, descriptor_params=SMALL_PARAMS, progress=False)


def test_run_writes_every_file(tiny_qe_run):
    names = {p.name for p in tiny_qe_run.iterdir()}
    assert {"pw.in", "pw.out", "pp_ldos.in", "pp_density.in", "density.cube"} <= names
    assert len([n for n in names if re.fullmatch(r"ldos_\d{3}\.cube", n)]) == 73
    assert not [n for n in names if re.fullmatch(r"ldos_\d{3}", n)], "pp.x raw files kept"


def test_mpi_commands_use_debians_mpirun_with_pools():
    assert mpi_commands(1) == {"pw_command": "pw.x", "pp_command": "pp.x"}
    parallel = mpi_commands(2)
    if Path("/usr/bin/mpirun").exists():  # Debian's QE is linked to its Open MPI
        assert parallel == {
            "pw_command": "/usr/bin/mpirun -n 2 pw.x -nk 2",
            "pp_command": "/usr/bin/mpirun -n 2 pp.x",
        }
    else:
        assert parallel == mpi_commands(1)


def test_pw_input_has_exact_smearing_and_kgrid():
    text = write_pw_input(tiny_atoms(), TINY_SETTINGS)
    degauss = float(re.search(r"degauss = (\S+)", text).group(1))
    assert degauss * RYDBERG_EV / BOLTZMANN_EV_PER_K == pytest.approx(933.0, rel=1e-14)
    assert "4 4 4 0 0 0" in text
    # k-point spacing rule: 8x8x8 for the 4-atom cubic cell, 4x4x4 for 32 atoms
    from ase.build import bulk

    cubic = bulk("Al", "fcc", a=4.05, cubic=True)
    assert "8 8 8 0 0 0" in write_pw_input(cubic, QESettings())
    assert "4 4 4 0 0 0" in write_pw_input(cubic.repeat(2), QESettings())


def test_pw_clock_in_every_format_qe_prints(tiny_qe_run, tmp_path):
    real = read_pw_clock(tiny_qe_run / "pw.out")
    assert 0 < real["cpu"] < 600 and 0 < real["wall"] < 600
    lines = {
        "     PWSCF        :  2m36.51s CPU   2m40.20s WALL": (156.51, 160.2),
        "     PWSCF        :    1h36m CPU    1h40m WALL": (5760.0, 6000.0),
        "     PWSCF        :    1d 2h 5m CPU    1d 3h 0m WALL": (93900.0, 97200.0),
    }
    earlier = "     PWSCF        :      1.00s CPU      1.00s WALL"  # the last line counts
    for line, (cpu, wall) in lines.items():
        (tmp_path / "pw.out").write_text(f"{earlier}\n{line}\n")
        assert read_pw_clock(tmp_path / "pw.out") == pytest.approx({"cpu": cpu, "wall": wall})
    (tmp_path / "pw.out").write_text("     iteration #  2     ecut=    20.00 Ry\n")
    with pytest.raises(QEError, match="did not end"):
        read_pw_clock(tmp_path / "pw.out")


def test_readers_on_real_output(tiny_qe_run):
    printed = read_pw_output(tiny_qe_run / "pw.out")
    run = read_pw_xml(next(tiny_qe_run.glob("out/*.save/data-file-schema.xml")))
    assert run.converged and run.symbols == ["Al"] and run.nelec == 3.0
    # XML values equal the printout (8 decimals in Ry)
    for term in ("total", "one_electron", "hartree", "xc", "ewald", "smearing", "internal"):
        assert run.energies[term] == pytest.approx(printed[term], abs=1e-8 * RYDBERG_EV)
    assert run.fermi_energy == pytest.approx(printed["fermi"], abs=1e-4)
    total = sum(run.energies[t] for t in ("one_electron", "hartree", "xc", "ewald", "smearing"))
    assert total == pytest.approx(run.energies["total"], abs=1e-9)
    # temperature from degauss exactly, not from the rounded printout
    assert run.degauss / BOLTZMANN_EV_PER_K == pytest.approx(933.0, rel=1e-9)
    assert run.electron_count == pytest.approx(3.0, abs=1e-8)
    assert run.kweights.sum() == pytest.approx(2.0)
    np.testing.assert_allclose(run.positions, tiny_atoms().positions, atol=1e-8)
    np.testing.assert_allclose(run.cell, np.asarray(tiny_atoms().cell), atol=1e-8)
    assert np.abs(run.forces.sum(axis=0)).max() < 1e-6  # Newton's third law
    upf = read_upf("/usr/share/espresso/pseudo/Al.pz-vbc.UPF")
    assert (upf.element, upf.z_valence, upf.core_correction) == ("Al", 3.0, False)


def test_snapshot_contents_and_units(tiny_qe_run, tiny_snapshot):
    with Snapshot(tiny_snapshot) as snap:
        attrs = snap.attrs
        assert set(REQUIRED_ATTRIBUTES) <= set(attrs)
        assert attrs["num_valence_electrons"] == 3.0
        assert attrs["valence_charges"] == {"Al": 3.0}
        assert attrs["ldos_broadening_kernel"] == "fermi-dirac-derivative"
        assert attrs["ldos_broadening_eV"] == pytest.approx(0.3, rel=1e-12)
        assert attrs["electronic_temperature_K"] == pytest.approx(933.0, rel=1e-9)
        energies = snap.energies
        np.testing.assert_allclose(energies, -8.0 + 0.25 * np.arange(73), atol=1e-12)
        ldos, density = snap.ldos[()], snap.density[()]
        assert ldos.dtype == np.float32 and ldos.shape[3] == 73
        # units: LDOS = cube value / (Ry bohr^3) in 1/(eV A^3); density / bohr^3 in 1/A^3
        cube = read_cube(tiny_qe_run / "ldos_040.cube")
        np.testing.assert_allclose(
            ldos[..., 39], cube.data / (RYDBERG_EV * BOHR_ANGSTROM**3), rtol=1e-6, atol=0
        )
        dcube = read_cube(tiny_qe_run / "density.cube")
        np.testing.assert_allclose(density, dcube.data / BOHR_ANGSTROM**3, rtol=1e-12)
        volume, npts = snap.atoms.get_volume(), ldos[..., 0].size
        assert density.sum() * volume / npts == pytest.approx(3.0, rel=1e-4)
        # integral of the DOS over the window = broadened count of the eigenvalues in it
        dos = ldos.reshape(npts, -1).sum(axis=0) * volume / npts
        eig, w = snap.reference("eigenvalues"), snap.reference("kweights")
        width = attrs["ldos_broadening_eV"]
        count = np.sum(
            w[:, None]
            * (fermi_cdf((energies[-1] - eig) / width) - fermi_cdf((energies[0] - eig) / width))
        )
        assert np.trapezoid(dos, energies) == pytest.approx(count, rel=1e-3)
        # descriptors computed by our kernel on the same grid
        expected = compute_grid_descriptors(snap.atoms, snap.grid_shape, SMALL_PARAMS)
        np.testing.assert_allclose(snap.descriptors[()], expected, rtol=1e-6, atol=1e-7)
        assert snap.descriptor_params == SMALL_PARAMS
        assert np.isfinite(snap.reference("stress")).all()


def test_cli_run_ingest_info(tiny_qe_run, tmp_path, capsys):
    structure = tmp_path / "al.xyz"
    tiny_atoms().write(structure)
    rundir = tmp_path / "cli_run"
    argv = [
        "qe",
        "run",
        str(structure),
        "-o",
        str(rundir),
        "--ecutwfc",
        "12",
        "--kpts",
        "4",
        "4",
        "4",
        "--nbnd",
        "10",
        "--emin",
        "-8",
        "--emax",
        "-2",
        "--de",
        "0.5",
        "--broadening",
        "0.3",
        "--conv-thr",
        "1e-9",
        "-q",
    ]
    assert cli.main(argv) == 0
    out = tmp_path / "cli.h5"
    assert cli.main(["qe", "ingest", str(rundir), "-o", str(out), "--twojmax", "2", "-q"]) == 0
    # a window without mu: the approximate rule's error cannot be measured, and says so
    err = capsys.readouterr().err
    assert "mlsurrogate qe ingest: warning:" in err and "cannot be compared" in err
    assert cli.main(["data", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Al, 1 atoms" in text and "13 energies, -8.0000 .. -2.0000 eV" in text
    assert "descriptors  (" in text and "T = 933.000 K" in text
    assert "width 0.300000 eV (approximate energy integrals)" in text


@pytest.mark.parametrize(
    "verb",
    [
        [],
        ["qe"],
        ["qe", "run"],
        ["qe", "ingest"],
        ["data"],
        ["data", "info"],
        ["data", "descriptors"],
    ],
)
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*verb, "--help"])
    assert exit_info.value.code == 0
    assert "usage: mlsurrogate" in capsys.readouterr().out


def test_unconverged_scf_is_an_error(tmp_path):
    settings = QESettings(**{**TINY_SETTINGS.__dict__, "electron_maxstep": 2, "conv_thr_ry": 1e-12})
    with pytest.raises(QEError, match="did not converge in 2 iterations"):
        run_qe(tiny_atoms(), settings, tmp_path / "run", progress=False)
    # and ingest of that directory refuses it, writing nothing
    out = tmp_path / "bad.h5"
    with pytest.raises(QEError, match=r"pw\.out: the SCF did not converge"):
        ingest(tmp_path / "run", out, progress=False)
    assert not out.exists()


def test_missing_program_is_a_clear_error(tmp_path):
    settings = QESettings(**{**TINY_SETTINGS.__dict__, "pw_command": "no-such-pw.x -nk 2"})
    with pytest.raises(QEError, match="'no-such-pw.x' not found on PATH"):
        run_qe(tiny_atoms(), settings, tmp_path / "run", progress=False)


def _truncate(path: Path) -> None:
    text = path.read_text()
    path.write_text(text[: len(text) // 2])


def _corrupt(path: Path) -> None:
    lines = path.read_text().splitlines()
    lines[20] = lines[20][:5] + "x.y*z" + lines[20][10:]
    path.write_text("\n".join(lines) + "\n")


def _other_grid(path: Path) -> None:
    lines = path.read_text().splitlines()
    n = int(lines[3].split()[0])
    lines[3] = lines[3].replace(f"{n:5d}", f"{n // 2:5d}", 1)
    values = " ".join(lines[6 + int(lines[2].split()[0]) :]).split()
    keep = (n // 2) * n * n
    path.write_text("\n".join(lines[:7] + [" ".join(values[:keep])]) + "\n")


def _other_cell(path: Path) -> None:
    lines = path.read_text().splitlines()
    fields = lines[4].split()
    fields[1] = f"{float(fields[1]) * 1.01:.6f}"
    lines[4] = "   " + "   ".join(fields)
    path.write_text("\n".join(lines) + "\n")


def _poison(path: Path, value: str = "nan") -> None:
    lines = path.read_text().splitlines()
    fields = lines[-1].split()
    fields[0] = value
    lines[-1] = " ".join(fields)
    path.write_text("\n".join(lines) + "\n")


def _set_header_energy(path: Path, energy: float) -> None:
    lines = path.read_text().splitlines()
    lines[1] = re.sub(r"Energy =\s*\S+ eV", f"Energy = {energy:.4f} eV", lines[1])
    path.write_text("\n".join(lines) + "\n")


BAD_INPUTS = {
    "truncated cube": (lambda d: _truncate(d / "ldos_007.cube"), r"ldos_007\.cube: truncated"),
    "corrupt cube": (lambda d: _corrupt(d / "ldos_010.cube"), r"ldos_010\.cube: corrupt cube"),
    "different grid": (lambda d: _other_grid(d / "ldos_005.cube"), r"ldos_005\.cube: grid"),
    "different cell": (lambda d: _other_cell(d / "ldos_003.cube"), r"ldos_003\.cube: cell differs"),
    "density on another grid": (lambda d: _other_grid(d / "density.cube"), r"density\.cube: grid"),
    "missing energy file": (
        lambda d: (d / "ldos_012.cube").unlink(),
        r"LDOS files are missing: ldos_012\.cube",
    ),
    "cube with NaN": (lambda d: _poison(d / "ldos_009.cube"), r"ldos_009\.cube: cube holds NaN"),
    "density with inf": (
        lambda d: _poison(d / "density.cube", "inf"),
        r"density\.cube: cube holds NaN or infinite",
    ),
    "two pw.x outputs": (
        lambda d: shutil.copy(d / "pw.out", d / "old.out"),
        r"several pw\.x output .*old\.out.*pw\.out.*--pw-out",
    ),
    "two XML files": (
        lambda d: shutil.copytree(d / "out" / "pwscf.save", d / "out" / "other.save"),
        r"several pw\.x XML .*other\.save.*pwscf\.save.*--xml",
    ),
    "cube not on the energy grid": (
        lambda d: _set_header_energy(d / "ldos_004.cube", -7.1234),
        r"ldos_004\.cube: energy -7\.1234 eV is not on the energy grid",
    ),
    "non-QE output": (
        lambda d: (d / "pw.out").write_text("hello\nworld\n"),
        r"no pw\.x output \('Program PWSCF'\) found; name it with --pw-out",
    ),
    "non-QE XML": (
        lambda d: next(d.glob("out/*.save/data-file-schema.xml")).write_text("<a>"),
        r"data-file-schema\.xml: not a readable XML",
    ),
    "not a cube": (
        lambda d: (d / "ldos_001.cube").write_text("just text\n"),
        r"LDOS files are missing: ldos_001\.cube \(-8\.0000 eV\)",
    ),
    "extra cube": (
        lambda d: shutil.copy(d / "ldos_001.cube", d / "ldos_099.cube"),
        r"ldos_001\.cube and .*ldos_099\.cube are both LDOS cubes at -8\.0000 eV",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_names_file_and_leaves_nothing(case, tiny_run_copy, tmp_path):
    damage, message = BAD_INPUTS[case]
    damage(tiny_run_copy)
    out = tmp_path / "out" / "snap.h5"
    out.parent.mkdir()
    with pytest.raises(QEError, match=message):
        ingest(tiny_run_copy, out, progress=False)
    assert not out.exists() and not no_leftovers(out.parent)


def test_cli_reports_bad_input_without_traceback(tiny_run_copy, tmp_path, capsys):
    (tiny_run_copy / "ldos_012.cube").unlink()
    code = cli.main(["qe", "ingest", str(tiny_run_copy), "-o", str(tmp_path / "x.h5"), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "mlsurrogate qe ingest:" in err and "ldos_012.cube" in err
    assert "Traceback" not in err and not (tmp_path / "x.h5").exists()


def test_window_must_cover_occupied_band(tiny_run_copy, tmp_path):
    text = (tiny_run_copy / "pp_ldos.in").read_text()
    (tiny_run_copy / "pp_ldos.in").write_text(text.replace("emin = -8.0", "emin = -3.0"))
    for index in range(1, 21):  # the cubes below -3 eV
        (tiny_run_copy / f"ldos_{index:03d}.cube").unlink()
    with pytest.raises(QEError, match="occupied states are cut off"):
        ingest(tiny_run_copy, tmp_path / "x.h5", progress=False)


def test_mantissa_rounding_is_recorded_and_bounded(tiny_qe_run, tiny_snapshot, tmp_path):
    out = ingest(tiny_qe_run, tmp_path / "r.h5", ldos_mantissa_bits=7, progress=False)
    with Snapshot(out) as rounded, Snapshot(tiny_snapshot) as exact:
        assert rounded.attrs["ldos_mantissa_bits"] == 7
        assert rounded.descriptors is None
        a, b = exact.ldos[()], rounded.ldos[()]
        np.testing.assert_array_equal(b, round_mantissa(a, 7))
        assert np.all(np.abs(b - a) <= 2.0**-8 * np.abs(a))
        assert not math.isclose(float(np.abs(b - a).max()), 0.0)


# ------------------------------------------------------------- any run, by content


def _same_snapshot(a: Path, b: Path) -> None:
    """Two snapshots of the same DFT data: equal arrays and QE numbers."""
    with Snapshot(a) as first, Snapshot(b) as second:
        np.testing.assert_array_equal(first.energies, second.energies)
        np.testing.assert_allclose(first.ldos[()], second.ldos[()], rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(first.density[()], second.density[()], rtol=1e-6)
        for key in ("energy_total_eV", "fermi_energy_eV", "ldos_broadening_eV"):
            assert first.attrs[key] == pytest.approx(second.attrs[key], abs=1e-7), key
        assert first.attrs["ldos_broadening_kernel"] == second.attrs["ldos_broadening_kernel"]


def test_run_files_are_recognised_by_content(user_named_qe_run):
    files = find_run_files(user_named_qe_run)
    assert files.pw_output.name == "scf.out"
    assert files.xml.relative_to(user_named_qe_run) == Path("tmp/alu.save/data-file-schema.xml")
    assert files.ldos_input.name == "ldos.pp" and files.density.name == "density.cube"
    assert [p.name for p in files.ldos_cubes] == [f"ldos{i:03d}.cube" for i in range(1, 74)]


def test_user_named_run_ingests_like_run_qe(user_named_qe_run, tiny_snapshot, tmp_path):
    with pytest.warns(ApproximateIntegrationWarning):
        out = ingest(user_named_qe_run, tmp_path / "user.h5", progress=False)
    _same_snapshot(out, tiny_snapshot)


def test_cube_energy_comes_from_its_header_not_its_name(user_named_qe_run, tmp_path):
    reference = ingest(user_named_qe_run, tmp_path / "ref.h5", progress=False)
    shuffled = Path(shutil.copytree(user_named_qe_run, tmp_path / "shuffled"))
    cubes = sorted(shuffled.glob("ldos*.cube"))
    (shuffled / "cubes").mkdir()
    order = np.random.default_rng(3).permutation(len(cubes))
    for cube, slot in zip(cubes, order):
        cube.rename(shuffled / "cubes" / f"slice_{slot:03d}.cube")
    # without the pp.x input the grid and width come from the headers too
    (shuffled / "ldos.pp").unlink()
    _same_snapshot(ingest(shuffled, tmp_path / "shuffled.h5", progress=False), reference)


def test_overrides_pick_among_candidates(user_named_qe_run, tmp_path, capsys):
    run = Path(shutil.copytree(user_named_qe_run, tmp_path / "run"))
    shutil.copy(run / "scf.out", run / "scf_old.out")
    shutil.copytree(run / "tmp" / "alu.save", run / "tmp" / "old.save")
    out = tmp_path / "x.h5"
    argv = ["qe", "ingest", str(run), "-o", str(out), "--no-descriptors", "-q"]
    assert cli.main(argv) == 2
    assert "--pw-out" in capsys.readouterr().err and not out.exists()
    argv += ["--pw-out", "scf.out", "--xml", "tmp/alu.save/data-file-schema.xml"]
    argv += ["--ldos", "ldos0*.cube", "--density", str(run / "density.cube")]
    assert cli.main(argv) == 0
    _same_snapshot(out, ingest(user_named_qe_run, tmp_path / "ref.h5", progress=False))
    # a glob that leaves out energies of the grid names what is missing
    xml = "tmp/alu.save/data-file-schema.xml"
    with pytest.raises(QEError, match=r"LDOS files are missing: ldos07[0-3]\.cube"):
        ingest(run, out, pw_out="scf.out", xml=xml, ldos="ldos0[0-6]*.cube", progress=False)


def test_output_path_is_checked_before_any_work(tiny_qe_run, tmp_path, capsys):
    missing = tmp_path / "no_such_dir" / "x.h5"
    with pytest.raises(OutputError, match="no_such_dir does not exist"):
        ingest(tmp_path / "not_a_run", missing, progress=False)  # output first, then input
    assert cli.main(["qe", "ingest", str(tiny_qe_run), "-o", str(missing), "-q"]) == 2
    err = capsys.readouterr().err
    assert "mlsurrogate qe ingest:" in err and "no_such_dir" in err and "Traceback" not in err


def test_mala_layout_ldos_imports_like_the_cubes(tiny_qe_run, tiny_snapshot, tmp_path):
    run = Path(shutil.copytree(tiny_qe_run, tmp_path / "run"))
    for cube in run.glob("ldos_*.cube"):
        cube.unlink()
    with Snapshot(tiny_snapshot) as snap:  # MALA's layout: [nx, ny, nz, nE], 1/(eV A^3)
        np.save(tmp_path / "Al_ldos.npy", snap.ldos[()].astype(np.float64))
    out = tmp_path / "mala.h5"
    argv = ["qe", "ingest", str(run), "-o", str(out), "--mala-ldos", str(tmp_path / "Al_ldos.npy")]
    assert cli.main([*argv, "--no-descriptors", "-q"]) == 0
    _same_snapshot(out, tiny_snapshot)
    np.save(tmp_path / "short.npy", np.zeros((2, 2, 2, 73)))
    with pytest.raises(QEError, match=r"short\.npy: MALA LDOS of shape \(2, 2, 2, 73\)"):
        ingest(run, tmp_path / "y.h5", mala_ldos=tmp_path / "short.npy", progress=False)


# ------------------------------------------------------------- other LDOS broadenings

# Free energy from the LDOS minus QE's total energy on the tiny cell (1 atom, 4x4x4 k,
# 933 K, 0.1 eV grid), as docs/qe-ingest.md states; the margin covers BLAS round-off.
DOCUMENTED_ERRORS_MEV_PER_ATOM = {"fd": -21.69, "gaussian": -5.20}
ERROR_MARGIN_MEV_PER_ATOM = 0.1


@pytest.mark.parametrize("kernel", sorted(DOCUMENTED_ERRORS_MEV_PER_ATOM))
def test_other_broadenings_ingest_with_the_documented_error(kernel, tiny_qe_run, tmp_path):
    run = broadened_ldos_run(tiny_qe_run, tmp_path / "run", kernel, 0.1)
    with pytest.warns(ApproximateIntegrationWarning) as record:
        out = ingest(run, tmp_path / "b.h5", progress=False)
    stated = float(re.search(r"by ([-+0-9.]+) meV/atom", str(record[0].message)).group(1))
    assert stated == pytest.approx(
        DOCUMENTED_ERRORS_MEV_PER_ATOM[kernel], abs=ERROR_MARGIN_MEV_PER_ATOM
    )
    with Snapshot(out) as snap:  # the kernel told apart by content, the width from pp.x
        expected = {"fd": "fermi-dirac-derivative", "gaussian": "gaussian"}[kernel]
        assert snap.attrs["ldos_broadening_kernel"] == expected
        assert snap.attrs["ldos_broadening_eV"] == 0.1 and snap.attrs["smearing"] == "fd"
    rows, natoms = evaluate_dft(out)
    total = next(row for row in rows if row.name == "total free energy A")
    assert 1000.0 * (total.ours - total.qe) / natoms == pytest.approx(stated, abs=0.005)


def test_exact_broadening_ingests_without_warning(tiny_qe_run, tmp_path):
    width = BOLTZMANN_EV_PER_K * 933.0
    run = broadened_ldos_run(tiny_qe_run, tmp_path / "run", "fd", width)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ApproximateIntegrationWarning)
        out = ingest(run, tmp_path / "x.h5", progress=False)
    assert "(exact energy integrals)" in summary(out)


def test_kernel_mismatch_is_an_error(tiny_qe_run, tmp_path):
    run = broadened_ldos_run(tiny_qe_run, tmp_path / "run", "fd", 0.1)
    text = (run / "pp_ldos.in").read_text()
    (run / "pp_ldos.in").write_text(text.replace("degauss_ldos = 0.1", "degauss_ldos = 0.2"))
    with pytest.raises(QEError, match=r"matches neither a Fermi-Dirac nor a Gaussian"):
        ingest(run, tmp_path / "x.h5", progress=False)


def test_ingest_on_a_full_disk_leaves_nothing_half_written(tiny_qe_run, tmp_path):
    """h5py's writes failing as on a full disk (a 50 kB file size limit): one line, exit
    2, no snapshot and no temporary file."""
    output = tmp_path / "snap.h5"
    command = [venv_tool("mlsurrogate"), "qe", "ingest", str(tiny_qe_run), "-o", str(output)]
    proc = run_with_file_size_limit([*command, "--no-descriptors", "-q"], tmp_path, 50_000)
    assert proc.returncode == 2, proc.stderr
    assert f"mlsurrogate qe ingest: cannot write {output}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_run_stops_before_the_ldos_when_the_window_misses_the_bands(tmp_path):
    from mlsurrogate.qe import EnergyWindowError

    settings = QESettings(**{**TINY_SETTINGS.__dict__, "ldos_emin_ev": 0.0})
    with pytest.raises(EnergyWindowError, match=r"LDOS window starts at 0\.000 eV, but the "
                       r"lowest band is at -\d+\.\d+ eV"):  # fmt: skip
        run_qe(tiny_atoms(), settings, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "pw.out").exists()  # the SCF ran ...
    assert not list((tmp_path / "run").glob("ldos_*"))  # ... pp.x did not
