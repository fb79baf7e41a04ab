"""MD step time and peak memory of pair_style mlsurrogate against the number of atoms.

    python benchmarks/md_scaling.py [MODEL.pt] [--cells 2 3 4 5 6 8] [--points-per-cell 8]
        [--steps 2] [--ranks 2]

fcc Al (a = 4.05 A) with cells^3 cubic cells (32 to 2048 atoms), small random
displacements, ``pair_style hybrid/overlay mlsurrogate ... coul/long`` + PPPM, NVE, a
grid of ``points-per-cell`` points per cubic cell edge (8: 0.51 A, the MD setting of the
grid study) on ``--ranks`` MPI ranks. Prints, per size: grid points, seconds per MD
step (LAMMPS loop time / steps), microseconds per grid point and per atom, peak
resident memory of the largest rank, and the time split of the pair style by stage.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from mlsurrogate.lammps_pair import lmp_command, read_stage_timing

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
units metal
atom_style charge
lattice fcc 4.05
region box block 0 {cells} 0 {cells} 0 {cells}
create_box 1 box
create_atoms 1 box
displace_atoms all random 0.1 0.1 0.1 2287
mass 1 26.9815385
set type 1 charge 3.0
pair_style hybrid/overlay mlsurrogate {model} grid {grid} {grid} {grid} coul/long 10.0
pair_coeff * * mlsurrogate Al
pair_coeff * * coul/long
kspace_style pppm 1e-6
velocity all create 933 4928459 mom yes rot yes dist gaussian
timestep 0.001
fix nve all nve
thermo 1
run {steps}
"""

PEAK_MEMORY = (
    "import resource, subprocess, sys; "
    "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)

STAGES = (
    "descriptors", "inference", "functional", "back-propagation", "force contraction",
    "communication",
)  # fmt: skip


def run_size(model: Path, cells: int, points: int, steps: int, ranks: int) -> dict:
    grid = points * cells
    with tempfile.TemporaryDirectory() as work:
        Path(work, "in.bench").write_text(
            SCRIPT.format(cells=cells, model=model, grid=grid, steps=steps)
        )
        command = lmp_command(["-in", "in.bench", "-log", "log.lammps", "-nocite"], ranks)
        # a fresh Python process per size: its RUSAGE_CHILDREN peak is this run's alone
        # (largest process: the biggest rank)
        measured = subprocess.run(
            [sys.executable, "-c", PEAK_MEMORY, *command], cwd=work, check=True,
            capture_output=True, text=True,
        )  # fmt: skip
        peak_kib = int(measured.stdout.split()[-1])
        log = Path(work, "log.lammps").read_text()
    loop = float(re.search(r"Loop time of ([0-9.eE+-]+)", log).group(1))
    split = {stage: percent for stage, (_, percent) in read_stage_timing(log).items()}
    return {
        "atoms": 4 * cells**3,
        "grid": grid,
        "step_s": loop / steps,
        "peak_mib": peak_kib / 1024.0,
        "split": split,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=str(ROOT / "models" / "al_933K.pt"))
    parser.add_argument("--cells", type=int, nargs="+", default=[2, 3, 4, 5, 6, 8])
    parser.add_argument("--points-per-cell", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    model = Path(args.model).resolve()
    print(
        f"| atoms | grid | s / step | µs / grid point | ms / atom | peak MiB (largest rank) | "
        f"{' | '.join(STAGES)} |"
    )
    print("|---:|---:|---:|---:|---:|---:|" + "---:|" * len(STAGES))
    for cells in args.cells:
        r = run_size(model, cells, args.points_per_cell, args.steps, args.ranks)
        points = r["grid"] ** 3
        stages = " | ".join(f"{r['split'].get(s, float('nan')):.0f}%" for s in STAGES)
        print(
            f"| {r['atoms']} | {r['grid']}^3 | {r['step_s']:.2f} | "
            f"{1e6 * r['step_s'] * args.ranks / points:.0f} | "
            f"{1e3 * r['step_s'] / r['atoms']:.1f} | {r['peak_mib']:.0f} | {stages} |",
            flush=True,
        )
    print(f"{args.ranks} MPI ranks, 1 thread each; µs / grid point is per rank (x ranks)")


if __name__ == "__main__":
    main()
