"""Uncertainty of a prediction: the spread over ensemble members and MC-dropout passes,
each member taken through the energy functional and the adjoint on its own."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk

from conftest import DATA, smooth_training_config
from mlsurrogate.calculator import MLSurrogateCalculator
from mlsurrogate.export import export_model
from mlsurrogate.model import Model
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


def test_mc_dropout_passes(tmp_path):
    checkpoint = tmp_path / "dropout.ckpt"
    config = smooth_training_config(dropout=0.1, max_epochs=2)
    train(config, checkpoint, progress=False, log=lambda line: None)
    model = Model.load(export_model(checkpoint, tmp_path / "dropout.pt"))
    assert model.has_dropout()
    atoms = displaced_al()
    before = model.predict(atoms, GRID).free_energy
    spread = model.predict_uncertainty(atoms, GRID, dropout_passes=4, seed=1)
    assert len(spread.free_energies) == 4 and spread.energy_per_atom > 0
    again = model.predict_uncertainty(atoms, GRID, dropout_passes=4, seed=1)
    np.testing.assert_array_equal(again.free_energies, spread.free_energies)  # seeded
    assert model.predict(atoms, GRID).free_energy == before  # dropout off again afterwards
    calc = MLSurrogateCalculator(model, grid=GRID, dropout_passes=4)
    atoms.calc = calc
    atoms.get_potential_energy()
    assert calc.results["energy_uncertainty"] > 0
    with pytest.raises(ValueError, match="dropout_passes must be 0 or >= 2"):
        MLSurrogateCalculator(model, grid=GRID, dropout_passes=1)


def test_dropout_passes_need_a_network_trained_with_dropout(smooth_model):
    with pytest.raises(ValueError, match="trained without dropout"):
        Model.load(smooth_model).predict_uncertainty(displaced_al(), GRID, dropout_passes=3)


def test_rank_correlations_and_reference_files(tmp_path):
    from mlsurrogate.evaluate import ReferenceError, load_references, rank_correlations

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
