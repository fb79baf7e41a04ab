"""Active learning: explore -> select -> label with QE -> retrain -> evaluate, repeated
(``mlsurrogate learn learn.toml``; docs/active-learning.md).

Iteration i trains an ensemble on the initial snapshots and every snapshot labelled
before it (iteration 0 from the base training recipe, later ones warm-started from the
previous iteration's members with their own epochs and learning rate), exports it,
evaluates it on the fixed held-out references, and, unless the iteration budget is
spent, explores candidate structures, scores them (trust levels on the ensemble's max
force deviation, dpgen's convention; descriptor-space dissimilarity), and labels the
picks with pw.x + pp.x (the last ``validation_picks`` of them join the validation set:
early stopping then sees the structures the loop is after, not only the initial data).
It stops when the share of explored frames that are not
``accurate`` is at most ``stop_fraction``, when nothing is left to label, or after
``iterations`` labelling rounds.

Everything lives in the work directory, and every file is written whole (temp file,
then rename), so a file that exists is finished and a killed run resumes where it
stopped: finished trainings, QE runs and evaluations are kept; a training killed
mid-way continues from its last epoch; a QE run killed mid-way starts again. A finished
iteration's member checkpoints may be deleted to keep a committed run small: its
held-out errors and selection are read from disk, and only an unfinished fine-tune of it
needs them back.

    WORKDIR/iteration_NN/member_M.ckpt   training checkpoints (+ .done when finished)
    WORKDIR/iteration_NN/model.pt        the ensemble
    WORKDIR/iteration_NN/heldout.json    held-out errors and uncertainty
    WORKDIR/iteration_NN/candidates.extxyz, selection.json, selection.md
    WORKDIR/iteration_NN/qe_pick_J/      pw.x/pp.x run of pick J (wavefunctions removed)
    WORKDIR/snapshots/iteration_NN_pick_J.h5   labelled snapshots (validation_J: validation)
    WORKDIR/report.md, learn_heldout.png, learn_levels.png, model.pt (the newest)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ase
import ase.io
import numpy as np

from mlsurrogate.evaluate import ReferenceError, rank_correlations
from mlsurrogate.files import atomic_output, write_bytes_atomically
from mlsurrogate.qe import QESettings, mpi_commands
from mlsurrogate.toml_config import read_sections
from mlsurrogate.training import TrainingConfig

EXPLORE_METHODS = ("emt", "model", "entropy")
_LEARN_KEYS = {
    "workdir", "iterations", "picks", "members", "stop_fraction", "trust",
    "selection_spacing", "threads", "ldos_mantissa_bits", "validation_picks", "ldos_points",
}  # fmt: skip
_TRAINING_KEYS = {
    "config",
    "finetune_epochs",
    "finetune_learning_rate",
    "frozen_layers",
    "scratch_every",
}


@dataclass(frozen=True)
class ExploreSettings:
    """Where candidates come from: EMT Langevin MD (``emt``) or LAMMPS MD with the
    current ensemble stopped by ``fix halt`` (``model``), from each start structure at
    each temperature and lattice scaling; or entropy-maximized positions in each start
    structure's cell (``entropy``, ``steps`` moves per K). The first
    ``bootstrap_iterations`` iterations explore with EMT whatever ``method`` says: a
    first model trained on small cells is too far off for its own MD to visit what MD
    with a physical potential visits."""

    method: str = "emt"
    bootstrap_iterations: int = 0
    structures: tuple[str, ...] = ()
    temperatures_K: tuple[float, ...] = (933.0,)
    scales: tuple[float, ...] = (1.0,)
    steps: int = 500
    every: int = 50
    check_every: int | None = None  # model MD: steps between deviation checks (halt)
    timestep_fs: float = 2.0
    md_spacing: float = 0.5  # A, the model-MD grid
    k_values: tuple[float, ...] = (1.0, -1.0)  # entropy: weights of the entropy
    ranks: int = 1  # MPI ranks of model MD
    seed: int = 1


@dataclass(frozen=True)
class LearnConfig:
    """An active-learning run (the TOML's sections [learn], [data], [training],
    [explore], [qe]; paths relative to the TOML)."""

    workdir: Path
    train: tuple[str, ...]
    validation: tuple[str, ...]
    heldout: tuple[str, ...]
    training_config: str
    iterations: int = 3
    picks: int = 2
    validation_picks: int = 0  # of each iteration's picks, labelled for validation
    members: int = 3
    stop_fraction: float = 0.05
    trust: tuple[float, float] = (0.05, 0.15)
    selection_spacing: float | None = None  # A; None: the model's training spacing
    finetune_epochs: int = 10
    finetune_learning_rate: float = 3e-4
    frozen_layers: int = 0
    scratch_every: int = 0  # every N-th iteration from scratch (independent members); 0: never
    threads: int | None = None
    ldos_mantissa_bits: int = 23  # < 23 rounds the labelled LDOS (smaller files to commit)
    ldos_points: int = 0  # > 0: labelled snapshots compact, the LDOS at this many points
    explore: ExploreSettings = field(default_factory=ExploreSettings)
    qe: QESettings = field(default_factory=QESettings)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> LearnConfig:
        """Read and check a learn TOML; ValueError naming the file, key and what to do."""
        path = Path(path)
        tables = read_sections(path, "learn config", ("learn", "data", "training", "explore", "qe"))
        base = path.resolve().parent
        for name, allowed in SECTION_KEYS.items():
            misplaced = sorted(set(tables[name]) - allowed)
            if misplaced:
                raise ValueError(
                    f"{path}: [{name}] has unknown keys {misplaced}; it takes "
                    f"{sorted(allowed)} (docs/active-learning.md)"
                )

        def resolve(value: str) -> str:
            return str(base / value)

        learn, data, training = tables["learn"], tables["data"], tables["training"]
        explore, qe = tables["explore"], tables["qe"]
        try:
            for key in ("train", "validation", "heldout"):
                if not data.get(key):
                    raise ValueError(f"[data] {key}: give at least one file")
            if "config" not in training:
                raise ValueError("[training] config: the base training TOML is required")
            qe_ranks = int(qe.pop("mpi_ranks", 1))
            for key in ("kpts", "ldos_kpts"):
                if key in qe:
                    qe[key] = tuple(qe[key])
            qe_settings = QESettings(**{**mpi_commands(qe_ranks), **qe})
            explore_settings = ExploreSettings(
                **{
                    key: tuple(value) if isinstance(value, list) else value
                    for key, value in explore.items()
                }
            )
            config = cls(
                workdir=Path(resolve(learn.pop("workdir", "learn"))),
                train=tuple(resolve(p) for p in data.pop("train")),
                validation=tuple(resolve(p) for p in data.pop("validation")),
                heldout=tuple(resolve(p) for p in data.pop("heldout")),
                training_config=resolve(training.pop("config")),
                explore=dataclasses.replace(
                    explore_settings,
                    structures=tuple(resolve(p) for p in explore_settings.structures),
                ),
                qe=qe_settings,
                **{key: tuple(v) if isinstance(v, list) else v for key, v in learn.items()},
                **training,
            )
            config.validate()
        except TypeError as exc:  # a [qe] key QESettings lacks, or a value of the wrong type
            raise ValueError(
                f"{path}: {exc}; see docs/active-learning.md for keys and types"
            ) from exc
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
        return config

    def validate(self) -> None:
        checks = [
            (self.iterations >= 0, f"[learn] iterations must be >= 0, got {self.iterations}"),
            (self.picks >= 1, f"[learn] picks must be >= 1, got {self.picks}"),
            (0 <= self.validation_picks < self.picks,
             f"[learn] validation_picks must be in 0 .. picks - 1, got {self.validation_picks}"),
            (self.members >= 2, f"[learn] members must be >= 2 (an ensemble), got {self.members}"),
            (0 <= self.stop_fraction < 1, "[learn] stop_fraction must be in [0, 1)"),
            (len(self.trust) == 2 and 0 <= self.trust[0] < self.trust[1],
             f"[learn] trust must be [low, high] with 0 <= low < high, got {list(self.trust)}"),
            (1 <= self.ldos_mantissa_bits <= 23, "[learn] ldos_mantissa_bits must be in 1..23"),
            (self.ldos_points >= 0, "[learn] ldos_points must be >= 0 (0: the full grid)"),
            (self.finetune_epochs >= 1, "[training] finetune_epochs must be >= 1"),
            (self.finetune_learning_rate > 0, "[training] finetune_learning_rate must be > 0"),
            (self.scratch_every >= 0, "[training] scratch_every must be >= 0 (0: never)"),
            (self.explore.bootstrap_iterations >= 0,
             "[explore] bootstrap_iterations must be >= 0 (0: none)"),
            (self.explore.method in EXPLORE_METHODS,
             f"[explore] method must be one of {EXPLORE_METHODS}, got {self.explore.method!r}"),
            (bool(self.explore.structures), "[explore] structures: give at least one file"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        for path in (*self.train, *self.validation, self.training_config, *self.explore.structures):
            if not Path(path).is_file():
                raise ValueError(f"{path}: no such file")
        for program in (self.qe.pw_command, self.qe.pp_command):
            executable = program.split()[0]
            if shutil.which(executable) is None:
                raise ValueError(
                    f"[qe] '{executable}' not found on PATH: install Quantum ESPRESSO "
                    "(`make qe`) or give pw_command / pp_command"
                )
        self.qe.validate()


SECTION_KEYS = {
    "learn": _LEARN_KEYS,
    "data": {"train", "validation", "heldout"},
    "training": _TRAINING_KEYS,
    "explore": {f.name for f in dataclasses.fields(ExploreSettings)},
}


@dataclass
class IterationRecord:
    """One row of the report."""

    iteration: int
    training_snapshots: int
    validation_snapshots: int
    heldout_energy_mae: float  # meV/atom
    heldout_force_rmse: float  # eV/A
    heldout_energy_uncertainty: float  # mean, meV/atom
    heldout_max_force_deviation: float  # mean over structures, eV/A
    energy_rank_correlation: float  # Spearman rho, energy uncertainty vs |error|
    force_rank_correlation: float  # Spearman rho, per-atom force deviation vs error
    heldout_pressure_mae: float = math.nan  # GPa, over the references with QE's stress
    frames: int = 0
    accurate: float = math.nan  # fractions of the explored frames
    candidate: float = math.nan
    failed: float = math.nan
    picks: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # picks QE could not label usefully
    stop: str = ""


def _write_json(path: Path, value: Any) -> None:
    write_bytes_atomically(path, (json.dumps(value, indent=1) + "\n").encode())


def _members(
    config: LearnConfig,
    base: TrainingConfig,
    iteration: int,
    train: list[str],
    validation: list[str],
    log: Callable,
) -> Path:
    """Train (or finish training) the ensemble of ``iteration`` from the base recipe;
    return its model."""
    from mlsurrogate.export import export_model
    from mlsurrogate.training import train as run_training

    directory = config.workdir / f"iteration_{iteration:02d}"
    model = directory / "model.pt"
    if model.exists():
        return model
    directory.mkdir(parents=True, exist_ok=True)
    checkpoints = []
    shared_targets: dict = {}  # the members' energy/force-term set-up, made once
    for member in range(config.members):
        checkpoint = directory / f"member_{member}.ckpt"
        done = checkpoint.with_suffix(".done")
        checkpoints.append(checkpoint)
        if done.exists() and checkpoint.exists():
            continue
        settings = dataclasses.replace(
            base,
            train=list(train),
            validation=list(validation),
            seed=base.seed + member,
            threads=config.threads or base.threads,
        )
        if not from_scratch(iteration, config.scratch_every):
            previous = config.workdir / f"iteration_{iteration - 1:02d}" / f"member_{member}.ckpt"
            if not previous.exists():
                raise ValueError(
                    f"iteration {iteration} member {member} fine-tunes {previous}, which is "
                    "gone: restore it (e.g. git checkout) or set [training] scratch_every so "
                    f"that iteration {iteration} trains from scratch"
                )
            settings = dataclasses.replace(
                settings,
                initial_checkpoint=str(previous),
                frozen_layers=config.frozen_layers,
                max_epochs=config.finetune_epochs,
                learning_rate=config.finetune_learning_rate,
                # the warm network's LDOS is physical: the energy/force terms from the start,
                # at the fine-tuning rate itself
                physics_start_epoch=0,
                physics_lr_factor=1.0,
            )
        start = "from scratch" if from_scratch(iteration, config.scratch_every) else "fine-tuned"
        log(f"iteration {iteration}: training member {member} ({start}) on {len(train)} snapshots")
        run_training(
            settings, checkpoint, resume=checkpoint.exists(), progress=False, log=log,
            physics_cache=shared_targets,
        )  # fmt: skip
        write_bytes_atomically(done, b"")
    export_model(checkpoints, model)
    return model


def checkpoints_removed(config: LearnConfig, iteration: int) -> bool:
    """Whether ``iteration`` is finished (held-out errors, and its selection unless it is
    the last) and its member checkpoints were removed to keep a committed run small: its
    results are read from disk and its members are not trained again."""
    directory = config.workdir / f"iteration_{iteration:02d}"
    results = [directory / "heldout.json"]
    if iteration < config.iterations:
        results.append(directory / "selection.json")
    return all(p.exists() for p in results) and not any(directory.glob("member_*.ckpt"))


def from_scratch(iteration: int, scratch_every: int) -> bool:
    """Whether the members of ``iteration`` train from scratch (iteration 0, and every
    ``scratch_every``-th) rather than fine-tune the previous iteration's. Fine-tuned
    members inherit one another's agreement; from-scratch ones are independent again
    (docs/active-learning.md: rho E 0.24 fine-tuned, 0.90 from scratch, on the same data)."""
    return iteration == 0 or (scratch_every > 0 and iteration % scratch_every == 0)


def _evaluate(
    config: LearnConfig, iteration: int, model_path: Path | None
) -> list[ReferenceError]:
    """The held-out errors of ``iteration``, evaluated once (``model_path`` None: they are
    on disk, see ``checkpoints_removed``)."""
    from mlsurrogate.evaluate import evaluate_references, load_references
    from mlsurrogate.model import Model

    path = config.workdir / f"iteration_{iteration:02d}" / "heldout.json"
    if not path.exists():
        errors = evaluate_references(
            Model.load(model_path), load_references(config.heldout), threads=config.threads
        )
        _write_json(path, [e.to_json() for e in errors])
    return [ReferenceError.from_json(record) for record in json.loads(path.read_text())]


def explore_method(settings: ExploreSettings, iteration: int) -> str:
    """How ``iteration`` explores: EMT during the bootstrap iterations, then ``method``."""
    return "emt" if iteration < settings.bootstrap_iterations else settings.method


def _explore(
    config: LearnConfig, iteration: int, model_path: Path, log: Callable[[str], None]
) -> list[ase.Atoms]:
    from mlsurrogate.candidates import (
        classical_md_frames,
        entropy_maximized_frames,
        model_md_frames,
    )

    path = config.workdir / f"iteration_{iteration:02d}" / "candidates.extxyz"
    if not path.exists():
        settings = config.explore
        method = explore_method(settings, iteration)
        frames: list[ase.Atoms] = []
        for index, structure in enumerate(settings.structures):
            start = ase.io.read(structure)
            seed = settings.seed + 1000 * iteration + index  # new frames every iteration
            if method == "entropy":
                found = entropy_maximized_frames(
                    start, settings.k_values, settings.steps, settings.every, seed=seed
                )
                frames.extend(frame for _, frame in found)
            elif method == "emt":
                found = classical_md_frames(
                    start, settings.temperatures_K, settings.scales, settings.steps,
                    settings.every, settings.timestep_fs, seed=seed,
                )  # fmt: skip
                frames.extend(frame for _, frame in found)
            else:
                runs = model_md_frames(
                    model_path, start, settings.temperatures_K, settings.scales, settings.steps,
                    settings.every, settings.timestep_fs, halt_deviation=config.trust[1],
                    spacing=settings.md_spacing, seed=seed, ranks=settings.ranks,
                    check_every=settings.check_every,
                )  # fmt: skip
                for run in runs:
                    ending = run.error or ("fix halt" if run.halted else "all steps")
                    log(f"  model MD {Path(structure).name} {run.name}: {len(run.frames)} "
                        f"frames, {run.steps_done} steps ({ending})")  # fmt: skip
                    frames.extend(run.frames)
        if not frames:
            raise ValueError(f"iteration {iteration}: exploration produced no frames")
        with atomic_output(path) as tmp:
            ase.io.write(tmp, frames, format="extxyz")
    return ase.io.read(path, index=":")


def _select(
    config: LearnConfig,
    iteration: int,
    model_path: Path | None,
    train: list[str],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The selection of ``iteration``, explored and scored once (``model_path`` None: it is
    on disk)."""
    from mlsurrogate.model import Model
    from mlsurrogate.selection import format_scores, pick, score_candidates

    directory = config.workdir / f"iteration_{iteration:02d}"
    path = directory / "selection.json"
    if not path.exists():
        frames = _explore(config, iteration, model_path, log)
        log(f"iteration {iteration}: scoring {len(frames)} explored frames")
        model = Model.load(model_path)
        spacing = config.selection_spacing or model.spec.grid_spacing_A
        candidates = [(f"frame_{index:03d}", atoms) for index, atoms in enumerate(frames)]
        scores = score_candidates(
            candidates, train, model.params, spacing, model, config.trust, threads=config.threads
        )
        picks = pick(scores, config.picks, fill_with_failed=True)
        table = format_scores(scores, picks)
        write_bytes_atomically(directory / "selection.md", (table + "\n").encode())
        levels = [score.level for score in scores]
        _write_json(
            path,
            {
                "frames": len(scores),
                "accurate": levels.count("accurate") / len(levels),
                "candidate": levels.count("candidate") / len(levels),
                "failed": levels.count("failed") / len(levels),
                "picks": [candidates[i][0] for i in picks],
                "pick_indices": list(picks),
            },
        )
    return json.loads(path.read_text())


