"""`mlsurrogate learn` end to end on a tiny case (4-atom Al, tiny QE, one labelling
round), its resume after an interruption, and its config errors; the model-MD explorer
with fix halt."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase.build import bulk

from conftest import TINY_SETTINGS
from mlsurrogate import cli
from mlsurrogate.data import Snapshot
from mlsurrogate.evaluate import ReferenceError
from mlsurrogate.learn import LearnConfig, pressure_mae, run_learning
from mlsurrogate.model import Model
from mlsurrogate.qe import ingest, run_qe

# the tiny settings broaden the LDOS by 0.3 eV, which ingest warns is approximate
pytestmark = pytest.mark.filterwarnings("ignore::mlsurrogate.qe.ApproximateIntegrationWarning")
# four atoms, so the k-point mesh of the tiny one-atom settings shrinks alike
TINY_QE = {**TINY_SETTINGS.__dict__, "kpts": (2, 2, 2), "nbnd": 20, "ldos_program": "wavefunctions"}


def _cell(seed: int) -> ase.Atoms:
    atoms = bulk("Al", "fcc", a=4.05, cubic=True)
    atoms.rattle(0.08, seed=seed)
    return atoms


@pytest.fixture(scope="module")
def tiny_snapshots(tmp_path_factory) -> list[Path]:
    """Two labelled 4-atom snapshots of the tiny QE settings (training, validation)."""
    from mlsurrogate.qe import QESettings

    base = tmp_path_factory.mktemp("learn_data")
    paths = []
    for seed in (1, 2):
        run = run_qe(_cell(seed), QESettings(**TINY_QE), base / f"run{seed}", progress=False)
        paths.append(ingest(run, base / f"snapshot_{seed}.h5", progress=False))
    return paths


def _write_config(directory: Path, snapshots: list[Path], **learn: object) -> Path:
    """A learn TOML for the tiny case: 2 members of one small layer, EMT exploration of a
    4-atom cell, trust levels that make every frame a candidate (so labelling runs)."""
    ase.io.write(directory / "start.xyz", _cell(3))
    (directory / "train.toml").write_text(
        "[model]\nhidden = [16]\nactivation = \"silu\"\n"
        "[training]\nmax_epochs = 3\nbatch_size = 256\nlearning_rate = 3e-3\nseed = 5\n"
        "threads = 1\n[descriptor_params]\ntwojmax = 2\n"
    )
    settings = {
        "workdir": "work", "iterations": 1, "picks": 2, "validation_picks": 1, "members": 2,
        "trust": [0.0, 1e6],
        "finetune_epochs": 2, **learn,
    }  # fmt: skip
    learn_keys = {k: v for k, v in settings.items() if k != "finetune_epochs"}
    qe = {k: v for k, v in TINY_QE.items() if k not in ("pseudopotentials", "pw_command",
                                                         "pp_command") and v is not None}
    text = "[learn]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in learn_keys.items())
    text += (
        f"[data]\ntrain = [\"{snapshots[0]}\"]\nvalidation = [\"{snapshots[1]}\"]\n"
        f"heldout = [\"{snapshots[1]}\"]\n"
        f"[training]\nconfig = \"train.toml\"\nfinetune_epochs = {settings['finetune_epochs']}\n"
        "[explore]\nmethod = \"emt\"\nstructures = [\"start.xyz\"]\n"
        "temperatures_K = [600.0, 1500.0]\nsteps = 20\nevery = 10\n"
        "[qe]\n" + "".join(f"{k} = {json.dumps(list(v) if isinstance(v, tuple) else v)}\n"
                           for k, v in qe.items())
    )  # fmt: skip
    path = directory / "learn.toml"
    path.write_text(text)
    return path


class Interrupt(Exception):
    pass


def test_learn_runs_end_to_end_and_resumes_after_an_interruption(tiny_snapshots, tmp_path):
    """With compact labelled snapshots (ldos_points): the next iteration trains on them."""
    config = LearnConfig.from_toml(_write_config(tmp_path, tiny_snapshots, ldos_points=300))

    def stop_before_qe(line: str) -> None:
        if "labelling" in line:
            raise Interrupt(line)

    with pytest.raises(Interrupt):
        run_learning(config, log=stop_before_qe)
    first = config.workdir / "iteration_00"
    finished = ["member_0.ckpt", "member_1.ckpt", "model.pt", "heldout.json", "selection.json",
                "candidates.extxyz"]  # fmt: skip
    stamps = {name: os.stat(first / name).st_mtime_ns for name in finished}
    assert not (config.workdir / "snapshots" / "iteration_00_pick_0.h5").exists()

    lines: list[str] = []
    records = run_learning(config, log=lines.append)
    assert "iteration 1: training member 0 (fine-tuned) on 2 snapshots" in lines
    assert sum("labelling pick" in line for line in lines) == 2  # only what was not done
    # what was finished before the interruption is kept, not redone
    assert {name: os.stat(first / name).st_mtime_ns for name in finished} == stamps
    assert [r.iteration for r in records] == [0, 1]
    assert [r.training_snapshots for r in records] == [1, 2]
    assert [r.validation_snapshots for r in records] == [1, 2]  # the second pick validates
    assert (config.workdir / "snapshots" / "iteration_00_validation_1.h5").exists()
    assert records[0].frames == 4 and records[0].candidate == 1.0 and records[0].picks
    assert records[1].stop == "iteration budget spent"
    for record in records:
        assert np.isfinite([record.heldout_energy_mae, record.heldout_force_rmse]).all()
        assert record.heldout_energy_uncertainty > 0
    stored = json.loads((first / "heldout.json").read_text())
    heldout = [ReferenceError.from_json(record) for record in stored]
    assert all(e.pressure_error is not None for e in heldout)  # snapshots carry QE's stress
    assert records[0].heldout_pressure_mae == pytest.approx(
        np.mean([abs(e.pressure_error) for e in heldout]), rel=1e-12
    )
    # held-out results of before the pressure column have none: "-" in the report
    older = [ReferenceError.from_json({**e.to_json(), "pressure_error": None}) for e in heldout]
    assert math.isnan(pressure_mae(older))
    # the labelled snapshot is the picked frame, with QE's energy and LDOS
    selection = json.loads((first / "selection.json").read_text())
    frames = ase.io.read(first / "candidates.extxyz", index=":")
    picked = frames[selection["pick_indices"][0]]
    with Snapshot(config.workdir / "snapshots" / "iteration_00_pick_0.h5") as snap:
        assert np.allclose(snap.atoms.get_scaled_positions() % 1.0,
                           picked.get_scaled_positions() % 1.0, atol=1e-8)  # fmt: skip
        assert snap.attrs["energy_total_eV"] < 0 and len(snap.ldos_points) == 300
    with Snapshot(first / "qe_pick_0" / "snapshot.h5") as full:
        assert full.ldos_points is None and full.descriptors is not None
    out = first / "qe_pick_0" / "out"
    assert not list(out.rglob("*wfc*"))  # wavefunctions removed, the XML kept
    assert list(out.rglob("data-file-schema.xml"))
    model = Model.load(config.workdir / "model.pt")
    assert model.ensemble_size == 2
    report = (config.workdir / "report.md").read_text()
    assert report.count("\n| ") == 3  # header and two iterations
    for plot in ("learn_heldout.png", "learn_levels.png"):
        assert (config.workdir / plot).stat().st_size > 1000
    # a finished run resumes to the same records without work
    again = run_learning(config, log=lambda line: None)
    assert [r.heldout_energy_mae for r in again] == [r.heldout_energy_mae for r in records]
    # checkpoints of finished iterations deleted (a committed run kept small): the results
    # are read from disk and nothing is trained again
    for removed in [*first.glob("member_*"), first / "model.pt"]:
        removed.unlink()
    lines = []
    pruned = run_learning(config, log=lines.append)
    assert not any("training member" in line or "labelling" in line for line in lines)
    assert not list(first.glob("member_*"))
    assert [r.heldout_energy_mae for r in pruned] == [r.heldout_energy_mae for r in records]
    assert [r.picks for r in pruned] == [r.picks for r in records]
    # a fine-tune that is not finished needs the checkpoint it starts from, and says so
    last = config.workdir / "iteration_01"
    for removed in [last / "heldout.json", *last.glob("member_1.*"), last / "model.pt"]:
        removed.unlink()
    with pytest.raises(ValueError, match=r"iteration 1 member 1 fine-tunes .*member_1.ckpt"):
        run_learning(config, log=lambda line: None)


def test_learn_cli_and_config_errors(tiny_snapshots, tmp_path, capsys):
    path = _write_config(tmp_path, tiny_snapshots)
    text = path.read_text()
    cases = {
        "pw.x missing": (text.replace("[qe]\n", "[qe]\npw_command = \"no-such-pw.x\"\n"),
                         "'no-such-pw.x' not found on PATH"),
        "key in the wrong section": (text.replace("[data]\n", "[data]\npicks = 2\n"),
                                     r"\[data\] has unknown keys \['picks'\]"),
        "one member": (text.replace("members = 2", "members = 1"), "members must be >= 2"),
        "missing snapshot": (text.replace(str(tiny_snapshots[0]), "nowhere.h5"),
                             "nowhere.h5: no such file"),
        "unknown method": (text.replace('method = "emt"', 'method = "dft"'),
                           "method must be one of"),
        "not TOML": ("[learn\n", "cannot read the learn config"),
    }  # fmt: skip
    for name, (content, message) in cases.items():
        path.write_text(content)
        with pytest.raises(ValueError, match=message):
            LearnConfig.from_toml(path)
        assert cli.main(["learn", str(path)]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("mlsurrogate learn: ") and "Traceback" not in err
    assert not (tmp_path / "work").exists()  # nothing started


@pytest.fixture(scope="module")
def tiny_ensemble(tmp_path_factory) -> Path:
    from conftest import smooth_training_config
    from mlsurrogate.export import export_model
    from mlsurrogate.training import train

    base = tmp_path_factory.mktemp("md_ensemble")
    checkpoints = []
    for seed in (3, 4):
        checkpoints.append(base / f"seed{seed}.ckpt")
        config = smooth_training_config(seed=seed, max_epochs=3)
        train(config, checkpoints[-1], progress=False, log=lambda line: None)
    return export_model(checkpoints, base / "ensemble.pt")


def test_model_md_stops_where_the_deviation_passes_the_threshold(tiny_ensemble):
    from mlsurrogate.candidates import model_md_frames

    atoms = bulk("Al", "fcc", a=4.05, cubic=True)
    atoms.rattle(0.02, seed=1)
    free = model_md_frames(tiny_ensemble, atoms, [1500.0], steps=30, every=10, spacing=0.6,
                           halt_deviation=1e3)[0]  # fmt: skip
    assert not free.halted and free.steps_done == 30 and len(free.frames) == 3
    threshold = float(np.median(free.max_deviations))
    halted = model_md_frames(tiny_ensemble, atoms, [1500.0], steps=30, every=10, spacing=0.6,
                             halt_deviation=threshold)[0]  # fmt: skip
    # the same trajectory (same seed) up to the first frame past the threshold
    first_past = int(np.argmax(free.max_deviations > threshold))
    assert halted.halted and halted.steps_done == 10 * (first_past + 1)
    assert len(halted.frames) == first_past + 1
    assert np.allclose(halted.frames[-1].positions, free.frames[first_past].positions)
    assert halted.max_deviations[-1] > threshold
    # checks between frames: the run stops at a check, and its configuration there is the
    # last frame
    early = model_md_frames(tiny_ensemble, atoms, [1500.0], steps=30, every=10, spacing=0.6,
                            halt_deviation=0.5 * free.max_deviations.min(),
                            check_every=5)[0]  # fmt: skip
    assert early.halted and early.steps_done % 5 == 0 and early.steps_done < 30
    assert len(early.frames) == early.steps_done // 10 + (early.steps_done % 10 > 0)
    assert len(early.max_deviations) == len(early.frames)
    # 30 fs steps at 3000 K fling atoms about: the run ends with LAMMPS's error, and the
    # frames written before it are kept
    wild = model_md_frames(tiny_ensemble, atoms, [3000.0], steps=40, every=2, spacing=0.6,
                           timestep_fs=30.0, halt_deviation=1e3)[0]  # fmt: skip
    assert wild.halted and wild.error.startswith("ERROR") and wild.steps_done < 40
    assert len(wild.frames) == len(wild.max_deviations) <= wild.steps_done // 2
    with pytest.raises(ValueError, match="check_every must divide every"):
        model_md_frames(tiny_ensemble, atoms, [300.0], steps=30, every=10, check_every=3)


def test_model_md_refuses_elements_and_models_it_cannot_use(tiny_ensemble, smooth_model):
    from mlsurrogate.candidates import model_md_frames

    copper = bulk("Cu", "fcc", a=3.6, cubic=True)
    with pytest.raises(ValueError, match="has Cu, which .* was not trained on"):
        model_md_frames(tiny_ensemble, copper, [300.0], steps=10, every=10)
    with pytest.raises(ValueError, match="needs an ensemble model"):
        model_md_frames(smooth_model, bulk("Al", cubic=True), [300.0], steps=10, every=10)



@pytest.mark.parametrize(
    ("scratch_every", "expected"),
    [(0, [True, False, False, False, False]), (2, [True, False, True, False, True])],
)
def test_members_start_from_scratch_at_iteration_0_and_every_scratch_every(
    scratch_every, expected
):
    from mlsurrogate.learn import from_scratch

    assert [from_scratch(i, scratch_every) for i in range(5)] == expected


@pytest.mark.parametrize(("bootstrap", "expected"), [(0, "model"), (1, "emt"), (3, "emt")])
def test_bootstrap_iterations_explore_with_emt_before_the_method(bootstrap, expected):
    from mlsurrogate.learn import ExploreSettings, explore_method

    settings = ExploreSettings(method="model", bootstrap_iterations=bootstrap)
    assert explore_method(settings, 0) == expected
    assert explore_method(settings, bootstrap) == "model"


def test_every_learn_key_is_documented():
    from mlsurrogate.learn import SECTION_KEYS

    page = (Path(__file__).resolve().parents[1] / "docs" / "active-learning.md").read_text()
    for section, keys in SECTION_KEYS.items():
        assert f"`[{section}]`" in page
        for key in keys:
            assert f"| `{key}` |" in page, (section, key)


def test_a_pick_outside_the_ldos_window_is_skipped_with_its_reason(tiny_snapshots, tmp_path):
    import dataclasses

    from mlsurrogate import learn

    config = LearnConfig.from_toml(_write_config(tmp_path, tiny_snapshots))
    config = dataclasses.replace(config, qe=dataclasses.replace(config.qe, ldos_emin_ev=0.0))
    directory = config.workdir / "iteration_00"
    directory.mkdir(parents=True)
    ase.io.write(directory / "candidates.extxyz", [_cell(4)], format="extxyz")
    lines: list[str] = []
    selection = {"picks": ["frame_000"], "pick_indices": [0]}
    learn._label(config, 0, selection, None, lines.append)
    marker = config.workdir / "snapshots" / "iteration_00_pick_0.skipped"
    assert "LDOS window starts at 0.000 eV" in marker.read_text()
    assert len(lines) == 2 and "labelling pick 0 (frame_000" in lines[0]
    assert "pick 0 skipped" in lines[1]
    assert not list((config.workdir / "snapshots").glob("*.h5"))
    learn._label(config, 0, selection, None, lines.append)  # resumed: not rerun
    assert len(lines) == 2
