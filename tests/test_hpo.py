"""Descriptor and network search: ACSD, NASWOT, orthogonal arrays, the Optuna study with
its resume, OAT, and `mlsurrogate hpo`."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import numpy as np
import pytest

from conftest import DATA
from mlsurrogate import cli
from mlsurrogate.data import Snapshot
from mlsurrogate.descriptors import BispectrumParams, compute_grid_descriptors
from mlsurrogate.hpo.acsd import acsd, acsd_scan, cosine_similarities, descriptors_at
from mlsurrogate.hpo.naswot import Architecture, naswot_score, score_from_jacobians
from mlsurrogate.hpo.orthogonal_array import orthogonal_array, range_analysis, run_oat
from mlsurrogate.hpo.study import open_study, run_study
from mlsurrogate.hpo.trials import HpoConfig, trial_config, trial_key
from mlsurrogate.training import load_checkpoint, train
from mlsurrogate.training.checkpoint import save_checkpoint

SNAPSHOT = str(DATA / "snapshot_00.h5")


def test_acsd_is_the_mean_pair_difference_of_cosine_similarities():
    rng = np.random.default_rng(1)
    descriptors, ldos = rng.random((6, 4)), rng.random((6, 5))
    expected = []
    for i, j in itertools.combinations(range(6), 2):
        cos_b = (
            descriptors[i]
            @ descriptors[j]
            / np.linalg.norm(descriptors[i])
            / np.linalg.norm(descriptors[j])
        )  # noqa: E501
        cos_l = ldos[i] @ ldos[j] / np.linalg.norm(ldos[i]) / np.linalg.norm(ldos[j])
        expected.append(abs(cos_l - cos_b))
    assert acsd(descriptors, ldos) == pytest.approx(np.mean(expected), rel=1e-12)
    assert acsd(ldos, 3.0 * ldos) == pytest.approx(0.0, abs=1e-14)  # scale-free
    with pytest.raises(ValueError, match="all-zero"):
        cosine_similarities(np.zeros((3, 2)))


def test_acsd_descriptors_at_points_equal_the_full_grid():
    params = BispectrumParams(twojmax=4, rcutfac=4.0)
    with Snapshot(SNAPSHOT) as snap:
        atoms, grid = snap.atoms, snap.grid_shape
    full = compute_grid_descriptors(atoms, grid, params).reshape(-1, 14)
    flat = np.array([0, 17, 4000, int(np.prod(grid)) - 1])
    np.testing.assert_allclose(descriptors_at(SNAPSHOT, flat, params), full[flat], rtol=1e-13)


def test_acsd_scan_scores_every_setting_on_the_same_points():
    one_at_a_time = acsd_scan(
        [SNAPSHOT], {"rcutfac": [3.0, 4.67637], "twojmax": [4]}, points=30, progress=False
    )
    assert [r.changes for r in one_at_a_time] == [
        {"rcutfac": 3.0},
        {"rcutfac": 4.67637},
        {"twojmax": 4},
    ]
    assert [r.num_descriptors for r in one_at_a_time] == [91, 91, 14]
    grid = acsd_scan(
        [SNAPSHOT], {"rcutfac": [3.0, 4.67637], "twojmax": [4, 10]}, grid=True, points=30,
        progress=False,
    )  # fmt: skip
    assert len(grid) == 4
    # same seed, same points: the default twojmax (10) at 3.0 A is the same score
    assert grid[1].acsd == pytest.approx(one_at_a_time[0].acsd, rel=1e-12)
    with pytest.raises(ValueError, match="cannot scan 'chemflag'"):
        acsd_scan([SNAPSHOT], {"chemflag": [True]}, points=5, progress=False)


def test_naswot_score_matches_numpy_and_the_rank_argument():
    rng = np.random.default_rng(0)
    jacobians = rng.normal(size=(8, 20))
    eigenvalues = np.linalg.eigvalsh(np.corrcoef(jacobians))
    expected = -np.sum(np.log(eigenvalues + 1e-4) + 1 / (eigenvalues + 1e-4))
    import torch

    assert score_from_jacobians(torch.as_tensor(jacobians)) == pytest.approx(expected, rel=1e-9)
    # identical Jacobians: eigenvalues n and 0 (n - 1 times)
    same = torch.as_tensor(np.tile(rng.normal(size=20), (5, 1)))
    k = 1e-4
    assert score_from_jacobians(same) == pytest.approx(
        -(math.log(5 + k) + 1 / (5 + k)) - 4 * (math.log(k) + 1 / k), rel=1e-6
    )
    # a 2-wide bottleneck keeps the Jacobians in 2 dimensions: far lower than a wide net
    batch = rng.normal(size=(32, 14))
    narrow = naswot_score(Architecture((2,), "silu"), batch, 10, initialisations=2)
    wide = naswot_score(Architecture((64,), "silu"), batch, 10, initialisations=2)
    assert wide[0] > narrow[0] + 1e4
    assert naswot_score(Architecture((64,), "silu"), batch, 10, 2) == wide  # seeded


def test_orthogonal_arrays_cover_every_pair_of_levels():
    for levels in ([3, 3, 3, 3], [2, 2, 2, 2, 2, 2, 2], [2, 3, 2], [5, 2, 4]):
        array = orthogonal_array(levels)
        for a, b in itertools.combinations(range(len(levels)), 2):
            pairs = {(x, y) for x, y in array[:, [a, b]]}
            assert pairs == set(itertools.product(range(levels[a]), range(levels[b])))
    assert orthogonal_array([3, 3, 3, 3]).shape == (9, 4)  # L9
    assert orthogonal_array([2] * 7).shape == (8, 7)  # L8
    square = orthogonal_array([3, 3, 3, 3])
    for a, b in itertools.combinations(range(4), 2):  # balanced: each pair exactly once
        assert len({tuple(r) for r in square[:, [a, b]]}) == 9


def test_range_analysis_by_hand():
    levels = {"a": ["x", "y"], "b": [1, 2]}
    array = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])
    found = range_analysis(levels, array, [1.0, 3.0, 5.0, 7.0])
    assert [f.name for f in found] == ["a", "b"]  # importance 4 before 2
    assert found[0].means == [2.0, 6.0] and found[0].best == "x"
    assert found[1].means == [3.0, 5.0] and found[1].importance == 2.0
    failed = range_analysis(levels, array, [1.0, 3.0, math.inf, 7.0])  # inf -> 7, the worst
    assert {f.name: f.means for f in failed} == {"a": [2.0, 7.0], "b": [4.0, 5.0]}


@pytest.fixture()
def search(tmp_path):
    (tmp_path / "train.toml").write_text(
        f'[data]\ntrain = ["{SNAPSHOT}"]\nvalidation = ["{DATA / "snapshot_06.h5"}"]\n'
        '[model]\nhidden = [8]\nactivation = "silu"\n'
        "[training]\nmax_epochs = 2\nbatch_size = 1024\nthreads = 1\n"
    )
    (tmp_path / "hpo.toml").write_text(
        '[hpo]\ntraining = "train.toml"\nworkdir = "run"\nobjective = "validation_objective"\n'
        "trials = 3\nnaswot_batch = 16\nnaswot_initialisations = 2\n"
        '[space]\nlayers = [1, 2]\nwidth = [4, 8]\nactivation = ["silu", "tanh"]\n'
    )
    return tmp_path / "hpo.toml"


def test_search_config_errors_name_the_key(search, tmp_path):
    text = search.read_text()
    cases = {
        "batchsize = [1]": "'batchsize' cannot be searched",
        "learning_rate = {low = 1e-4, high = 1e-2, log = true}\nbatch_size = [0]": "batch_size",
        'train = ["x.h5"]': "'train' cannot be searched",
    }
    for extra, message in cases.items():
        (tmp_path / "bad.toml").write_text(text + extra + "\n")
        with pytest.raises(ValueError, match=message):
            HpoConfig.from_toml(tmp_path / "bad.toml")
    (tmp_path / "bad.toml").write_text(
        text.replace('objective = "validation_objective"', 'objective = "loss"')
    )
    with pytest.raises(ValueError, match="objective 'loss'"):
        HpoConfig.from_toml(tmp_path / "bad.toml")
    (tmp_path / "bad.toml").write_text(text + "learning_rate = {low = 1e-4, high = 1e-2}\n")
    config = HpoConfig.from_toml(tmp_path / "bad.toml")
    with pytest.raises(ValueError, match="orthogonal array needs lists"):
        config.levels()


def test_optuna_study_resumes_a_killed_trial_from_its_checkpoint(search):
    config = HpoConfig.from_toml(search)
    study = run_study(config, log=lambda line: None)
    assert len(study.trials) == 3
    assert run_study(config, log=lambda line: None).trials == study.trials  # nothing more to do
    # a kill mid-trial leaves it RUNNING in the study and its checkpoint after an epoch
    import optuna

    bigger = dataclasses.replace(config, trials=4)
    distributions = {
        "layers": optuna.distributions.CategoricalDistribution([1, 2]),
        "width": optuna.distributions.CategoricalDistribution([4, 8]),
        "activation": optuna.distributions.CategoricalDistribution(["silu", "tanh"]),
    }
    finished = [t.params for t in study.trials]
    values = next(
        {"layers": layers, "width": width, "activation": activation}
        for layers, width, activation in itertools.product([1, 2], [4, 8], ["silu", "tanh"])
        if {"layers": layers, "width": width, "activation": activation} not in finished
    )
    killed_study = open_study(bigger)
    killed_study.enqueue_trial(values)
    killed = killed_study.ask(distributions)
    assert killed.params == values
    config_text = (search.parent / "train.toml").read_text()
    checkpoint = config.workdir / "trials" / f"{trial_key(values, config_text)}.ckpt"
    train(trial_config(config.base, values), checkpoint, stop_after_epoch=0, progress=False,
          log=lambda line: None)  # fmt: skip
    state = load_checkpoint(checkpoint)
    state["history"][0]["train_loss"] = 123.0  # a mark that only a resume keeps
    save_checkpoint(checkpoint, state)
    lines: list[str] = []
    resumed = run_study(bigger, log=lines.append)
    assert any(f"trial {killed.number} was interrupted" in line for line in lines)
    states = [t.state.name for t in resumed.trials]
    assert states.count("COMPLETE") == 4 and states.count("FAIL") == 1
    record = json.loads(
        (config.workdir / "trials" / f"{trial_key(values, config_text)}.json").read_text()
    )
    assert record["history"][0]["train_loss"] == 123.0  # resumed, not trained again
    assert len(record["history"]) == 2


def test_oat_trains_each_row_once_and_reads_them_back(search):
    config = HpoConfig.from_toml(search)
    lines: list[str] = []
    result = run_oat(config, log=lines.append)
    assert len(result.rows) == 4  # L4 for three 2-level factors
    assert all(math.isfinite(v) or v == math.inf for v in result.objectives)
    assert {a.name for a in result.analysis} == {"layers", "width", "activation"}
    trained = sorted((config.workdir / "trials").glob("*.json"))
    again = run_oat(config, log=lambda line: None)
    assert again.objectives == result.objectives
    assert sorted((config.workdir / "trials").glob("*.json")) == trained
    # an edited recipe is a new trial, not a stale read-back
    recipe = (search.parent / "train.toml").read_text()
    values = result.rows[0]
    assert trial_key(values, recipe) != trial_key(
        values, recipe.replace("max_epochs = 2", "max_epochs = 3")
    )


def test_cli_hpo(search, capsys):
    assert cli.main(["hpo", "acsd", SNAPSHOT, "--rcutfac", "3", "4", "--points", "10", "-q"]) == 0
    out = capsys.readouterr().out
    assert "| rcutfac 3.0 | 91 |" in out and "lowest ACSD" in out
    assert cli.main(["hpo", "acsd", SNAPSHOT]) == 2
    assert "give values to scan" in capsys.readouterr().err
    assert cli.main(["hpo", "naswot", str(search), "-q"]) == 0
    out = capsys.readouterr().out
    assert out.count("| 8x8 silu |") == 1 and "Kendall" not in out
    assert cli.main(["hpo", "optuna", str(search) + ".missing"]) == 2
    assert "cannot read the search config" in capsys.readouterr().err


def test_every_search_key_is_documented():
    from pathlib import Path

    from mlsurrogate.hpo.trials import _HPO_KEYS, OBJECTIVES

    page = (Path(__file__).resolve().parents[1] / "docs" / "hyperparameter-search.md").read_text()
    for key in (*_HPO_KEYS, *OBJECTIVES):
        assert f"`{key}`" in page, key