def _label(
    config: LearnConfig,
    iteration: int,
    selection: dict[str, Any],
    params: Any,
    log: Callable[[str], None],
) -> None:
    """pw.x + pp.x and ingest for every pick whose snapshot is not there yet. A pick whose
    bands the LDOS window cannot hold (e.g. a compressed cell, whose band bottom lies
    lower) is skipped, with the reason in ``.skipped``: no model on that window can
    learn it."""
    from mlsurrogate.data import compact_snapshot
    from mlsurrogate.qe import EnergyWindowError, ingest, run_qe

    directory = config.workdir / f"iteration_{iteration:02d}"
    frames = ase.io.read(directory / "candidates.extxyz", index=":")
    snapshots = config.workdir / "snapshots"
    snapshots.mkdir(exist_ok=True)
    picks = selection["pick_indices"]
    # the last validation_picks picks validate, as long as one is left to train on
    first_validation = max(len(picks) - config.validation_picks, 1)
    for number, index in enumerate(picks):
        role = "validation" if number >= first_validation else "pick"
        target = snapshots / f"iteration_{iteration:02d}_{role}_{number}.h5"
        skipped = _skip_marker(config, iteration, number)
        if target.exists() or skipped.exists():
            continue
        rundir = directory / f"qe_pick_{number}"
        if rundir.exists():  # killed mid-run: QE runs do not resume
            shutil.rmtree(rundir)
        log(f"iteration {iteration}: labelling pick {number} ({selection['picks'][number]}, "
            f"{role}) with QE")  # fmt: skip
        try:
            run_qe(frames[index], config.qe, rundir, progress=False)
        except EnergyWindowError as exc:
            log(f"iteration {iteration}: pick {number} skipped: {exc}")
            write_bytes_atomically(skipped, f"{exc}\n".encode())
            continue
        full = rundir / "snapshot.h5" if config.ldos_points else target
        ingest(
            rundir, full, descriptor_params=params,
            ldos_mantissa_bits=config.ldos_mantissa_bits, progress=False,
        )  # fmt: skip
        if config.ldos_points:  # the full snapshot stays in the run directory
            compact_snapshot(full, target, config.ldos_points, seed=1000 * iteration + number)
        # the wavefunctions are hundreds of MB and not needed; the XML and the LDOS stay,
        # so that the run can be ingested again
        for wavefunctions in (rundir / "out").rglob("*wfc*"):
            wavefunctions.unlink()


