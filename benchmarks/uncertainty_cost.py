"""What the ensemble deviations cost in LAMMPS MD (issue 17: a step that computes them may
cost at most members x the network and contraction part more; every 10 steps at most
30 % more run time).

    python benchmarks/uncertainty_cost.py ENSEMBLE.pt [--cells 2] [--grid 16] [--steps 20]
        [--ranks 2]

NVE MD of fcc Al (cells^3 cubic cells, 0.1 A displacements, Ewald E_ii) three times:
without the ``uncertainty`` keyword, with ``uncertainty 1`` (every step) and with
``uncertainty 10``. Prints seconds per step, the extra cost of each, and the bound for
the every-step case: members x (inference + functional + back-propagation + force
contraction) of the run without deviations, from the pair style's own stage timing.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from pathlib import Path

from mlsurrogate.lammps_pair import lmp_command, read_stage_timing
from mlsurrogate.model import Model

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
pair_style hybrid/overlay mlsurrogate {model} grid {grid} {grid} {grid} {options} coul/long 10.0
pair_coeff * * mlsurrogate Al
pair_coeff * * coul/long
kspace_style ewald 1e-8
velocity all create 933 4928459 mom yes rot yes dist gaussian
timestep 0.001
fix nve all nve
thermo {steps}
run {steps}
"""

# the stages each member repeats (descriptors and communication are shared)
MEMBER_STAGES = ("inference", "functional", "back-propagation", "force contraction")


def run(model: Path, cells: int, grid: int, steps: int, ranks: int, options: str) -> dict:
    with tempfile.TemporaryDirectory() as work:
        Path(work, "in.bench").write_text(
            SCRIPT.format(cells=cells, model=model, grid=grid, steps=steps, options=options)
        )
        command = lmp_command(["-in", "in.bench", "-log", "log.lammps", "-nocite"], ranks)
        subprocess.run(command, cwd=work, check=True, capture_output=True)
        log = Path(work, "log.lammps").read_text()
    loop = float(re.search(r"Loop time of ([0-9.eE+-]+)", log).group(1))
    seconds = {stage: value for stage, (value, _) in read_stage_timing(log).items()}
    return {"step_s": loop / steps, "stages": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--cells", type=int, default=2)
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    model = Path(args.model).resolve()
    members = Model.load(model).ensemble_size
    if members < 2:
        raise SystemExit(f"{model}: not an ensemble")
    plain = run(model, args.cells, args.grid, args.steps, args.ranks, "")
    # the stage times cover setup and every step: per step, over steps + 1 evaluations
    per_member = sum(plain["stages"].get(s, 0.0) for s in MEMBER_STAGES) / (args.steps + 1)
    bound = members * per_member
    print(f"{4 * args.cells**3} atoms, {args.grid}^3 grid, {args.steps} steps, {args.ranks} "
          f"ranks, {members} members")  # fmt: skip
    print("| run | s / step | extra vs none |")
    print("|---|---:|---:|")
    print(f"| no deviations | {plain['step_s']:.3f} | |")
    for every in (1, 10):
        timed = run(model, args.cells, args.grid, args.steps, args.ranks,
                    f"uncertainty {every} file /dev/null")  # fmt: skip
        extra = timed["step_s"] - plain["step_s"]
        print(f"| uncertainty {every} | {timed['step_s']:.3f} | {extra:+.3f} s "
              f"({100 * extra / plain['step_s']:+.0f} %) |", flush=True)
        if every == 1:
            verdict = "within" if extra <= bound else "ABOVE"
            print(
                "bound for every step: members x (network + functional + back-propagation + "
                f"contraction) = {bound:.3f} s; measured extra {extra:.3f} s: {verdict}"
            )


if __name__ == "__main__":
    main()
