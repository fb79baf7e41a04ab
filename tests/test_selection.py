"""Selection of the next DFT snapshots: trust levels, descriptor-space dissimilarity to
the training set, diverse batches, and `mlsurrogate select`."""

from __future__ import annotations

import ase.io
import numpy as np
import pytest

from conftest import DATA
from mlsurrogate import cli
from mlsurrogate.data import Snapshot
from mlsurrogate.descriptors import BispectrumParams
from mlsurrogate.model import Model
from mlsurrogate.selection import (
    DescriptorPCA,
    farthest_point_order,
    pick,
    score_candidates,
    trust_level,
)

PARAMS = BispectrumParams(twojmax=4)
TRAINING = [str(DATA / f"snapshot_0{i}.h5") for i in (0, 3, 9)]


def test_trust_levels():
    assert [trust_level(f) for f in (0.01, 0.05, 0.1, 0.15, 0.4)] == [
        "accurate", "candidate", "candidate", "failed", "failed"
    ]
    with pytest.raises(ValueError, match="low < high"):
        trust_level(0.1, (0.2, 0.1))


def test_pca_recovers_the_axes_of_known_data():
    rng = np.random.default_rng(0)
    # variance 9 along (1, 1, 0)/sqrt(2), 1 along z, 0.01 across
    samples = rng.normal(size=(20000, 3)) * [3.0, 0.1, 1.0]
    rotation = np.array([[1, 1, 0], [-1, 1, 0], [0, 0, np.sqrt(2)]]) / np.sqrt(2)
    data = samples @ rotation
    pca = DescriptorPCA.fit([data[:10000], data[10000:]], components=2)
    z_scaled = rotation[0] / data.std(axis=0)
    assert abs(pca.components[0] @ z_scaled / np.linalg.norm(z_scaled)) > 0.99
    # the training data itself: zero distances, reconstruction error 1 by definition
    same = pca.dissimilarity(data)
    assert same.pc1_mean_distance < 0.02 and same.pc1_wasserstein < 0.02
    assert same.reconstruction_error == pytest.approx(1.0, rel=0.05)
    shifted = pca.dissimilarity(data + 3.0 * rotation[0])
    assert shifted.pc1_mean_distance > 0.9 and shifted.pc1_wasserstein > 0.9


def test_farthest_point_order_skips_near_duplicates():
    features = np.array([[0.0, 0.0], [0.0, 0.001], [5.0, 0.0], [0.0, 4.0], [5.0, 0.001]])
    order = farthest_point_order(features, first=0, count=3)
    # rows 0/1 and 2/4 are near-duplicate pairs: one of each, and row 3
    assert order[0] == 0 and 3 in order and 1 not in order and len({2, 4} & set(order)) == 1


@pytest.fixture(scope="module")
def candidates():
    """A training structure itself, a mildly and a strongly displaced copy of another,
    and the same cell compressed by 6 %."""
    with Snapshot(TRAINING[0]) as snap:
        training = snap.atoms
    with Snapshot(DATA / "snapshot_05.h5") as snap:
        held_out = snap.atoms
    strong = held_out.copy()
    strong.rattle(0.3, seed=4)
    compressed = held_out.copy()
    compressed.set_cell(held_out.cell * 0.94, scale_atoms=True)
    return [("training", training), ("held_out", held_out), ("strong", strong),
            ("compressed", compressed)]


def test_dissimilarity_ranks_what_the_training_set_does_not_cover(candidates):
    scores = score_candidates(candidates, TRAINING, PARAMS, spacing=4.05 / 24)
    by_name = {s.name: s.dissimilarity for s in scores}
    # a structure from the training data's generator is alike; what the data lack stands
    # out. Measured (twojmax 4): compression moves all three measures by 100-1000x the
    # held-out structure's; 0.3 A displacements move the PC1 mean 23x and the
    # reconstruction error 3x, but not the PC1 Wasserstein distance
    near = by_name["held_out"]
    compressed = by_name["compressed"]
    assert compressed.pc1_mean_distance > 100 * near.pc1_mean_distance
    assert compressed.pc1_wasserstein > 10 * near.pc1_wasserstein
    assert compressed.reconstruction_error > 100 * near.reconstruction_error
    strong = by_name["strong"]
    assert strong.pc1_mean_distance > 10 * near.pc1_mean_distance
    assert strong.reconstruction_error > 2 * near.reconstruction_error
    picks = pick(scores, 2)
    assert len(picks) == 2 and scores[picks[0]].name in ("strong", "compressed")
    assert "training" not in [scores[i].name for i in picks]


