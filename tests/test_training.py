"""Training, checkpoints, export and evaluation of LDOS models on the bundled data."""

from __future__ import annotations

import json
import math
import shutil
import textwrap
from dataclasses import asdict, fields, replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import run_clean, venv_tool
from mlsurrogate import cli
from mlsurrogate import descriptors as descriptors_module
from mlsurrogate.data import Snapshot, add_descriptors
from mlsurrogate.descriptors import (
    DESCRIPTOR_KEYWORDS,
    PER_ELEMENT_KEYWORDS,
    BispectrumParams,
    compute_grid_descriptors,
    keyword_type,
    num_descriptors,
)
from mlsurrogate.evaluate import evaluate_model, functional_for
from mlsurrogate.export import build_model, export_model, spec_from_checkpoints
from mlsurrogate.files import OutputError
from mlsurrogate.ion_ion import ion_ion_energy
from mlsurrogate.lammps_pair import pair_style_energy_forces
from mlsurrogate.model import Model, load_metadata, model_error_message, save_model
from mlsurrogate.training import SnapshotSource, TrainingConfig, load_checkpoint, train
from mlsurrogate.training.checkpoint import save_checkpoint
from mlsurrogate.training.config import config_reference
from mlsurrogate.training.dataset import density_weights
from mlsurrogate.training.loop import point_loss
from mlsurrogate.training.physics_terms import (
    STRAIN_STEP,
    DescriptorAdjoint,
    coarse_grid_target,
    contract,
    descriptor_jacobian,
    physics_loss,
    predicted_energy_forces,
    predicted_strain_derivatives,
    snapshot_reference,
    strain_matrix,
    strained,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "al_fcc4_933K"
SNAP = [str(DATA / f"snapshot_{i:02d}.h5") for i in range(10)]
# small and fast: twojmax 4, one hidden layer
CONFIG = TrainingConfig(
    train=SNAP[:2],
    validation=[SNAP[2]],
    hidden=[24],
    batch_size=512,
    learning_rate=3e-3,
    max_epochs=3,
    seed=7,
    descriptor_params=asdict(BispectrumParams(twojmax=4)),
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("train") / "ck.pt"
    train(CONFIG, path, progress=False, log=lambda line: None)
    return path


@pytest.fixture(scope="module")
def exported(checkpoint) -> Path:
    return export_model(checkpoint, checkpoint.parent / "model.pt")


def test_resume_continues_exactly(checkpoint, tmp_path):
    uninterrupted = load_checkpoint(checkpoint)["history"]
    assert len(uninterrupted) == 3
    path = tmp_path / "ck.pt"
    first = train(CONFIG, path, stop_after_epoch=0, progress=False, log=lambda line: None)
    assert len(first) == 1
    resumed = train(CONFIG, path, resume=True, progress=False, log=lambda line: None)
    # every loss and energy error, bit for bit (JSON: NaN compares equal to NaN)
    assert json.dumps(resumed) == json.dumps(uninterrupted)
    with pytest.raises(ValueError, match=r"different config \(learning_rate\)"):
        train(replace(CONFIG, learning_rate=2e-3), path, resume=True, progress=False)
    # the threads and the dB/dR budget change the speed, not the run: it resumes and
    # ends where the uninterrupted run did (to round-off: other threads, other sums)
    other = tmp_path / "other_threads.pt"
    train(CONFIG, other, stop_after_epoch=0, progress=False, log=lambda line: None)
    faster = replace(CONFIG, threads=1, physics_jacobian_gb=0.5)
    history = train(faster, other, resume=True, progress=False, log=lambda line: None)
    assert [e["train_loss"] for e in history] == pytest.approx(
        [e["train_loss"] for e in uninterrupted], rel=1e-4
    )
    # a checkpoint from before a key existed resumes when the key keeps its default
    state = load_checkpoint(path)
    del state["config"]["hartree_weight"]
    save_checkpoint(path, state)
    again = train(CONFIG, path, resume=True, progress=False, log=lambda line: None)
    assert json.dumps(again) == json.dumps(uninterrupted)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_training_on_the_gpu_matches_the_cpu(checkpoint, tmp_path):
    """device = "cuda": the same run within float32 round-off of the CPU run."""
    cpu = load_checkpoint(checkpoint)["history"]
    gpu = train(replace(CONFIG, device="cuda"), tmp_path / "ck.pt", progress=False)
    assert len(gpu) == len(cpu)
    for ours, reference in zip(gpu, cpu):
        assert ours["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-3)


def test_training_reduces_the_loss(checkpoint):
    history = load_checkpoint(checkpoint)["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert all(np.isfinite(record["total_meV_atom"]) for record in history)


def test_export_equals_eager_and_carries_metadata(checkpoint, exported):
    eager = build_model(checkpoint)
    scripted = torch.jit.load(str(exported))
    features = num_descriptors(BispectrumParams(twojmax=4))
    descriptors = torch.randn(50, features, dtype=torch.float64) * 0.1 + eager.network.feature_mean
    ldos_eager = eager(descriptors)
    ldos_script = scripted(descriptors)
    assert torch.allclose(ldos_script, ldos_eager, rtol=1e-6, atol=0)
    upstream = torch.randn_like(ldos_eager)
    assert torch.allclose(
        scripted.descriptor_gradient(descriptors, upstream),
        eager.descriptor_gradient(descriptors, upstream),
        rtol=1e-10,
    )
    metadata = load_metadata(exported)
    assert metadata["elements"] == ["Al"] and metadata["valence_charges"] == [3.0]
    assert metadata["masses"][0] == pytest.approx(26.98, abs=0.01)
    assert metadata["descriptor_params"]["twojmax"] == 4
    assert len(metadata["energies_eV"]) == 161
    assert metadata["electronic_temperature_K"] == pytest.approx(933.0)
    assert metadata["xc_functional"] == "PZ"
    assert metadata["ldos_broadening_kernel"] == "fermi-dirac-derivative"
    assert scripted.elements == ["Al"] and scripted.cutoff == pytest.approx(4.67637)
    # energy of the exported model equals the eager network + functional
    model = Model.load(exported)
    with Snapshot(SNAP[5]) as snap:
        atoms, grid = snap.atoms, snap.grid_shape
        functional = functional_for(snap)
    ldos = model.predict_ldos(atoms, grid)
    from mlsurrogate.descriptors import compute_grid_descriptors

    descriptors = compute_grid_descriptors(atoms, grid, model.params)
    with torch.no_grad():
        ldos_eager = eager(torch.as_tensor(descriptors.reshape(-1, features))).numpy()
    np.testing.assert_allclose(ldos.reshape(-1, 161), ldos_eager, rtol=1e-6, atol=1e-12)
    cell = torch.as_tensor(np.asarray(atoms.cell), dtype=torch.float64)
    eager_terms, _ = functional.evaluate(
        torch.as_tensor(ldos_eager).reshape(ldos.shape), cell, 12.0, False
    )
    terms = model.energy_terms(atoms, ldos)
    assert terms["electronic"] == pytest.approx(float(eager_terms["electronic"]), rel=1e-12)


def test_exported_model_loads_in_lammps_without_python(exported, tmp_path):
    script = textwrap.dedent(
        f"""\
        units metal
        lattice fcc 4.05
        region box block 0 1 0 1 0 1
        create_box 1 box
        create_atoms 1 box
        mass 1 26.98
        pair_style mlsurrogate {exported} grid 8 8 8 ionion off
        pair_coeff * * {{element}}
        run 0
        """
    )
    (tmp_path / "in.ok").write_text(script.format(element="Al"))
    (tmp_path / "in.bad").write_text(script.format(element="Cu"))
    lmp = [venv_tool("lmp"), "-log", "none", "-nocite", "-in"]
    proc, out = run_clean([*lmp, "in.ok"], tmp_path)
    assert proc.returncode == 0 and "ERROR" not in out, out
    assert "Loop time of" in out, out  # loaded and evaluated by libtorch alone
    _, out = run_clean([*lmp, "in.bad"], tmp_path)
    assert "Cu" in out and "ERROR" in out, out


def test_ensemble_predicts_the_mean_ldos_in_python_and_lammps(checkpoint, exported, tmp_path):
    other = tmp_path / "seed8.pt"
    train(replace(CONFIG, seed=8), other, progress=False, log=lambda line: None)
    ensemble_path = tmp_path / "ensemble.pt"
    assert cli.main(["export", str(checkpoint), str(other), "-o", str(ensemble_path)]) == 0
    members = [build_model(checkpoint), build_model(other)]
    scripted = torch.jit.load(str(ensemble_path))
    features = num_descriptors(BispectrumParams(twojmax=4))
    descriptors = (
        torch.randn(40, features, dtype=torch.float64) * 0.1 + members[0].network.feature_mean
    )
    each = [m(descriptors) for m in members]
    assert not torch.allclose(each[0], each[1])
    torch.testing.assert_close(scripted(descriptors), (each[0] + each[1]) / 2, rtol=1e-12, atol=0)
    upstream = torch.randn_like(each[0])
    torch.testing.assert_close(
        scripted.descriptor_gradient(descriptors, upstream),
        sum(m.descriptor_gradient(descriptors, upstream) for m in members) / 2,
        rtol=1e-10,
        atol=1e-14,
    )
    assert len(load_metadata(ensemble_path)["provenance"]["training"]) == 2
    # the pair style evaluates the ensemble like any model: its energy is Python's
    with Snapshot(SNAP[5]) as snap:
        atoms = snap.atoms
    model = Model.load(ensemble_path)
    terms = model.energy_terms(atoms, model.predict_ldos(atoms, (8, 8, 8)))
    cell = np.diag(atoms.cell.lengths()).tolist()
    energy, _ = pair_style_energy_forces(
        str(ensemble_path), cell, atoms.positions.tolist(), [8, 8, 8]
    )
    assert energy == pytest.approx(terms["electronic"], rel=1e-8)
    # members must share the descriptors
    mismatched = replace(CONFIG, descriptor_params=asdict(BispectrumParams(twojmax=2)))
    train(mismatched, tmp_path / "two.pt", progress=False, log=lambda line: None)
    with pytest.raises(ValueError, match="differ from"):
        build_model([checkpoint, tmp_path / "two.pt"])


def test_evaluate_cli_table_and_plots(exported, tmp_path, capsys):
    plots = tmp_path / "plots"
    assert cli.main(["evaluate", str(exported), SNAP[8], SNAP[9], "--plots", str(plots)]) == 0
    out = capsys.readouterr().out
    assert "snapshot_08.h5" in out and "mean absolute errors" in out
    assert (plots / "energy_parity.png").stat().st_size > 1000
    assert (plots / "dos.png").stat().st_size > 1000
    errors, _ = evaluate_model(exported, [SNAP[8]])
    assert 0 < errors[0].ldos_relative < 1 and np.isfinite(errors[0].total_meV_atom)
    assert np.isfinite(errors[0].hartree_meV_atom)


def test_evaluate_takes_compact_snapshots_over_their_points(exported, tmp_path):
    """A compact copy with every point gives the full snapshot's errors; one with some
    points the same energies and forces, and the LDOS error over its points."""
    from mlsurrogate.data import compact_snapshot

    with Snapshot(SNAP[8]) as snap:
        total = int(np.prod(snap.grid_shape))
    every = compact_snapshot(SNAP[8], tmp_path / "every.h5", total, seed=3)
    some = compact_snapshot(SNAP[8], tmp_path / "some.h5", 500, seed=3)
    (full, all_points, few), dos = evaluate_model(exported, [SNAP[8], str(every), str(some)])
    for name in ("ldos_rmse", "density_relative", "band_meV_atom", "total_meV_atom"):
        assert getattr(all_points, name) == pytest.approx(getattr(full, name), rel=1e-6), name
    for name in ("band_meV_atom", "hartree_meV_atom", "total_meV_atom", "force_rmse"):
        assert getattr(few, name) == pytest.approx(getattr(full, name), rel=1e-9), name
    assert few.ldos_rmse != full.ldos_rmse and 0.5 < few.ldos_rmse / full.ldos_rmse < 2
    assert dos["dft"].shape == dos["predicted"].shape


def test_balanced_point_density_draws_each_cell_by_its_volume(tmp_path):
    """With balance_point_density every epoch takes a full snapshot's points at the
    density of a compact one (a new random subset each epoch) and all compact points."""
    from collections import Counter

    from mlsurrogate.data import compact_snapshot
    from mlsurrogate.training.dataset import balanced_fractions, batches

    compact = str(compact_snapshot(SNAP[8], tmp_path / "compact.h5", 500, seed=3))
    params = BispectrumParams(twojmax=4)
    sources = [SnapshotSource(SNAP[0], params), SnapshotSource(compact, params)]
    full = sources[0].num_points  # the same 4-atom cell volume as the compact one's
    fractions = balanced_fractions(sources)
    np.testing.assert_allclose(fractions, [500 / full, 1.0])
    drawn = []
    for epoch in (0, 1):
        owners, rows = Counter(), []
        for x, _, owner in batches(sources, 256, 8, seed=1, epoch=epoch, fractions=fractions):
            owners.update(owner.tolist())
            rows.append(x[owner == 0])
        assert owners[1] == 500
        assert abs(owners[0] - 500) < 5 * math.sqrt(500)  # binomial: sd 22
        drawn.append({row.tobytes() for row in np.concatenate(rows)})
    assert len(drawn[0] & drawn[1]) < 0.2 * len(drawn[0])  # other points in each epoch
    everything = Counter(o for _, _, owner in batches(sources, 256, 8, 1, 0) for o in owner)
    assert everything[0] == full and everything[1] == 500
    config = replace(CONFIG, train=[SNAP[0], compact], balance_point_density=True, max_epochs=1)
    history = train(config, tmp_path / "ck.pt", progress=False, log=lambda line: None)
    assert len(history) == 1 and math.isfinite(history[0]["validation_loss"])


def test_cli_train_with_toml_and_export(tmp_path, capsys):
    config = tmp_path / "train.toml"
    config.write_text(
        textwrap.dedent(
            f"""\
            [data]
            train = ["{SNAP[0]}"]
            validation = ["{SNAP[1]}"]
            [model]
            hidden = [8]
            [training]
            batch_size = 8192
            max_epochs = 1
            [descriptor_params]
            twojmax = 2
            """
        )
    )
    assert cli.main(["train", str(config), "-o", str(tmp_path / "ck.pt"), "-q"]) == 0
    assert "best validation loss" in capsys.readouterr().out
    assert cli.main(["export", str(tmp_path / "ck.pt"), "-o", str(tmp_path / "m.pt")]) == 0
    assert (
        json.loads(json.dumps(load_metadata(tmp_path / "m.pt")))["descriptor_params"]["twojmax"]
        == 2
    )


@pytest.mark.parametrize("store_jacobian", [False, True], ids=["adjoint", "stored"])
def test_force_term_forces_are_minus_the_energy_gradient(checkpoint, store_jacobian):
    """The forces the force term fits are -dA/dR of the network's free energy on the
    coarse grid (descriptor derivatives, functional gradient and back-propagation
    together), by either contraction, checked against central differences of A in double
    precision."""
    network = build_model(checkpoint).network.double()
    params = CONFIG.params()
    source = SnapshotSource(SNAP[3], params)
    target = coarse_grid_target(
        source, snapshot_reference(source), params, spacing=0.8, device="cpu",
        store_jacobian=store_jacobian,
    )  # fmt: skip
    assert target.grid == (5, 5, 5)
    functional = functional_for(source.snapshot)
    predicted = predicted_energy_forces(network, functional, target)
    energy, forces = predicted.energy, predicted.forces

    def free_energy(atoms) -> float:
        x = torch.as_tensor(compute_grid_descriptors(atoms, target.grid, params))
        with torch.no_grad():
            ldos = network(x.reshape(-1, x.shape[-1]))
        terms, _ = functional.evaluate(
            ldos.reshape(*target.grid, -1), target.reference.cell, target.reference.electrons, False
        )
        return float(terms["electronic"])

    atoms = source.snapshot.atoms
    assert free_energy(atoms) == pytest.approx(energy, rel=1e-10)
    step = 1e-4
    for coordinate in (0, 4, 11):
        shifted = []
        for sign in (1.0, -1.0):
            moved = atoms.copy()
            moved.positions[coordinate // 3, coordinate % 3] += sign * step
            shifted.append(free_energy(moved))
        difference = -(shifted[0] - shifted[1]) / (2 * step)
        assert float(forces[coordinate].detach()) == pytest.approx(difference, rel=1e-5, abs=1e-6)
    # QE's electronic forces (F_QE - F_ii) are what the term fits; they balance F_ii
    assert target.electronic_forces.shape == (3 * len(atoms),)


def test_stress_term_strain_derivatives_are_those_of_the_energy(smooth_checkpoint):
    """dA/dh of the stress term (descriptor part through dB/dh, the functional's explicit
    cell part) equals central differences of A with the descriptors recomputed on the
    strained cell; the target is -V sigma_QE + W_ii. The session's SiLU model: differences
    across LeakyReLU kinks are off by ~1e-3."""
    network = build_model(smooth_checkpoint).network.double()
    params = CONFIG.params()
    source = SnapshotSource(SNAP[3], params)
    reference = snapshot_reference(source)
    target = coarse_grid_target(
        source, reference, params, spacing=0.8, device="cpu", with_stress=True
    )
    functional = functional_for(source.snapshot)
    predicted = predicted_energy_forces(network, functional, target)
    values, graphs = predicted_strain_derivatives(predicted, functional, target)

    def free_energy(atoms) -> float:
        x = torch.as_tensor(compute_grid_descriptors(atoms, target.grid, params))
        with torch.no_grad():
            ldos = network(x.reshape(-1, x.shape[-1]))
        cell = torch.as_tensor(np.asarray(atoms.cell))
        terms, _ = functional.evaluate(
            ldos.reshape(*target.grid, -1), cell, target.reference.electrons, False
        )
        return float(terms["electronic"])

    atoms = source.snapshot.atoms
    step = 1e-4
    for component in range(6):
        plus, minus = (free_energy(strained(atoms, component, s * step)) for s in (1.0, -1.0))
        difference = (plus - minus) / (2 * step)
        assert float(values[component]) == pytest.approx(difference, rel=1e-5, abs=1e-4)
    # the off-diagonal strains are not trivially zero here (displaced atoms)
    assert abs(float(values[3])) > 1e-2
    assert graphs.shape == (6,) and graphs.requires_grad
    # the explicit part's parameter gradient is that of sum dA/dd(deformed cell) . d, the
    # functional's own gradient on each deformed cell, differenced over the strain
    parameter = next(network.parameters())
    ldos = predicted.ldos
    fixed = ldos.detach().reshape(*target.grid, -1)
    for component in (0, 3):
        linears = []
        for sign in (1.0, -1.0):
            deformation = np.eye(3) + sign * STRAIN_STEP * strain_matrix(component)
            _, gradient = functional.evaluate(
                fixed, reference.cell @ torch.as_tensor(deformation.T), reference.electrons, True
            )
            linears.append((gradient.reshape(ldos.shape) * ldos).sum())
        explicit = (linears[0] - linears[1]) / (2 * STRAIN_STEP)
        expected = torch.autograd.grad(
            predicted.strain_descriptor_part[component] + explicit, parameter, retain_graph=True
        )[0]
        (actual,) = torch.autograd.grad(graphs[component], parameter, retain_graph=True)
        scale = float(expected.abs().max())
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9 * scale)
    volume = atoms.get_volume()
    stress = source.snapshot.reference("stress")
    np.testing.assert_allclose(
        target.electronic_strain_derivative.numpy()[[0, 3]],
        [-volume * stress[0, 0] + reference.ii_virial[0, 0],
         -volume * stress[0, 1] + reference.ii_virial[0, 1]],
    )  # fmt: skip


def test_hartree_term_is_the_functionals_hartree_error_and_its_gradient_lowers_it(checkpoint):
    """The Hartree term's error is the functional's own E_H of the coarse-grid prediction
    minus QE's printed E_H, and a small step along its parameter gradient lowers it by
    the first-order amount."""
    network = build_model(checkpoint).network.double()
    params = CONFIG.params()
    source = SnapshotSource(SNAP[3], params)
    reference = snapshot_reference(source)
    target = coarse_grid_target(source, reference, params, spacing=0.8, device="cpu")
    functional = functional_for(source.snapshot)
    config = replace(CONFIG, energy_weight=0.0, force_weight=0.0, hartree_weight=1.0)

    def hartree_of(net) -> float:
        with torch.no_grad():
            ldos = net(target.descriptors.double())
        terms, _ = functional.evaluate(
            ldos.reshape(*target.grid, -1), reference.cell, reference.electrons, False
        )
        return float(terms["hartree"])

    error = (hartree_of(network) - reference.qe_hartree) / reference.natoms
    assert abs(error) > 1e-4, "the test needs a network that misses E_H"
    network.zero_grad()
    loss, errors = physics_loss(network, functional, target, config)
    assert errors.hartree_sq == pytest.approx(error**2, rel=1e-6)
    loss.backward()
    parameters = [p for p in network.parameters() if p.grad is not None]
    squared_norm = sum(float((p.grad**2).sum()) for p in parameters)
    step = 1e-3 * errors.hartree_sq / squared_norm
    with torch.no_grad():
        for p in parameters:
            p -= step * p.grad
    lowered = ((hartree_of(network) - reference.qe_hartree) / reference.natoms) ** 2
    # first order: the loss falls by step * |grad|^2; the gradient holds the Fermi level
    # fixed, which moves a little (0.9 % off here)
    assert errors.hartree_sq - lowered == pytest.approx(step * squared_norm, rel=0.05)


def test_descriptor_adjoint_and_its_backward_equal_a_dense_jacobian():
    """DescriptorAdjoint contracts beta with dB/dR and dB/dh without storing them; its
    backward differentiates the descriptors along the incoming gradient. Both must equal
    the products with the dense Jacobian (central differences per coordinate and strain,
    a step of 1e-5: ~1e-8 of the largest value) to 1e-6 of the largest value."""
    params = CONFIG.params()
    source = SnapshotSource(SNAP[3], params)
    target = coarse_grid_target(
        source, snapshot_reference(source), params, spacing=0.8, device="cpu", with_stress=True
    )
    atoms, grid = target.atoms, target.grid
    points, components = target.descriptors.shape
    step = 1e-5

    def derivative(plus, minus) -> np.ndarray:
        values = [compute_grid_descriptors(a, grid, params) for a in (plus, minus)]
        return (values[0] - values[1]).reshape(points, -1) / (2 * step)

    columns = []
    for coordinate in range(3 * len(atoms)):
        moved = [atoms.copy(), atoms.copy()]
        moved[0].positions[coordinate // 3, coordinate % 3] += step
        moved[1].positions[coordinate // 3, coordinate % 3] -= step
        columns.append(-derivative(*moved))  # F = -beta . dB/dR
    columns += [derivative(strained(atoms, c, step), strained(atoms, c, -step)) for c in range(6)]
    jacobian = torch.as_tensor(np.stack(columns, axis=-1))  # [P, K, 3N + 6]

    generator = torch.Generator().manual_seed(3)
    beta = torch.randn(points, components, dtype=torch.float64, generator=generator)
    beta.requires_grad_(True)
    contracted = DescriptorAdjoint.apply(beta, target)
    expected = torch.einsum("pk,pkc->c", beta.detach(), jacobian)
    bound = 1e-6 * float(expected.abs().max())
    torch.testing.assert_close(contracted.detach(), expected, rtol=0.0, atol=bound)
    # the strains and forces are not trivially zero here (displaced atoms)
    assert float(expected.abs().min()) > 0.0

    weights = torch.randn(3 * len(atoms) + 6, dtype=torch.float64, generator=generator)
    (gradient,) = torch.autograd.grad((weights * contracted).sum(), beta)
    expected_gradient = jacobian @ weights
    bound = 1e-6 * float(expected_gradient.abs().max())
    torch.testing.assert_close(gradient, expected_gradient, rtol=0.0, atol=bound)
    zero = torch.autograd.grad((0.0 * contracted).sum(), beta)[0]
    assert float(zero.abs().max()) == 0.0

    # the stored dB/dR of the training (float32, a step of 1e-4) gives the same products
    target.jacobian = torch.as_tensor(descriptor_jacobian(atoms, grid, params, True))
    stored = contract(beta, target)
    bound = 1e-5 * float(expected.abs().max())
    torch.testing.assert_close(stored.detach(), expected, rtol=0.0, atol=bound)
    (gradient,) = torch.autograd.grad((weights * stored).sum(), beta)
    bound = 1e-5 * float(expected_gradient.abs().max())
    torch.testing.assert_close(gradient, expected_gradient, rtol=0.0, atol=bound)


def test_density_weights_give_the_density_over_its_mean(checkpoint):
    source = SnapshotSource(SNAP[3], CONFIG.params())
    snap = source.snapshot
    functional = functional_for(snap)
    weights = density_weights(source, functional)
    _, ldos = source.all_points()
    relative = ldos.astype(np.float64) @ weights
    # the Fermi level holds N_val electrons: the relative density averages to one
    assert relative.mean() == pytest.approx(1.0, abs=1e-9)
    rows = torch.as_tensor(ldos, dtype=torch.float64)
    voxel = snap.atoms.get_volume() / len(rows)
    electrons = float(snap.attrs["num_valence_electrons"])
    mu = functional.fermi_level(functional.dos(rows, voxel), electrons)
    density = functional.density(rows, mu).numpy()
    np.testing.assert_allclose(relative, density * snap.atoms.get_volume() / electrons, rtol=1e-12)
    # the loss term is the squared relative density error of each point's prediction
    network = build_model(checkpoint).network.float()
    x, y = source.all_points()
    x, y = torch.as_tensor(x[:100]), torch.as_tensor(y[:100])
    table = torch.as_tensor(weights, dtype=torch.float32).expand(100, -1)
    with torch.no_grad():
        error = network(x) - y
        expected = float(
            ((error / network.ldos_scale) ** 2).mean() + 2.0 * ((error @ table[0]) ** 2).mean()
        )
        assert float(point_loss(network, x, y, table, 2.0)) == pytest.approx(expected, rel=1e-5)


def test_energy_force_terms_train_and_resume_exactly(tmp_path):
    """With the energy, force and density terms and weight averaging on (state to resume)."""
    config = replace(
        CONFIG, max_epochs=3, energy_weight=1.0, force_weight=1e-3, physics_every=5,
        physics_spacing=0.8, weight_averaging=0.9, density_weight=0.1, physics_start_epoch=1,
        physics_lr_factor=0.5, stress_weight=1e-3,
    )  # fmt: skip
    uninterrupted = train(config, tmp_path / "a.pt", progress=False, log=lambda line: None)
    assert all(np.isfinite(r["force_rmse"]) for r in uninterrupted[1:])
    assert all(np.isfinite(r["stress_rmse_GPa"]) for r in uninterrupted[1:])
    # the learning rate is cut when the terms start
    rates = [r["learning_rate"] for r in uninterrupted]
    assert rates[0] == CONFIG.learning_rate and rates[1] == 0.5 * CONFIG.learning_rate
    train(config, tmp_path / "b.pt", stop_after_epoch=0, progress=False, log=lambda line: None)
    resumed = train(config, tmp_path / "b.pt", resume=True, progress=False, log=lambda line: None)
    assert json.dumps(resumed) == json.dumps(uninterrupted)
    # from learning_rate, whatever rate the LDOS phase's plateaus left
    train(config, tmp_path / "d.pt", stop_after_epoch=0, progress=False, log=lambda line: None)
    state = load_checkpoint(tmp_path / "d.pt")
    state["optimizer"]["param_groups"][0]["lr"] = 1e-7
    save_checkpoint(tmp_path / "d.pt", state)
    decayed = train(config, tmp_path / "d.pt", resume=True, progress=False, log=lambda line: None)
    assert decayed[1]["learning_rate"] == 0.5 * CONFIG.learning_rate
    with pytest.raises(
        ValueError, match=r"force_weight = -1.0 \(section \[physics\]\) is out of range"
    ):
        train(replace(config, force_weight=-1.0), tmp_path / "c.pt", progress=False)
    with pytest.raises(
        ValueError, match=r"stress_weight = -1.0 \(section \[physics\]\) is out of range"
    ):
        train(replace(config, stress_weight=-1.0), tmp_path / "c.pt", progress=False)
    with pytest.raises(
        ValueError, match=r"density_weight = -1.0 \(section \[physics\]\) is out of range"
    ):
        train(replace(config, density_weight=-1.0), tmp_path / "c.pt", progress=False)
    with pytest.raises(
        ValueError, match=r"physics_lr_factor = 0.0 \(section \[physics\]\) is out of range"
    ):
        train(replace(config, physics_lr_factor=0.0), tmp_path / "c.pt", progress=False)
    with pytest.raises(
        ValueError, match=r"weight_averaging = 1.0 \(section \[training\]\) is out of range"
    ):
        train(replace(config, weight_averaging=1.0), tmp_path / "c.pt", progress=False)
    # the averaged weights, not the live ones, are what is kept (and exported)
    state = load_checkpoint(tmp_path / "a.pt")
    objectives = [r["validation_objective"] for r in state["history"]]
    best, live = state["best_network"], state["network"]
    assert any(not torch.equal(best[k], live[k]) for k in best)
    if objectives[-1] < objectives[0]:
        averaged = {k.removeprefix("module."): v for k, v in state["averaged"].items()}
        assert all(torch.equal(best[k], averaged[k]) for k in best)


def test_bad_training_input(tmp_path):
    with pytest.raises(ValueError, match="no training snapshots"):
        train(replace(CONFIG, train=[]), tmp_path / "x.pt", progress=False)
    # descriptors stored with other parameters than the model's
    other = tmp_path / "other.h5"
    add_descriptors(SNAP[0], BispectrumParams(twojmax=2), output=other, progress=False)
    with pytest.raises(ValueError, match="descriptors were computed with"):
        train(replace(CONFIG, train=[str(other)]), tmp_path / "x.pt", progress=False)
    # a file that is not a snapshot
    (tmp_path / "junk.h5").write_text("junk")
    with pytest.raises(ValueError, match="not an HDF5 file"):
        train(replace(CONFIG, train=[str(tmp_path / "junk.h5")]), tmp_path / "x.pt", progress=False)
    # corrupt and missing checkpoints
    (tmp_path / "bad.pt").write_bytes(b"\x80\x02not a checkpoint")
    with pytest.raises(ValueError, match="corrupt or unreadable checkpoint"):
        build_model(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="no such checkpoint"):
        build_model(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="not a TorchScript model file written by"):
        load_metadata(tmp_path / "bad.pt")
    assert not list(tmp_path.glob("x.pt*"))


def test_model_spec_is_written_once_into_attributes_and_metadata(checkpoint, exported):
    """The TorchScript attributes (the pair style's interface) and metadata.json hold the
    same spec, and Model.load reads it back unchanged."""
    spec = spec_from_checkpoints([load_checkpoint(checkpoint)])
    model = Model.load(exported)
    # the history holds NaN (no physics terms), which never compares equal: JSON for it
    assert replace(model.spec, provenance={}) == replace(spec, provenance={})
    assert json.dumps(model.spec.provenance, sort_keys=True) == json.dumps(
        spec.provenance, sort_keys=True
    )
    module = model.module
    assert module.format == "mlsurrogate-model" and module.format_version == 3
    assert module.dropout_probability == spec.dropout_probability == 0.0
    assert module.elements == ["Al"] and module.valence_charges == [3.0]
    assert module.masses == [pytest.approx(26.98, abs=0.01)]
    assert module.grid_spacing == spec.grid_spacing_A
    assert module.cutoff == pytest.approx(2 * 4.67637 * 0.5)
    for name in DESCRIPTOR_KEYWORDS:
        value = getattr(module, name)
        assert value == spec.keyword(name), name
        expected = list if name in PER_ELEMENT_KEYWORDS else keyword_type(name)
        assert type(value) is expected, name
    assert module.twojmax == 4 and module.radius == [0.5] and module.switchflag is True
    assert json.loads(module.metadata_json) == model.metadata
    assert model.metadata["cutoff_A"] == module.cutoff


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda raw: raw.pop("xc_functional"), "metadata.json has no xc_functional"),
        (lambda raw: raw["descriptor_params"].pop("rfac0"), "no descriptor_params.rfac0"),
        (lambda raw: raw.update(format_version=1), "model format version 1; this mlsurrogate"),
    ],
)
def test_model_load_refuses_incomplete_or_old_metadata(checkpoint, tmp_path, change, message):
    model = build_model(checkpoint)
    raw = json.loads(model.metadata_json)
    change(raw)
    model.metadata_json = json.dumps(raw)
    path = save_model(model, tmp_path / "m.pt")
    with pytest.raises(ValueError, match=message) as error:
        Model.load(path)
    assert "export the model again with `mlsurrogate export`" in str(error.value)
    assert str(path) in str(error.value)


def test_checkpoint_and_model_files_are_told_apart(checkpoint, exported, tmp_path, capsys):
    with pytest.raises(ValueError, match="is a training checkpoint, not a model: run `mlsurrogate"):
        Model.load(checkpoint)
    with pytest.raises(ValueError, match="is an exported model, not a training checkpoint"):
        load_checkpoint(exported)
    assert cli.main(["evaluate", str(checkpoint), SNAP[8]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mlsurrogate evaluate: ") and "mlsurrogate export" in err
    assert cli.main(["export", str(exported), "-o", str(tmp_path / "again.pt")]) == 2
    assert "is an exported model, not a training checkpoint" in capsys.readouterr().err
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a TorchScript model file"):
        Model.load(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an mlsurrogate checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_export_checks_the_output_directory_first(checkpoint, tmp_path, capsys):
    target = tmp_path / "missing" / "m.pt"
    # the directory is named even though the checkpoint does not exist: checked first
    assert cli.main(["export", str(tmp_path / "none.ckpt"), "-o", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mlsurrogate export: ") and "does not exist" in err
    with pytest.raises(OutputError, match="does not exist"):
        export_model(checkpoint, target)
    # training too: before any snapshot is read (these do not exist either)
    with pytest.raises(OutputError, match="does not exist"):
        train(replace(CONFIG, train=["none.h5"]), target, progress=False)
    assert not target.parent.exists()


def test_unphysical_ldos_and_bad_structures_give_clear_errors(exported, monkeypatch):
    model = Model.load(exported)
    with Snapshot(SNAP[5]) as snap:
        atoms, grid = snap.atoms, snap.grid_shape
    empty = np.zeros((*grid, len(model.energies)))
    with pytest.raises(ValueError, match="grid may be too coarse") as error:
        model.energy_terms(atoms, empty)
    assert "Traceback" not in str(error.value) and "fewer than N_val" in str(error.value)
    broken = atoms.copy()
    broken.positions[1] = np.inf
    with pytest.raises(ValueError, match=r"atoms \[1\] have non-finite"):
        model.energy(broken)
    points = int(np.prod(grid))
    monkeypatch.setattr(descriptors_module, "available_memory_bytes", lambda: points * 8)
    with pytest.raises(ValueError, match="several MPI ranks"):
        model.predict_ldos(atoms, grid)


def test_model_error_message_strips_the_torchscript_traceback():
    raised = RuntimeError(
        "The following operation failed in the TorchScript interpreter.\n"
        "Traceback of TorchScript (most recent call last):\n"
        '  File "physics.py", line 339\n'
        "builtins.ValueError: the LDOS holds 3.0 electrons over the energy grid, fewer than "
        "N_val = 12.0\n"
    )
    message = model_error_message(raised)
    assert message.startswith("the predicted LDOS is unphysical (the LDOS holds 3.0 electrons")
    assert "outside the training data" in message and "Traceback" not in message
    other = RuntimeError("Traceback ...\nbuiltins.ValueError: cell is singular\n")
    assert model_error_message(other) == "cell is singular"


def _copy(source: str, target: Path, edit) -> str:
    shutil.copyfile(source, target)
    with h5py.File(target, "r+") as h5:
        edit(h5)
    return str(target)


@pytest.mark.parametrize("dataset", ["ldos", "descriptors"])
def test_non_finite_training_data_names_the_file_and_dataset(tmp_path, dataset):
    path = tmp_path / "bad.h5"
    if dataset == "descriptors":
        add_descriptors(SNAP[1], CONFIG.params(), output=path, progress=False)
        shutil.move(path, tmp_path / "with.h5")
        source = str(tmp_path / "with.h5")
    else:
        source = SNAP[1]

    def poison(h5):
        values = h5[dataset][2]
        values[0, 1, 0] = np.nan
        h5[dataset][2] = values

    bad = _copy(source, path, poison)
    with pytest.raises(ValueError, match=f"{bad}: dataset {dataset} holds NaN or inf values"):
        train(replace(CONFIG, train=[SNAP[0], bad]), tmp_path / "x.pt", progress=False)
    assert not list(tmp_path.glob("x.pt*"))


def test_non_finite_loss_stops_training(tmp_path, monkeypatch):
    from mlsurrogate.training import loop

    monkeypatch.setattr(loop, "point_loss", lambda *args: torch.tensor(math.nan))
    with pytest.raises(ValueError, match="training loss became NaN or inf") as error:
        train(CONFIG, tmp_path / "x.pt", progress=False, log=lambda line: None)
    assert SNAP[0] in str(error.value) and "learning_rate" in str(error.value)


@pytest.mark.parametrize(
    ("edit", "what"),
    [
        (lambda h5: h5.attrs.__setitem__("xc_functional", "PBE"), "xc_functional"),
        (lambda h5: h5.attrs.__setitem__("electronic_temperature_K", 1200.0), "electronic_temp"),
        (
            lambda h5: h5.attrs.__setitem__("pseudopotentials", '{"Al": "Al.pbe-n.UPF"}'),
            "pseudopotentials",
        ),
        (lambda h5: h5["energies"].__setitem__(slice(None), h5["energies"][()] + 0.05), "energy"),
    ],
)
def test_mixed_snapshot_settings_are_refused(tmp_path, edit, what):
    other = _copy(SNAP[1], tmp_path / "other.h5", edit)
    with pytest.raises(ValueError, match=f"{other} and {SNAP[0]} differ in {what}"):
        train(replace(CONFIG, train=[SNAP[0], other]), tmp_path / "x.pt", progress=False)


def test_mixed_elements_are_refused(tmp_path):
    def to_cu(h5):
        species = h5["species"][()]
        species[0] = b"Cu"
        h5["species"][...] = species

    other = _copy(SNAP[1], tmp_path / "cu.h5", to_cu)
    with pytest.raises(ValueError, match=f"{other} and {SNAP[0]} differ in elements"):
        train(replace(CONFIG, validation=[other]), tmp_path / "x.pt", progress=False)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[training]\nbatch_size = 'big'\n", r"batch_size \(section \[training\]\) must be int"),
        ("[training]\nmax_epochs = -3\n", r"max_epochs = -3 \(section \[training\]\) is out of"),
        ("[model]\nhidden = [8, -1]\n", r"hidden = \[8, -1\] \(section \[model\]\) is out of"),
        ("[training]\nbatchsize = 2\n", r"unknown key 'batchsize' in section \[training\]"),
        ("[model]\nbatch_size = 2\n", r"'batch_size' belongs in section \[training\], not \[model"),
        ("max_epochs = 2\n", r"belongs in section \[training\]"),
        ("[optimizer]\nlr = 1\n", r"\[optimizer\] / optimizer is not a section .* sections: data"),
        ("[training]\nseed = true\n", r"seed \(section \[training\]\) must be int"),
        ("[descriptor_params]\ntwojmax = 2.5\n", r"twojmax \(section \[descriptor_params\]\)"),
        ("[descriptor_params]\ntwojmx = 2\n", r"unknown keys \['twojmx'\] in section \[descr"),
        ("[physics]\nenergy_weight = -1.0\n", r"energy_weight = -1.0 \(section \[physics\]\)"),
    ],
)
def test_toml_errors_name_the_key_and_section(tmp_path, text, message):
    path = tmp_path / "train.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        TrainingConfig.from_toml(path)
    assert str(error.value).startswith(f"{path}: ")


def test_training_config_page_is_current():
    """docs/training-config.md is generated from the dataclass (run config_reference())."""
    page = Path(__file__).resolve().parents[1] / "docs" / "training-config.md"
    assert page.read_text() == config_reference() + "\n"
    for f in fields(TrainingConfig):
        assert f"`{f.name}`" in page.read_text()


def test_evaluate_prints_the_errors_computed_independently(smooth_checkpoint, tmp_path, capsys):
    """mlsurrogate evaluate's energy, Hartree, Fermi level (sign included) and force errors equal
    the model's prediction, evaluated here step by step (forces: central differences of
    that energy; SiLU, so without kinks), minus QE's values."""
    exported = export_model(smooth_checkpoint, tmp_path / "silu.pt")
    assert cli.main(["evaluate", str(exported), SNAP[8]]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "snapshot_08" in line)
    printed = [float(cell) for cell in row.split("|")[5:10]]
    printed_hartree = printed.pop(1)
    scripted = torch.jit.load(str(exported))
    with Snapshot(SNAP[8]) as snap:
        atoms, attrs, grid = snap.atoms, snap.attrs, snap.grid_shape
        qe_forces = snap.reference("forces")
    params = CONFIG.params()

    def terms_of(structure):
        descriptors = compute_grid_descriptors(structure, grid, params)
        with torch.no_grad():
            ldos = scripted(torch.as_tensor(descriptors.reshape(-1, descriptors.shape[-1])))
        cell = torch.as_tensor(np.asarray(structure.cell), dtype=torch.float64)
        terms, _ = scripted.functional.evaluate(ldos.reshape(*grid, -1), cell, 12.0, False, None)
        free_energy = float(terms["electronic"]) + ion_ion_energy(structure, {"Al": 3.0}).energy
        return terms, free_energy

    terms, free_energy = terms_of(atoms)
    natoms, step = len(atoms), 1e-4
    forces = np.zeros((natoms, 3))
    for atom, axis in np.ndindex(natoms, 3):
        shifted = []
        for sign in (1.0, -1.0):
            moved = atoms.copy()
            moved.positions[atom, axis] += sign * step
            shifted.append(terms_of(moved)[1])
        forces[atom, axis] = -(shifted[0] - shifted[1]) / (2 * step)
    expected = [
        1000 * (float(terms["band"]) - attrs["energy_band_eV"]) / natoms,
        1000 * (free_energy - attrs["energy_total_eV"]) / natoms,
        1000 * (float(terms["fermi_level"]) - attrs["fermi_energy_eV"]),
        float(np.sqrt(np.mean((forces - qe_forces) ** 2))),
    ]
    assert abs(expected[2]) > 0.5  # the sign of the Fermi level error is tested
    assert printed[0] == pytest.approx(expected[0], abs=0.006)
    assert printed[1] == pytest.approx(expected[1], abs=0.006)
    assert printed[2] == pytest.approx(expected[2], abs=0.06)
    assert printed[3] == pytest.approx(expected[3], abs=6e-5)
    hartree = 1000 * (float(terms["hartree"]) - attrs["energy_hartree_eV"]) / natoms
    assert printed_hartree == pytest.approx(hartree, abs=0.006)


def test_fine_tuning_starts_from_the_initial_checkpoint(smooth_checkpoint, tmp_path):
    """initial_checkpoint: the run starts from its best network (weights and scalers);
    frozen_layers keep the first layers as they were."""
    from conftest import smooth_training_config

    initial = load_checkpoint(smooth_checkpoint)["best_network"]
    still = tmp_path / "still.ckpt"
    config = smooth_training_config(
        initial_checkpoint=str(smooth_checkpoint), max_epochs=1, learning_rate=1e-12
    )
    train(config, still, progress=False, log=lambda line: None)
    for key, value in load_checkpoint(still)["best_network"].items():
        np.testing.assert_allclose(value.numpy(), initial[key].numpy(), rtol=0, atol=1e-9)

    frozen = tmp_path / "frozen.ckpt"
    config = smooth_training_config(
        initial_checkpoint=str(smooth_checkpoint), frozen_layers=1, max_epochs=2, seed=9
    )
    train(config, frozen, progress=False, log=lambda line: None)
    tuned = load_checkpoint(frozen)["network"]
    assert torch.equal(tuned["layers.0.weight"], initial["layers.0.weight"])
    assert torch.equal(tuned["layers.0.bias"], initial["layers.0.bias"])
    assert not torch.equal(tuned["layers.2.weight"], initial["layers.2.weight"])

    with pytest.raises(ValueError, match="trained with hidden = \\[32\\]"):
        train(
            smooth_training_config(initial_checkpoint=str(smooth_checkpoint), hidden=[16]),
            tmp_path / "other.ckpt",
            progress=False,
        )
    with pytest.raises(ValueError, match="frozen_layers .section \\[transfer\\]. needs"):
        smooth_training_config(frozen_layers=1).validate()
    with pytest.raises(ValueError, match="frozen_layers = 2 .section \\[transfer\\]. is out"):
        smooth_training_config(initial_checkpoint="x.ckpt", frozen_layers=2).validate()


def test_compact_snapshots_train_like_the_full_ones(checkpoint, tmp_path):
    """A compact copy with every point reads as the full snapshot (same points, DOS and
    density weights); copies with 10 % of the points fine-tune a network with the energy
    and force terms (whose full-grid prediction needs the descriptors of every point)."""
    from mlsurrogate.data import compact_snapshot

    params = CONFIG.params()
    full = SnapshotSource(SNAP[0], params)
    every = compact_snapshot(SNAP[0], tmp_path / "every.h5", full.num_points, seed=1)
    compact = SnapshotSource(str(every), params)
    assert compact.num_chunks == 1 and compact.num_points == full.num_points
    for ours, theirs in zip(compact.all_points(), full.all_points()):
        np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(compact.grid_descriptors(), full.grid_descriptors())
    functional = functional_for(full.snapshot)
    np.testing.assert_allclose(
        density_weights(compact, functional), density_weights(full, functional), rtol=1e-12
    )
    small = [
        str(compact_snapshot(p, tmp_path / f"c{i}.h5", 1400, seed=i))
        for i, p in enumerate(CONFIG.train)
    ]
    with Snapshot(small[0]) as snap:
        assert snap.ldos.shape == (1400, len(snap.energies)) and snap.descriptors is None
        rows = snap.ldos[()]
        np.testing.assert_array_equal(rows, full.snapshot.read_points("ldos", snap.ldos_points))
    config = replace(
        CONFIG, train=small, validation=small[:1], max_epochs=2, energy_weight=1.0,
        force_weight=1e-3, physics_every=1, physics_spacing=0.8, physics_start_epoch=0,
        initial_checkpoint=str(checkpoint), learning_rate=3e-4,
    )  # fmt: skip
    history = train(config, tmp_path / "ck.pt", progress=False, log=lambda line: None)
    assert np.isfinite(history[-1]["force_rmse"]) and np.isfinite(history[-1]["total_meV_atom"])


def test_a_physics_cache_shares_the_terms_set_up_without_changing_the_training(
    checkpoint, tmp_path, monkeypatch
):
    """The second training with the same cache makes no coarse-grid target of its own and
    gives the same history as a training without the cache."""
    from mlsurrogate.training import loop

    config = replace(
        CONFIG, max_epochs=2, energy_weight=1.0, force_weight=1e-3, physics_every=1,
        physics_spacing=0.8, physics_start_epoch=0, initial_checkpoint=str(checkpoint),
        learning_rate=3e-4, physics_jacobian_gb=1e-4,
    )  # fmt: skip
    quiet = {"progress": False, "log": lambda line: None}
    plain = train(config, tmp_path / "plain.pt", **quiet)
    cache: dict = {}
    first = train(config, tmp_path / "first.pt", physics_cache=cache, **quiet)
    assert len(cache) == len(config.train) + len(config.validation)
    assert any(t.jacobian is None for t in cache.values()), "the adjoint's targets too"

    def refuse(*args, **kwargs):
        raise AssertionError("the cache should have held this target")

    monkeypatch.setattr(loop, "coarse_grid_target", refuse)
    second = train(config, tmp_path / "second.pt", physics_cache=cache, **quiet)
    for history in (first, second):
        assert [h["validation_objective"] for h in history] == pytest.approx(
            [h["validation_objective"] for h in plain], rel=1e-6
        )
