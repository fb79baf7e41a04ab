"""Candidate structures for the next DFT snapshots, beyond the model's own MD.

Bootstrap MD with a cheap classical potential (issue 17, 3b): Langevin dynamics of a
structure at several temperatures and lattice scalings with ASE's EMT (Jacobsen, Stoltze
& Norskov, Surf. Sci. 366, 394 (1996); it knows Al, Cu, Ag, Au, Ni, Pd and Pt) or any ASE
calculator, frames taken at a fixed interval after equilibration. The frames are
candidates for :mod:`mlsurrogate.selection`, which picks the ones to label.
"""

from __future__ import annotations

from collections.abc import Sequence

import ase
import numpy as np


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

    if not temperatures_K or any(not t > 0 for t in temperatures_K):
        raise ValueError(f"temperatures must be > 0 K, got {list(temperatures_K)}")
    if not lattice_scales or any(not s > 0 for s in lattice_scales):
        raise ValueError(f"lattice scales must be > 0, got {list(lattice_scales)}")
    if steps < 1 or not 1 <= every <= steps:
        raise ValueError(f"need steps >= 1 and 1 <= every <= steps, got {steps}, {every}")
    rng = np.random.default_rng(seed)
    frames: list[tuple[str, ase.Atoms]] = []
    for scale in lattice_scales:
        for temperature in temperatures_K:
            moving = atoms.copy()
            moving.set_cell(np.asarray(atoms.cell) * scale, scale_atoms=True)
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