def _skip_marker(config: LearnConfig, iteration: int, number: int) -> Path:
    return config.workdir / "snapshots" / f"iteration_{iteration:02d}_pick_{number}.skipped"


def labelled_snapshots(config: LearnConfig, before: int, role: str = "pick") -> list[str]:
    """Snapshots the run labelled in iterations before ``before``: ``pick`` (training) or
    ``validation``."""
    found = sorted((config.workdir / "snapshots").glob(f"iteration_*_{role}_*.h5"))
    return [str(p) for p in found if int(p.name.split("_")[1]) < before]


def run_learning(
    config: LearnConfig, log: Callable[[str], None] = print
) -> list[IterationRecord]:
    """Run (or resume) the loop; return one record per iteration and write the report."""
    config.workdir.mkdir(parents=True, exist_ok=True)
    base = TrainingConfig.from_toml(config.training_config)
    records: list[IterationRecord] = []
    for iteration in range(config.iterations + 1):
        train = [*config.train, *labelled_snapshots(config, iteration)]
        validation = [*config.validation, *labelled_snapshots(config, iteration, "validation")]
        model_path = (
            None
            if checkpoints_removed(config, iteration)
            else _members(config, base, iteration, train, validation, log)
        )
        heldout = _evaluate(config, iteration, model_path)
        energy_rho, force_rho = (
            rank_correlations(heldout) if len(heldout) >= 3 else (math.nan, math.nan)
        )
        record = IterationRecord(
            iteration=iteration,
            training_snapshots=len(train),
            validation_snapshots=len(validation),
            heldout_energy_mae=1000 * float(np.mean([abs(e.energy_error) for e in heldout])),
            heldout_force_rmse=math.sqrt(np.mean([e.force_rmse**2 for e in heldout])),
            heldout_energy_uncertainty=1000 * float(
                np.mean([e.energy_uncertainty for e in heldout])
            ),
            heldout_max_force_deviation=float(np.mean([e.max_force_deviation for e in heldout])),
            energy_rank_correlation=energy_rho,
            force_rank_correlation=force_rho,
            heldout_pressure_mae=pressure_mae(heldout),
        )
        records.append(record)
        if model_path is not None:
            write_bytes_atomically(config.workdir / "model.pt", model_path.read_bytes())
        if iteration == config.iterations:
            record.stop = "iteration budget spent"
        else:
            selection = _select(config, iteration, model_path, train, log)
            record.frames = selection["frames"]
            record.accurate = selection["accurate"]
            record.candidate = selection["candidate"]
            record.failed = selection["failed"]
            record.picks = selection["picks"]
            if 1.0 - record.accurate <= config.stop_fraction:
                record.stop = "converged: accurate frames reach 1 - stop_fraction"
            elif not record.picks:
                record.stop = "nothing left to label"
            else:
                # descriptors stored with the training recipe's own keywords, which
                # training compares against
                _label(config, iteration, selection, base.params(), log)
                record.skipped = [
                    name
                    for number, name in enumerate(record.picks)
                    if _skip_marker(config, iteration, number).exists()
                ]
                if record.skipped == record.picks:
                    record.stop = (
                        "every pick lies outside the LDOS energy window: widen it "
                        "(new data) or explore other structures"
                    )
        log(format_report(records).splitlines()[-1])
        write_report(config, records)
        if record.stop:
            log(f"stopped after iteration {iteration}: {record.stop}")
            break
    return records


