"""Energy conservation of NVE MD with pair_style mlsurrogate (+ LAMMPS Ewald E_ii).

    python benchmarks/nve_drift.py [MODEL.pt] [--cells 2] [--steps 1000] [--grid N]
        [--temperature 933] [--timestep 1.0] [--ranks 1]

fcc Al, a = 4.05 A, cells^3 cubic cells (2: 32 atoms) displaced by 0.01 A (off the grid
points), velocities at the temperature (seed 4928459), velocity Verlet, the bundled model
by default, 8 grid points per cubic cell edge (0.51 A). Prints thermo and the drift of
the total energy in meV/atom: largest deviation from the start and the slope of a linear
fit (per ps).
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from mlsurrogate.lammps_pair import lmp_command, read_thermo

SCRIPT = """
units metal
atom_style charge
lattice fcc 4.05
region box block 0 {cells} 0 {cells} 0 {cells}
create_box 1 box
create_atoms 1 box
displace_atoms all random 0.01 0.01 0.01 7539   # off the grid points (see README)
mass 1 26.9815
set type 1 charge 3.0
pair_style hybrid/overlay mlsurrogate {model} grid {grid} {grid} {grid} coul/long 10.0
pair_coeff * * mlsurrogate Al
pair_coeff * * coul/long
pair_modify table 0
kspace_style ewald 1e-10
velocity all create {temperature} 4928459 mom yes rot yes dist gaussian
timestep {timestep_ps}
fix nve all nve
compute el all pair mlsurrogate
thermo_style custom step time temp pe etotal c_el[3]
thermo_modify format float %.10g
thermo {every}
run {steps}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bundled = Path(__file__).resolve().parents[1] / "models" / "al_933K.pt"
    parser.add_argument("model", nargs="?", default=str(bundled))
    parser.add_argument("--cells", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--grid", type=int, default=None, help="default: 8 points per cell")
    parser.add_argument("--temperature", type=float, default=933.0)
    parser.add_argument("--timestep", type=float, default=1.0, help="fs")
    parser.add_argument("--ranks", type=int, default=1)
    args = parser.parse_args()
    grid = args.grid or 8 * args.cells
    text = SCRIPT.format(
        cells=args.cells,
        model=Path(args.model).resolve(),
        grid=grid,
        temperature=args.temperature,
        timestep_ps=args.timestep / 1000.0,
        every=max(1, args.steps // 50),
        steps=args.steps,
    )
    with tempfile.TemporaryDirectory() as work:
        (Path(work) / "in.nve").write_text(text)
        command = lmp_command(["-in", "in.nve", "-log", "log.lammps", "-nocite"], args.ranks)
        subprocess.run(command, cwd=work, check=True, stdout=subprocess.DEVNULL)
        log = (Path(work) / "log.lammps").read_text()
    natoms = 4 * args.cells**3
    data = read_thermo(log)
    time_ps, total = data[:, 1], data[:, 4]
    deviation = 1000.0 * (total - total[0]) / natoms
    slope = 1000.0 * np.polyfit(time_ps, total, 1)[0] / natoms
    print(log[log.index("pair_style mlsurrogate timing") :].split("\n\n")[0])
    print(
        f"{natoms} atoms, grid {grid}^3, {args.steps} steps of {args.timestep} fs: "
        f"max |E_tot(t) - E_tot(0)| = {np.abs(deviation).max():.4f} meV/atom, "
        f"drift {slope:+.4f} meV/atom/ps, final T = {data[-1, 2]:.1f} K"
    )


if __name__ == "__main__":
    main()
