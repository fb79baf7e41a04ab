"""Uncertainty of a prediction: the spread over ensemble members and MC-dropout passes,
each member taken through the energy functional and the adjoint on its own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk

from conftest import DATA, smooth_training_config
from mlsurrogate.calculator import MLSurrogateCalculator
from mlsurrogate.evaluate import load_references
from mlsurrogate.export import export_model
from mlsurrogate.ion_ion import ion_ion_energy
from mlsurrogate.model import LdosNetwork, Model
from mlsurrogate.training import train

GRID = (12, 12, 12)


def displaced_al():
    atoms = bulk("Al", "fcc", a=4.05, cubic=True)
    atoms.rattle(0.08, seed=11)
    return atoms


@pytest.fixture(scope="module")
def members(smooth_checkpoint, tmp_path_factory) -> list:
    """Two single-network models (seeds 3 and 4) and their ensemble."""
    base = tmp_path_factory.mktemp("ensemble")
    other = base / "seed4.ckpt"
    train(smooth_training_config(seed=4), other, progress=False, log=lambda line: None)
    singles = [export_model(path, base / f"{path.stem}.pt") for path in (smooth_checkpoint, other)]
    return singles + [export_model([smooth_checkpoint, other], base / "ensemble.pt")]


def test_each_member_goes_through_the_functional(members):
    """The ensemble's member energies, Fermi levels and forces are those of each network
    exported alone (not of the mean LDOS); the deviations follow deepmd's definitions."""
    atoms = displaced_al()
    ensemble = Model.load(members[2])
    assert ensemble.ensemble_size == 2
    spread = ensemble.predict_uncertainty(atoms, GRID)
    alone = [Model.load(path).predict(atoms, GRID) for path in members[:2]]
    np.testing.assert_allclose(spread.free_energies, [p.free_energy for p in alone], rtol=1e-12)
    fermi = [p.terms["fermi_level"] for p in alone]
    np.testing.assert_allclose(spread.fermi_levels, fermi, rtol=1e-12)
    forces = np.stack([p.forces for p in alone])
    np.testing.assert_allclose(spread.forces, forces, rtol=0, atol=1e-10)
    np.testing.assert_allclose(spread.dos, np.stack([p.dos for p in alone]), rtol=1e-12)
    # two members: std = |a - b| / 2; per-atom deviation = |F_a - F_b| / 2
    energy_gap = abs(alone[0].free_energy - alone[1].free_energy)
    assert spread.energy_per_atom == pytest.approx(energy_gap / 2 / len(atoms), rel=1e-10)
    assert spread.energy_per_atom > 0
    deviation = np.linalg.norm(forces[0] - forces[1], axis=1) / 2
    np.testing.assert_allclose(spread.atom_force_deviation, deviation, rtol=1e-10)
    assert spread.max_force_deviation == pytest.approx(deviation.max(), rel=1e-12)
    assert spread.fermi_level == pytest.approx(abs(fermi[0] - fermi[1]) / 2, rel=1e-10)


def test_calculator_reports_the_uncertainty_of_an_ensemble(members):
    atoms = displaced_al()
    atoms.calc = MLSurrogateCalculator(members[2], grid=GRID)
    atoms.get_potential_energy()
    results = atoms.calc.results
    spread = Model.load(members[2]).predict_uncertainty(atoms, GRID)
    assert results["energy_uncertainty"] == pytest.approx(spread.energy_per_atom, rel=1e-12)
    np.testing.assert_allclose(results["forces_uncertainty"], spread.atom_force_deviation)
    assert results["fermi_level_uncertainty"] == pytest.approx(spread.fermi_level, rel=1e-12)
    assert results["dos_uncertainty"].shape == results["dos"].shape
    single = displaced_al()
    single.calc = MLSurrogateCalculator(members[0], grid=GRID)
    single.get_potential_energy()
    assert "energy_uncertainty" not in single.calc.results  # one network: nothing to spread
    with pytest.raises(ValueError, match="no uncertainty: export an ensemble"):
        Model.load(members[0]).predict_uncertainty(single, GRID)