def test_trust_levels_decide_the_eligible_candidates(candidates, smooth_checkpoint, tmp_path):
    from conftest import smooth_training_config
    from mlsurrogate.export import export_model
    from mlsurrogate.training import train

    other = tmp_path / "seed4.ckpt"
    train(smooth_training_config(seed=4), other, progress=False, log=lambda line: None)
    model = Model.load(export_model([smooth_checkpoint, other], tmp_path / "ensemble.pt"))
    scores = score_candidates(candidates, TRAINING, model.params, 0.3, model, trust=(0.0, 1e9))
    assert all(s.level == "candidate" and s.max_force_deviation > 0 for s in scores)
    assert scores[pick(scores, 1)[0]].max_force_deviation == max(
        s.max_force_deviation for s in scores
    )
    everything_failed = score_candidates(candidates[:1], TRAINING, model.params, 0.3, model,
                                         trust=(0.0, 1e-12))
    assert everything_failed[0].level == "failed" and pick(everything_failed, 1) == []


def test_select_command(candidates, tmp_path, capsys):
    paths = []
    for name, atoms in candidates:
        paths.append(str(tmp_path / f"{name}.xyz"))
        ase.io.write(paths[-1], atoms)
    output = tmp_path / "picks.extxyz"
    arguments = ["select", *paths, "--train", *TRAINING, "-k", "2", "--twojmax", "4"]
    assert cli.main([*arguments, "-o", str(output)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("| yes |") == 2 and "wrote 2 structures" in printed
    assert len(ase.io.read(output, index=":")) == 2
    assert cli.main([*arguments, "-k", "0"]) == 2
    assert "k must be >= 1" in capsys.readouterr().err


def test_classical_md_frames(tmp_path):
    from ase.build import bulk

    from mlsurrogate.candidates import classical_md_frames

    atoms = bulk("Al", "fcc", a=4.05, cubic=True).repeat(2)
    frames = classical_md_frames(atoms, [300, 1500], [0.98, 1.0], steps=40, every=20)
    assert [name for name, _ in frames][:2] == ["300K_scale0.98_step20", "300K_scale0.98_step40"]
    assert len(frames) == 2 * 2 * 2
    again = classical_md_frames(atoms, [300, 1500], [0.98, 1.0], steps=40, every=20)
    np.testing.assert_array_equal(frames[-1][1].positions, again[-1][1].positions)

    def displacement(frame) -> float:
        """Mean distance of the atoms from their lattice sites (A)."""
        reference = atoms.copy()
        reference.set_cell(frame.cell, scale_atoms=True)
        return float(np.linalg.norm(frame.positions - reference.positions, axis=1).mean())

    by_name = dict(frames)
    hot, cold = by_name["1500K_scale1_step40"], by_name["300K_scale1_step40"]
    assert displacement(hot) > displacement(cold)
    assert by_name["300K_scale0.98_step40"].get_volume() == pytest.approx(
        atoms.get_volume() * 0.98**3
    )
    structure = tmp_path / "al.xyz"
    atoms.write(structure)
    output = tmp_path / "frames.extxyz"
    command = ["explore", str(structure), "--temperatures", "600", "--steps", "20",
               "--every", "10", "-o", str(output)]
    assert cli.main(command) == 0
    assert len(ase.io.read(output, index=":")) == 2
    assert cli.main([*command[:-1], str(tmp_path / "missing" / "f.extxyz")]) == 2


def test_failed_structures_fill_the_batch_only_when_asked_and_least_deviating_first():
    from mlsurrogate.selection import CandidateScore, Dissimilarity

    nothing = Dissimilarity(0.0, 0.0, 1.0)
    scores = [
        CandidateScore(f"s{i}", nothing, np.array([float(i)]), deviation, 0.0, "failed")
        for i, deviation in enumerate([0.9, 0.3, 0.5])
    ]
    assert pick(scores, 2) == []
    assert pick(scores, 2, fill_with_failed=True) == [1, 0]  # 0.3 first, then the farthest


def test_failed_structures_fill_a_batch_with_too_few_candidates_farthest_first():
    from mlsurrogate.selection import CandidateScore, Dissimilarity

    nothing = Dissimilarity(0.0, 0.0, 1.0)
    levels = ["failed", "candidate", "failed", "failed"]
    positions = [0.1, 0.0, 5.0, 0.2]  # s2 lies farthest from the one candidate
    scores = [
        CandidateScore(f"s{i}", nothing, np.array([x]), 0.5, 0.0, level)
        for i, (x, level) in enumerate(zip(positions, levels, strict=True))
    ]
    assert pick(scores, 3) == [1]
    assert pick(scores, 2, fill_with_failed=True) == [1, 2]
    picked = pick(scores, 3, fill_with_failed=True)
    assert picked[:2] == [1, 2] and len(set(picked)) == 3
    assert pick(scores, 1, fill_with_failed=True) == [1]  # enough candidates: no filling


def test_a_candidate_with_an_element_the_model_lacks_is_named(smooth_model, tmp_path, capsys):
    from ase.build import bulk

    copper = tmp_path / "cu.xyz"
    ase.io.write(copper, bulk("Cu", "fcc", a=3.6, cubic=True))
    code = cli.main(["select", str(copper), "--train", TRAINING[0], "--model", smooth_model])
    err = capsys.readouterr().err
    assert code == 2 and f"candidate {copper}:0 has Cu, which the model does not know" in err

