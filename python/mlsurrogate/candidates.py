"""Candidate structures for the next DFT snapshots.

* The model's own MD (issue 17, 3a): LAMMPS Langevin dynamics with ``pair_style
  mlsurrogate`` and its ensemble deviations, stopped by ``fix halt`` once the max force
  deviation passes a threshold, so a run that leaves the model's domain hands its frames
  up to that point (the last one beyond the threshold) to selection.
* Bootstrap MD with a cheap classical potential (3b): Langevin dynamics with ASE's EMT
  (Jacobsen, Stoltze & Norskov, Surf. Sci. 366, 394 (1996); it knows Al, Cu, Ag, Au, Ni,
  Pd and Pt) or any ASE calculator.
* Entropy-maximized structures (3c): positions that spread (or gather) the atoms'
  descriptors, needing no potential at all (Montes de Oca Zapiain et al. 2022).

The MD generators run each structure at several temperatures and lattice scalings and
take a frame at a fixed interval. The frames are candidates for
:mod:`mlsurrogate.selection`, which picks the ones to label.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import ase
import numpy as np

if TYPE_CHECKING:
    from mlsurrogate.descriptors import BispectrumParams


def classical_md_frames(
    atoms: ase.Atoms,
    temperatures_K: Sequence[float],
    lattice_scales: Sequence[float] = (1.0,),
    steps: int = 1000,
    every: int = 100,
    timestep_fs: float = 2.0,
    friction_per_fs: float = 0.01,
    seed: int = 0,
    calculator: object | None = None,
) -> list[tuple[str, ase.Atoms]]:
    """(name, frame) pairs: for each lattice scaling (cell and positions scaled) and each
    temperature, ``steps`` Langevin steps from velocities at that temperature; a frame
    every ``every`` steps, the first after ``every`` steps. ``calculator`` defaults to
    EMT. Seeded: the same arguments give the same frames."""
    from ase.calculators.emt import EMT
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import thermalize_momenta
    from ase.units import fs

    _check_schedule(temperatures_K, lattice_scales, steps, every)
    rng = np.random.default_rng(seed)
    frames: list[tuple[str, ase.Atoms]] = []
    for scale in lattice_scales:
        for temperature in temperatures_K:
            moving = _scaled(atoms, scale)
            moving.calc = calculator if calculator is not None else EMT()
            moving.set_constraint(FixCom())  # no drift of the whole cell
            thermalize_momenta(moving, temperature_K=temperature, rng=rng)
            dynamics = Langevin(
                moving,
                timestep=timestep_fs * fs,
                temperature_K=temperature,
                friction=friction_per_fs / fs,
                fixcm=False,
                rng=rng,
            )
            for step in range(every, steps + 1, every):
                dynamics.run(every)
                frame = moving.copy()
                frame.calc = None
                frame.set_constraint()
                frames.append((f"{temperature:g}K_scale{scale:g}_step{step}", frame))
    return frames


def _check_schedule(
    temperatures_K: Sequence[float], lattice_scales: Sequence[float], steps: int, every: int
) -> None:
    if not temperatures_K or any(not t > 0 for t in temperatures_K):
        raise ValueError(f"temperatures must be > 0 K, got {list(temperatures_K)}")
    if not lattice_scales or any(not s > 0 for s in lattice_scales):
        raise ValueError(f"lattice scales must be > 0, got {list(lattice_scales)}")
    _check_frame_interval(steps, every)


def _check_frame_interval(steps: int, every: int) -> None:
    if steps < 1 or not 1 <= every <= steps:
        raise ValueError(f"need steps >= 1 and 1 <= every <= steps, got {steps}, {every}")


def _scaled(atoms: ase.Atoms, scale: float) -> ase.Atoms:
    moving = atoms.copy()
    moving.set_cell(np.asarray(atoms.cell) * scale, scale_atoms=True)
    return moving


# LAMMPS errors of a model MD run far outside the model's domain (not a broken setup)
LEFT_DOMAIN_ERRORS = ("Lost atoms", "outside its training data")


@dataclass(frozen=True)
class ModelRun:
    """One model-MD run: its frames, how far it got and whether ``fix halt`` stopped it."""

    name: str
    frames: list[ase.Atoms]
    steps_done: int
    halted: bool
    max_deviations: np.ndarray  # max force deviation (eV/A) at each frame
    error: str = ""  # the LAMMPS error that ended a run far outside the model's domain


def model_md_frames(
    model_path: str | os.PathLike[str],
    atoms: ase.Atoms,
    temperatures_K: Sequence[float],
    lattice_scales: Sequence[float] = (1.0,),
    steps: int = 1000,
    every: int = 50,
    timestep_fs: float = 1.0,
    halt_deviation: float = 0.15,
    spacing: float = 0.5,
    damping_fs: float = 100.0,
    seed: int = 1,
    ranks: int = 1,
    check_every: int | None = None,
) -> list[ModelRun]:
    """Langevin MD in LAMMPS with the ensemble ``model_path`` (E_ii by Ewald) for each
    lattice scaling and temperature: ``steps`` steps from velocities at that temperature,
    a frame every ``every`` steps, the deviations every ``check_every`` steps (default
    ``every``; a divisor of it) and ``fix halt`` ending the run at the first check whose
    max force deviation exceeds ``halt_deviation`` (eV/A); the configuration it stopped
    at is the last frame. A model far off moves atoms far between checks: check often.
    ``spacing`` (A) is the MD grid's; ``ranks`` MPI ranks. Frames from step ``every``
    on (or the halt, if earlier)."""
    import ase.io

    from mlsurrogate.lammps_pair import lmp_command
    from mlsurrogate.model import Model

    _check_schedule(temperatures_K, lattice_scales, steps, every)
    check_every = every if check_every is None else check_every
    if check_every < 1 or every % check_every:
        raise ValueError(f"check_every must divide every ({every}), got {check_every}")
    if not halt_deviation > 0:
        raise ValueError(f"halt_deviation must be > 0 eV/A, got {halt_deviation}")
    if seed < 1:
        raise ValueError(f"seed must be a positive integer (LAMMPS seeds), got {seed}")
    model = Model.load(model_path)
    spec = model.spec
    if model.ensemble_size < 2:
        raise ValueError(f"{model_path}: model MD with fix halt needs an ensemble model")
    unknown = sorted(set(atoms.get_chemical_symbols()) - set(spec.elements))
    if unknown:
        raise ValueError(
            f"the structure has {', '.join(unknown)}, which {model_path} was not trained on "
            f"(it knows {', '.join(spec.elements)})"
        )
    charges = dict(zip(spec.elements, spec.valence_charges))
    runs = []
    for scale in lattice_scales:
        for temperature in temperatures_K:
            name = f"{temperature:g}K_scale{scale:g}"
            with tempfile.TemporaryDirectory(prefix="mlsurrogate_md_") as workdir:
                work = Path(workdir)
                moving = _scaled(atoms, scale)
                moving.set_initial_charges([charges[s] for s in moving.get_chemical_symbols()])
                ase.io.write(
                    work / "start.data", moving, format="lammps-data", atom_style="charge",
                    specorder=list(spec.elements), masses=True,
                )  # fmt: skip
                script = _model_md_input(
                    str(Path(model_path).resolve()), spec.elements, temperature, steps, every,
                    check_every, timestep_fs, halt_deviation, spacing, damping_fs, seed,
                )  # fmt: skip
                (work / "in.explore").write_text(script)
                proc = subprocess.run(
                    lmp_command(["-in", "in.explore", "-nocite", "-screen", "none"], ranks),
                    cwd=work, capture_output=True, text=True,
                )  # fmt: skip
                log_path = work / "log.lammps"
                log = log_path.read_text() if log_path.exists() else ""
                errors = [line for line in log.splitlines() if "ERROR" in line]
                # atoms flung out of the box, or an LDOS without a Fermi level: the model
                # is far outside its domain, and the frames before are still candidates
                lost = (
                    proc.returncode != 0
                    and bool(errors)
                    and any(sign in errors[-1] for sign in LEFT_DOMAIN_ERRORS)
                )
                if proc.returncode != 0 and not lost:
                    raise ValueError(  # the input or the model, not this code
                        f"model MD {name} with {model_path} failed: "
                        f"{errors[-1] if errors else (proc.stderr or proc.stdout)[-500:]}"
                    )
                deviations = np.loadtxt(work / "model_devi.out", ndmin=2)
                dumped = ase.io.read(work / "frames.dump", index=":", format="lammps-dump-text")
                # step 0 is the start structure; the halt's configuration ends the frames
                frames = dumped[1:]
                steps_done = int(deviations[-1, 0])
                frame_steps = [every * (k + 1) for k in range(len(frames))]
                if not lost and steps_done % every:
                    frames.append(ase.io.read(work / "final.dump", format="lammps-dump-text"))
                    frame_steps.append(steps_done)
            symbols = list(spec.elements)
            for frame in frames:
                frame.set_chemical_symbols([symbols[t - 1] for t in frame.get_atomic_numbers()])
                frame.calc = None
            checked = {int(step): value for step, value in deviations[:, :2]}
            runs.append(
                ModelRun(
                    name=name,
                    frames=frames,
                    steps_done=steps_done,
                    halted=lost or bool(deviations[-1, 1] > halt_deviation),
                    max_deviations=np.array([checked[step] for step in frame_steps]),
                    error=errors[-1].strip() if lost else "",
                )
            )
    return runs


def _model_md_input(
    model: str,
    elements: Sequence[str],
    temperature: float,
    steps: int,
    every: int,
    check_every: int,
    timestep_fs: float,
    halt_deviation: float,
    spacing: float,
    damping_fs: float,
    seed: int,
) -> str:
    """The LAMMPS input of one :func:`model_md_frames` run (ids sorted in the dump)."""
    temperature = float(temperature)  # repr of a numpy float is not a LAMMPS number
    names = " ".join(elements)
    return "\n".join(
        [
            "units metal",
            "atom_style charge",
            "atom_modify map array",
            "read_data start.data",
            f"pair_style hybrid/overlay mlsurrogate {model} spacing {float(spacing)!r} "
            f"uncertainty {check_every} file model_devi.out coul/long 10.0",
            f"pair_coeff * * mlsurrogate {names}",
            "pair_coeff * * coul/long",
            "kspace_style ewald 1e-8",
            f"timestep {float(timestep_fs) / 1000.0!r}",
            f"velocity all create {temperature!r} {seed} mom yes rot yes dist gaussian",
            f"fix thermostat all langevin {temperature!r} {temperature!r} "
            f"{float(damping_fs) / 1000.0!r} {seed} zero yes",
            "fix integrate all nve",
            "compute extras all pair mlsurrogate",
            "variable max_devi_f equal c_extras[8]",
            f"fix halt all halt {check_every} v_max_devi_f > {float(halt_deviation)!r} error soft",
            "thermo_style custom step temp pe c_extras[8] c_extras[9]",
            f"thermo {every}",
            f"dump frames all custom {every} frames.dump id type x y z",
            "dump_modify frames sort id",
            f"run {steps}",
            "write_dump all custom final.dump id type x y z modify sort id",
            "",
        ]
    )


def kozachenko_leonenko_entropy(points: np.ndarray) -> float:
    """Differential entropy (nats) of the distribution of ``points`` (n, d) by the
    Kozachenko-Leonenko nearest-neighbour estimate: d <log r_i> + log V_d + log(n - 1) +
    Euler's gamma, r_i the distance from point i to its nearest other point, V_d the
    volume of the d-dimensional unit ball (Kozachenko & Leonenko, Probl. Inf. Transm. 23,
    95 (1987))."""
    from scipy.spatial import cKDTree
    from scipy.special import gammaln

    points = np.asarray(points, dtype=np.float64)
    n, d = points.shape
    if n < 2:
        raise ValueError("the entropy estimate needs at least two points")
    distance, _ = cKDTree(points).query(points, k=2)
    nearest = np.maximum(distance[:, 1], 1e-300)  # coincident points: a very low entropy
    log_unit_ball = 0.5 * d * np.log(np.pi) - gammaln(0.5 * d + 1.0)
    return float(d * np.mean(np.log(nearest)) + log_unit_ball + np.log(n - 1) + np.euler_gamma)


REPULSION_STRENGTH = 1000.0  # a 0.05 A overlap at r_min 2.2 A costs 0.5 nats of entropy


def repulsion(atoms: ase.Atoms, positions: np.ndarray, r_min: float) -> float:
    """REPULSION_STRENGTH x sum over pairs closer than ``r_min`` (A) of (r_min - r)^2 /
    r_min^2 (minimum image): a smooth core that keeps the entropy maximization from
    collapsing atoms, in the entropy's units (K = 1)."""
    from ase.geometry import get_distances

    _, distances = get_distances(positions, cell=atoms.cell, pbc=atoms.pbc)
    pairs = distances[np.triu_indices(len(positions), k=1)]
    overlap = np.clip(r_min - pairs, 0.0, None)
    return float(REPULSION_STRENGTH * np.sum(overlap**2) / r_min**2)