def test_calculator_warns_naming_the_most_uncertain_atoms(members):
    import warnings

    from mlsurrogate.calculator import UncertaintyWarning

    atoms = displaced_al()
    deviation = Model.load(members[2]).predict_uncertainty(atoms, GRID).atom_force_deviation
    order = np.argsort(-deviation)
    threshold = float(0.5 * (deviation[order[1]] + deviation[order[2]]))  # two atoms above
    atoms.calc = MLSurrogateCalculator(members[2], grid=GRID, warn_force_deviation=threshold)
    with pytest.warns(UncertaintyWarning, match=rf"^2 atoms .* by index: {order[0]} \(.*, "
                      rf"{order[1]} \("):  # fmt: skip
        atoms.get_potential_energy()
    quiet = displaced_al()
    quiet.calc = MLSurrogateCalculator(members[2], grid=GRID,
                                       warn_force_deviation=2 * deviation.max())  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error", UncertaintyWarning)
        quiet.get_potential_energy()
    with pytest.raises(ValueError, match="needs the uncertainty"):
        MLSurrogateCalculator(members[0], grid=GRID, warn_force_deviation=0.1)
    with pytest.raises(ValueError, match="must be a positive force"):
        MLSurrogateCalculator(members[2], grid=GRID, warn_force_deviation=-1.0)


def test_dropout_masks_are_one_thinned_network_per_pass(dropout_model):
    """Pass t of seed S keeps each hidden unit with probability 1 - p and scales it by
    1 / (1 - p); the scripted method draws what the Python class draws (torch's CPU
    Mersenne Twister seeded with S); each unit varies over passes, and the seed counts."""
    model = Model.load(dropout_model)
    network = model.module.network
    p = model.spec.dropout_probability
    assert p == 0.1 and network.dropout == p
    eager = LdosNetwork(network.feature_mean.numel(), len(model.energies), [32], "silu", p)
    for seed, pass_index in [(0, 0), (5, 3), (2**31 - 1, 40)]:
        scripted = network.dropout_masks(seed, pass_index)
        drawn = eager.dropout_masks(seed, pass_index)
        assert len(scripted) == 1 and scripted[0].shape == (32,)
        torch.testing.assert_close(scripted[0], drawn[0], rtol=0, atol=0)
    masks = torch.stack([network.dropout_masks(7, t)[0] for t in range(400)])
    assert masks.unique().tolist() == [0.0, 1.0 / (1.0 - p)]
    kept = (masks > 0).double()
    # 400 passes: each unit's kept fraction is 1 - p within 5 standard deviations (0.075)
    assert float((kept.mean(0) - (1 - p)).abs().max()) < 0.075
    # another seed: another network; masks differ in 2 p (1 - p) = 18 % of the units
    other = torch.stack([network.dropout_masks(8, t)[0] for t in range(400)])
    assert 0.16 < float((other != masks).double().mean()) < 0.20


def test_mc_dropout_spread_does_not_average_out_in_a_supercell(dropout_model):
    """Each pass is one network, so a 2x2x2 supercell of a periodic cell has 8x each
    pass's free energy and the primitive cell's per-atom spread: masks drawn per grid
    point would shrink it like 1/sqrt(points)."""
    model = Model.load(dropout_model)
    atoms = displaced_al()
    primitive = model.predict_uncertainty(atoms, GRID, dropout_passes=4, seed=3)
    supercell = model.predict_uncertainty(
        atoms.repeat((2, 2, 2)), tuple(2 * n for n in GRID), dropout_passes=4, seed=3
    )
    assert primitive.energy_per_atom > 1e-4
    np.testing.assert_allclose(supercell.free_energies, 8 * primitive.free_energies, rtol=1e-11)
    assert supercell.energy_per_atom == pytest.approx(primitive.energy_per_atom, rel=1e-8)
    assert supercell.fermi_level == pytest.approx(primitive.fermi_level, rel=1e-8)
    np.testing.assert_allclose(
        supercell.atom_force_deviation,
        np.tile(primitive.atom_force_deviation, 8),
        rtol=1e-7,
    )