def pressure_mae(heldout: Sequence[ReferenceError]) -> float:
    """Mean |P - P_QE| (GPa) over the references with QE's stress; NaN with none (held-out
    results evaluated before pressures were)."""
    errors = [abs(e.pressure_error) for e in heldout if e.pressure_error is not None]
    return float(np.mean(errors)) if errors else math.nan


def format_report(records: Sequence[IterationRecord]) -> str:
    """The report's table, one row per iteration."""

    def share(value: float) -> str:
        return "-" if math.isnan(value) else f"{100 * value:.0f}%"

    lines = [
        "| iteration | training / validation snapshots | held-out dA MAE (meV/atom) "
        "| F RMSE (eV/A) | P MAE (GPa) "
        "| mean dE unc. (meV/atom) | mean max dF (eV/A) | rho E | rho F | frames | accurate "
        "| candidate | failed | labelled | skipped | stop |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in records:
        pressure = "-" if math.isnan(r.heldout_pressure_mae) else f"{r.heldout_pressure_mae:.2f}"
        lines.append(
            f"| {r.iteration} | {r.training_snapshots} / {r.validation_snapshots} "
            f"| {r.heldout_energy_mae:.1f} "
            f"| {r.heldout_force_rmse:.3f} | {pressure} | {r.heldout_energy_uncertainty:.1f} "
            f"| {r.heldout_max_force_deviation:.3f} | {r.energy_rank_correlation:+.2f} "
            f"| {r.force_rank_correlation:+.2f} | {r.frames or '-'} | {share(r.accurate)} "
            f"| {share(r.candidate)} | {share(r.failed)} "
            f"| {', '.join(p for p in r.picks if p not in r.skipped) or '-'} "
            f"| {', '.join(r.skipped) or '-'} | {r.stop} |"
        )
    return "\n".join(lines)


def write_report(config: LearnConfig, records: Sequence[IterationRecord]) -> None:
    """report.md and the two plots: held-out error and uncertainty against iteration,
    and the trust-level fractions of the explored frames."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workdir = config.workdir
    text = "# Active learning report\n\n" + format_report(records) + "\n"
    write_bytes_atomically(workdir / "report.md", text.encode())
    iterations = [r.iteration for r in records]
    figure, (energy, force) = plt.subplots(1, 2, figsize=(10, 4))
    energy.plot(iterations, [r.heldout_energy_mae for r in records], "o-", label="|dA| MAE")
    energy.plot(iterations, [r.heldout_energy_uncertainty for r in records], "s--",
                label="mean uncertainty")  # fmt: skip
    energy.set_ylabel("meV/atom")
    force.plot(iterations, [r.heldout_force_rmse for r in records], "o-", label="F RMSE")
    force.plot(iterations, [r.heldout_max_force_deviation for r in records], "s--",
               label="mean max deviation")  # fmt: skip
    force.set_ylabel("eV/A")
    for axes, title in ((energy, "held-out free energy"), (force, "held-out forces")):
        axes.set_xlabel("iteration")
        axes.set_title(title)
        axes.legend()
    figure.tight_layout()
    with atomic_output(workdir / "learn_heldout.png") as tmp:
        figure.savefig(tmp, dpi=110, format="png")
    plt.close(figure)
    explored = [r for r in records if r.frames]
    figure, axes = plt.subplots(figsize=(5, 4))
    for name in ("accurate", "candidate", "failed"):
        axes.plot([r.iteration for r in explored], [100 * getattr(r, name) for r in explored],
                  "o-", label=name)  # fmt: skip
    axes.set_xlabel("iteration")
    axes.set_ylabel("explored frames (%)")
    axes.set_title("trust levels of the candidates")
    axes.legend()
    figure.tight_layout()
    with atomic_output(workdir / "learn_levels.png") as tmp:
        figure.savefig(tmp, dpi=110, format="png")
    plt.close(figure)