def entropy_maximized_frames(
    atoms: ase.Atoms,
    k_values: Sequence[float] = (1.0, -1.0),
    steps: int = 2000,
    every: int = 200,
    step_size: float = 0.1,
    r_min: float = 2.2,
    params: BispectrumParams | None = None,
    seed: int = 0,
) -> list[tuple[str, ase.Atoms]]:
    """Structures of high (K > 0) or low (K < 0) descriptor entropy in the fixed cell of
    ``atoms`` (Montes de Oca Zapiain et al., npj Comput. Mater. 8, 189 (2022)): from the
    given positions, minimize V_rep - K S, S the Kozachenko-Leonenko entropy of the atoms'
    bispectrum components (LAMMPS ``compute sna/atom``, default twojmax 2: the low-order
    descriptors the paper uses) and V_rep :func:`repulsion` below ``r_min``, by ``steps``
    single-atom Gaussian moves of ``step_size`` (A) accepted when they lower it (a greedy
    Monte Carlo descent; seeded). A frame every ``every`` moves, named by K and move."""
    from mlsurrogate.descriptors import BispectrumParams
    from mlsurrogate.lammps_reference import LammpsAtomDescriptors

    if not k_values or any(k == 0 for k in k_values):
        raise ValueError(f"K values must be nonzero (+K spreads, -K gathers), got {k_values}")
    _check_frame_interval(steps, every)
    if not step_size > 0 or not r_min > 0:
        raise ValueError(f"step_size and r_min must be > 0 A, got {step_size}, {r_min}")
    if len(atoms) < 3:
        raise ValueError(f"entropy maximization needs at least 3 atoms, got {len(atoms)}")
    params = params or BispectrumParams(twojmax=2)
    frames: list[tuple[str, ase.Atoms]] = []
    with LammpsAtomDescriptors(atoms, params) as descriptors:
        for k in k_values:
            rng = np.random.default_rng(seed)
            positions = atoms.positions.copy()

            def objective(trial: np.ndarray) -> float:
                entropy = kozachenko_leonenko_entropy(descriptors(trial))
                return repulsion(atoms, trial, r_min) - k * entropy

            current = objective(positions)
            for move in range(1, steps + 1):
                trial = positions.copy()
                trial[rng.integers(len(atoms))] += rng.normal(0.0, step_size, 3)
                value = objective(trial)
                if value < current:
                    positions, current = trial, value
                if move % every == 0:
                    frame = atoms.copy()
                    frame.positions = positions
                    frame.calc = None
                    frame.wrap()
                    frames.append((f"entropy_K{k:+g}_move{move}", frame))
    return frames