def test_mc_dropout_passes_are_seeded_networks(dropout_model):
    model = Model.load(dropout_model)
    assert model.has_dropout() and model.ensemble_size == 1
    atoms = displaced_al()
    spread = model.predict_uncertainty(atoms, GRID, dropout_passes=4, seed=1)
    assert len(spread.free_energies) == 4 and spread.energy_per_atom > 0
    again = model.predict_uncertainty(atoms, GRID, dropout_passes=4, seed=1)
    np.testing.assert_array_equal(again.free_energies, spread.free_energies)
    # the adjoint kernel sums over threads in any order: forces agree to rounding
    np.testing.assert_allclose(again.forces, spread.forces, rtol=1e-12, atol=1e-12)
    other = model.predict_uncertainty(atoms, GRID, dropout_passes=4, seed=2)
    assert np.all(other.free_energies != spread.free_energies)
    # pass t depends on (seed, t) only: fewer passes are the first of more
    fewer = model.predict_uncertainty(atoms, GRID, dropout_passes=2, seed=1)
    np.testing.assert_array_equal(fewer.free_energies, spread.free_energies[:2])
    # predict's uncertainty is the same computation; the prediction itself has no dropout
    plain = model.predict(atoms, GRID)
    combined = model.predict(atoms, GRID, uncertainty=True, dropout_passes=4, seed=1)
    assert combined.free_energy == plain.free_energy
    np.testing.assert_array_equal(combined.uncertainty.free_energies, spread.free_energies)
    calc = MLSurrogateCalculator(model, grid=GRID, dropout_passes=4, seed=1)
    atoms.calc = calc
    atoms.get_potential_energy()
    assert calc.results["energy_uncertainty"] == spread.energy_per_atom
    deviation = calc.results["forces_uncertainty"]
    np.testing.assert_allclose(deviation, spread.atom_force_deviation, rtol=1e-10)


def test_sampled_network_forces_are_its_energy_derivatives(dropout_model):
    """The forces of a pass back-propagate through that pass's masks: central differences
    (step 1e-4) of the same sampled network's energy. Compared without E_ii, the same for
    every pass, whose LAMMPS forces and energy differences disagree by 3e-5 eV/A
    (test_calculator.py says why)."""
    model = Model.load(dropout_model)
    atoms = displaced_al()

    def electronic(moved) -> tuple[np.ndarray, np.ndarray]:
        spread = model.predict_uncertainty(moved, GRID, dropout_passes=2, seed=4)
        ion_ion = ion_ion_energy(moved, {"Al": 3.0})
        return spread.free_energies - ion_ion.energy, spread.forces - ion_ion.forces

    forces = electronic(atoms)[1]
    step = 1e-4
    for atom, axis in [(0, 0), (2, 1)]:
        energies = []
        for sign in (1, -1):
            moved = atoms.copy()
            moved.positions[atom, axis] += sign * step
            energies.append(electronic(moved)[0])
        derivative = -(energies[0] - energies[1]) / (2 * step)
        np.testing.assert_allclose(forces[:, atom, axis], derivative, rtol=1e-6)
    assert not np.allclose(forces[0], forces[1])  # two networks, two force fields


def test_mc_dropout_errors(dropout_model, smooth_model, members):
    atoms = displaced_al()
    with pytest.raises(ValueError, match="trained without dropout"):
        Model.load(smooth_model).predict_uncertainty(atoms, GRID, dropout_passes=3)
    with pytest.raises(ValueError, match="MC dropout samples one network, but .* ensemble of 2"):
        Model.load(members[2]).predict_uncertainty(atoms, GRID, dropout_passes=3)
    model = Model.load(dropout_model)
    with pytest.raises(ValueError, match="dropout_passes must be 0 or >= 2, got 1"):
        model.predict_uncertainty(atoms, GRID, dropout_passes=1)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\^31\), got -1"):
        model.predict(atoms, GRID, uncertainty=True, dropout_passes=2, seed=-1)
    with pytest.raises(ValueError, match="dropout_passes must be 0 or >= 2"):
        MLSurrogateCalculator(model, grid=GRID, dropout_passes=1)


