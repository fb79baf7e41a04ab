"""Golden test of the bundled model: energy, forces and stress of one fixed triclinic
structure in LAMMPS and in the ASE calculator equal the values recorded in
tests/golden/bundled_model.json (made by tests/golden/make_bundled_model_golden.py)."""

from __future__ import annotations

import json
from pathlib import Path

import ase
import numpy as np
import pytest

from mlsurrogate.calculator import MLSurrogateCalculator
from mlsurrogate.lammps_pair import pair_style_calculation

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = json.loads((ROOT / "tests" / "golden" / "bundled_model.json").read_text())
MODEL = str(ROOT / GOLDEN["model"])


@pytest.fixture(scope="module")
def atoms() -> ase.Atoms:
    n = len(GOLDEN["positions_A"])
    return ase.Atoms(["Al"] * n, positions=GOLDEN["positions_A"], cell=GOLDEN["cell_A"], pbc=True)


def check_against_golden(energy: float, forces: np.ndarray, virial: np.ndarray) -> None:
    assert energy == pytest.approx(GOLDEN["energy_eV"], rel=1e-10)
    golden_forces = np.array(GOLDEN["forces_eV_A"])
    np.testing.assert_allclose(forces, golden_forces, rtol=0, atol=1e-8 * abs(golden_forces).max())
    golden_virial = np.array(GOLDEN["virial_eV"])
    np.testing.assert_allclose(virial, golden_virial, rtol=0, atol=1e-8 * abs(golden_virial).max())


def test_pair_style_reproduces_the_golden_values(atoms):
    result = pair_style_calculation(MODEL, atoms, GOLDEN["grid"])
    check_against_golden(result["energy"], result["forces"], result["virial"])


def test_calculator_reproduces_the_golden_values(atoms):
    atoms = atoms.copy()
    atoms.calc = MLSurrogateCalculator(MODEL, grid=GOLDEN["grid"])
    virial = -atoms.get_stress(voigt=False) * atoms.get_volume()
    check_against_golden(atoms.get_potential_energy(), atoms.get_forces(), virial)
