"""The ASE calculator: equal to pair_style mlsurrogate, its forces and stress equal to
finite differences of its energy, orthogonal and triclinic cells, and MD with ASE's
VelocityVerlet conserving energy like LAMMPS's NVE."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import bulk

from mlsurrogate.calculator import MLSurrogateCalculator
from mlsurrogate.ion_ion import ion_ion_energy
from mlsurrogate.lammps_pair import pair_style_calculation, pair_style_nve

BUNDLED = str(Path(__file__).resolve().parents[1] / "models" / "al_933K.pt")
GRID = (16, 16, 16)  # coarser than the model's 0.18 A: the comparisons need no accuracy


def displaced_al(kind: str):
    """4-atom cubic fcc Al or a sheared 4-atom primitive-cell supercell, displaced."""
    if kind == "orthogonal":
        atoms = bulk("Al", "fcc", a=4.05, cubic=True)
    else:
        atoms = bulk("Al", "fcc", a=4.05).repeat((1, 2, 2))
        cell = np.asarray(atoms.cell)
        atoms.set_cell(cell + 0.05 * np.roll(cell, 1, axis=0), scale_atoms=True)
    atoms.rattle(0.08, seed=11)
    return atoms


@pytest.fixture(scope="module")
def calculator():
    return MLSurrogateCalculator(BUNDLED, grid=GRID)


@pytest.mark.parametrize("kind", ["orthogonal", "triclinic"])
def test_equals_pair_style(calculator, kind):
    atoms = displaced_al(kind)
    atoms.calc = calculator
    lammps = pair_style_calculation(BUNDLED, atoms, GRID)
    energy = atoms.get_potential_energy()
    assert energy == pytest.approx(lammps["energy"], rel=1e-8)
    assert atoms.get_potential_energy(force_consistent=True) == energy  # free energy A
    forces = atoms.get_forces()
    assert np.abs(forces).max() > 0.05  # displaced: a real test
    np.testing.assert_allclose(forces, lammps["forces"], rtol=0, atol=1e-8 * np.abs(forces).max())
    # ASE: sigma = (1/V) dE/deps; LAMMPS's virial is -dE/deps
    sigma = -lammps["virial"] / atoms.get_volume()
    voigt = [sigma[0, 0], sigma[1, 1], sigma[2, 2], sigma[1, 2], sigma[0, 2], sigma[0, 1]]
    stress = atoms.get_stress()
    np.testing.assert_allclose(stress, voigt, rtol=0, atol=1e-8 * np.abs(stress).max())
    energies = atoms.get_potential_energies()
    np.testing.assert_allclose(energies, lammps["energies"], rtol=0, atol=1e-8 * abs(energy))
    assert energies.sum() == pytest.approx(energy, rel=1e-12)


@pytest.mark.parametrize("kind", ["orthogonal", "triclinic"])
def test_forces_and_stress_equal_finite_differences(calculator, kind):
    """Central differences of A (step 1e-4). The electronic part A - E_ii, ours, to 1e-6
    (forces) and 1e-5 (stress). E_ii is LAMMPS's coul/long + Ewald, whose real-space
    energy uses an erfc approximation (Abramowitz & Stegun 7.1.26, error <= 1.5e-7) that its
    forces do not: measured 3e-5 eV/A between its forces and differences of its energy on
    this cell, so the totals are compared at 1e-4."""
    atoms = displaced_al(kind)
    atoms.calc = calculator
    forces, stress = atoms.get_forces(), atoms.get_stress(voigt=False)
    ion_ion = ion_ion_energy(atoms, {"Al": 3.0})
    electronic_forces = forces - ion_ion.forces
    volume = atoms.get_volume()
    electronic_stress = stress + ion_ion.virial / volume
    step = 1e-4

    def energies_of(moved) -> np.ndarray:
        moved.calc = calculator
        total = moved.get_potential_energy()
        return np.array([total, calculator.results["electronic_free_energy"]])

    for atom, axis in [(0, 0), (1, 2), (3, 1)]:
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[atom, axis] += step
        minus.positions[atom, axis] -= step
        total, electronic = (energies_of(plus) - energies_of(minus)) / (2 * step)
        assert electronic_forces[atom, axis] == pytest.approx(-electronic, rel=1e-6)
        assert forces[atom, axis] == pytest.approx(-total, rel=1e-4)
    for a, b in [(0, 0), (2, 2), (0, 1), (1, 2)]:
        strain = np.zeros((3, 3))
        strain[a, b] = strain[b, a] = step if a == b else step / 2
        moved = []
        for sign in (1.0, -1.0):
            deformed = atoms.copy()
            deformed.set_cell(atoms.cell @ (np.eye(3) + sign * strain).T, scale_atoms=True)
            moved.append(energies_of(deformed))
        total, electronic = (moved[0] - moved[1]) / (2 * step) / volume
        assert electronic_stress[a, b] == pytest.approx(electronic, rel=1e-5, abs=1e-8)
        assert stress[a, b] == pytest.approx(total, rel=1e-4, abs=1e-7)


def test_electronic_extras(calculator):
    atoms = displaced_al("orthogonal")
    atoms.calc = calculator
    atoms.get_potential_energy()
    results = calculator.results
    energies, dos = results["dos_energies"], results["dos"]
    assert dos.shape == energies.shape and results["grid"] == GRID
    # the piecewise-linear D and e D integrated up to the Fermi level: N_val, E_band - TS
    mu = results["fermi_level"]
    below = np.append(energies[energies < mu], mu)
    dos_below = np.interp(below, energies, dos)
    assert np.trapezoid(dos_below, below) == pytest.approx(12.0, rel=1e-9)
    assert results["electrons"] == pytest.approx(12.0, rel=1e-9)
    assert results["entropy_term"] < 0  # -TS of a metal at 933 K
    band_free = np.trapezoid(np.interp(below, energies, energies * dos), below)
    assert results["band_energy"] + results["entropy_term"] == pytest.approx(band_free, rel=1e-9)


def test_results_are_cached_until_the_structure_changes(monkeypatch):
    atoms = displaced_al("orthogonal")
    atoms.calc = MLSurrogateCalculator(BUNDLED, grid=GRID)
    calls = []
    original = MLSurrogateCalculator.calculate

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MLSurrogateCalculator, "calculate", counting)
    atoms.get_potential_energy()
    atoms.get_forces()
    atoms.get_stress()
    assert len(calls) == 1
    atoms.positions[0, 0] += 0.01
    atoms.get_forces()
    assert len(calls) == 2


def test_grid_from_spacing_rounds_half_up():
    calc = MLSurrogateCalculator(BUNDLED, spacing=0.5)
    atoms = displaced_al("orthogonal")
    assert calc.grid_for(atoms) == (8, 8, 8)  # 4.05 / 0.5 = 8.1
    atoms.set_cell(np.diag([4.25, 4.75, 3.9]), scale_atoms=True)
    assert calc.grid_for(atoms) == (9, 10, 8)  # 8.5 and 9.5 round up, as in the pair style
    default = MLSurrogateCalculator(BUNDLED)  # the model's training spacing, 0.18 A
    expected = tuple(int(np.floor(x / 0.18 + 0.5)) for x in (4.25, 4.75, 3.9))
    assert default.grid_for(atoms) == expected


def test_velocity_verlet_conserves_energy_like_lammps(calculator):
    from ase.md.velocitydistribution import thermalize_momenta
    from ase.md.verlet import VelocityVerlet
    from ase.units import fs

    atoms = displaced_al("orthogonal")
    atoms.set_masses([26.98] * len(atoms))
    thermalize_momenta(atoms, temperature_K=900, rng=np.random.default_rng(5))
    lammps = pair_style_nve(BUNDLED, atoms, GRID, steps=20, timestep_fs=2.0)
    atoms.calc = calculator
    totals = [atoms.get_potential_energy() + atoms.get_kinetic_energy()]
    dynamics = VelocityVerlet(atoms, timestep=2.0 * fs)
    for _ in range(20):
        dynamics.run(1)
        totals.append(atoms.get_potential_energy() + atoms.get_kinetic_energy())
    totals = np.array(totals)
    lammps_totals = lammps.sum(axis=1)
    # the same trajectory: measured 2e-8 eV apart over 20 steps (LAMMPS's metal-unit
    # constants differ from ASE's in the 7th digit)
    np.testing.assert_allclose(totals, lammps_totals, rtol=0, atol=1e-6)
    kinetic = lammps[:, 1]
    assert kinetic.max() - kinetic.min() > 0.01  # the atoms really moved
    ase_drift = np.abs(totals - totals[0]).max()
    lammps_drift = np.abs(lammps_totals - lammps_totals[0]).max()
    assert ase_drift <= 1.5 * lammps_drift + 1e-5


def test_bad_arguments():
    with pytest.raises(ValueError, match="either grid or spacing"):
        MLSurrogateCalculator(BUNDLED, grid=(8, 8, 8), spacing=0.3)
    with pytest.raises(ValueError, match="three positive integers"):
        MLSurrogateCalculator(BUNDLED, grid=(8, 0, 8))
    with pytest.raises(ValueError, match="positive length"):
        MLSurrogateCalculator(BUNDLED, spacing=-1.0)
    calc = MLSurrogateCalculator(BUNDLED, grid=GRID)
    copper = bulk("Cu", "fcc", a=3.6, cubic=True)
    copper.calc = calc
    with pytest.raises(ValueError, match="Cu"):
        copper.get_potential_energy()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (CI has none)")
def test_cuda_device_equals_cpu(calculator):
    atoms = displaced_al("triclinic")
    atoms.calc = calculator
    cpu = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
    gpu_atoms = atoms.copy()
    gpu_atoms.calc = MLSurrogateCalculator(BUNDLED, grid=GRID, device="cuda")
    assert gpu_atoms.get_potential_energy() == pytest.approx(cpu[0], rel=1e-10)
    np.testing.assert_allclose(gpu_atoms.get_forces(), cpu[1], rtol=0, atol=1e-8)
    np.testing.assert_allclose(gpu_atoms.get_stress(), cpu[2], rtol=0, atol=1e-9)