def test_rank_correlations_and_reference_files(tmp_path):
    from mlsurrogate.evaluate import ReferenceError, rank_correlations

    def result(uncertainty: float, error: float, atoms: list[tuple[float, float]]):
        deviation, force = np.array(atoms).T
        return ReferenceError("s", (1, 1, 1), error, force, 0.0, 0.0, uncertainty, deviation)

    # ranks of the uncertainty 1 2 3 against the errors' 1 3 2: rho = 1 - 6 * 2 / 24 = 0.5;
    # per atom the deviations order the errors exactly: rho = 1
    errors = [result(1e-3, 0.01, [(0.1, 0.2)]), result(2e-3, -0.03, [(0.2, 0.3)]),
              result(3e-3, 0.02, [(0.3, 0.4), (0.4, 0.5)])]  # fmt: skip
    assert rank_correlations(errors) == pytest.approx((0.5, 1.0))
    with pytest.raises(ValueError, match=">= 3 structures"):
        rank_correlations(errors[:2])
    bad = tmp_path / "bad.txt"
    bad.write_text('{"name": "x"}')
    with pytest.raises(ValueError, match="bad.txt: not a reference structure"):
        load_references([bad])
    with pytest.raises(ValueError, match="no reference structures"):
        load_references([tmp_path])
    heldout = load_references([DATA.parent / "al_heldout_933K"])
    assert len(heldout) == 8 and {len(r.atoms) for r in heldout} == {31, 32}
    assert all(r.forces.shape == (len(r.atoms), 3) for r in heldout)
    assert all(r.stress.shape == (3, 3) for r in heldout)


def test_reference_pressure_error_is_the_calculators_against_qe(smooth_model, tmp_path):
    """The held-out pressure error is P of the model (ASE calculator: P = -tr(sigma)/3 with
    sigma = (1/V) dA/deps) minus QE's P = tr(sigma_QE)/3 (QE's sign), in GPa; a reference
    without QE's stress has none, and the table says so."""
    import json

    from mlsurrogate.evaluate import evaluate_references, format_reference_errors
    from mlsurrogate.units import GPA_PER_EV_PER_CUBIC_ANGSTROM

    snapshot = load_references([DATA / "snapshot_00.h5"])[0]
    assert snapshot.stress.shape == (3, 3)
    model = Model.load(smooth_model)
    (result,) = evaluate_references(model, [snapshot], spacing=4.05 / 12)
    atoms = snapshot.atoms.copy()
    atoms.calc = MLSurrogateCalculator(smooth_model, grid=result.grid)
    pressure = -np.mean(atoms.get_stress()[:3])
    qe_pressure = np.trace(snapshot.stress) / 3
    expected = GPA_PER_EV_PER_CUBIC_ANGSTROM * (pressure - qe_pressure)
    assert result.pressure_error == pytest.approx(expected, rel=1e-8)
    assert f"| {expected:+.2f} |" in format_reference_errors([result])

    record = {"name": "no_stress", "symbols": ["Al"] * 4, "cell_A": atoms.cell.tolist(),
              "positions_A": atoms.positions.tolist(), "qe_free_energy_eV": 0.0,
              "qe_forces_eV_A": np.zeros((4, 3)).tolist()}  # fmt: skip
    (tmp_path / "no_stress.json").write_text(json.dumps(record))
    (bare,) = evaluate_references(model, load_references([tmp_path]), spacing=4.05 / 12)
    assert bare.pressure_error is None
    assert "| no_stress | 12x12x12 | " in format_reference_errors([bare])
    assert format_reference_errors([bare]).splitlines()[-1].endswith("| - |")
