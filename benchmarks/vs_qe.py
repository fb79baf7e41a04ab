"""Single-point time of pair_style mlsurrogate against Quantum ESPRESSO pw.x, same cell.

    python benchmarks/vs_qe.py [MODEL.pt] [--cells 1 2 3] [--ranks 2] [--pw-out FILE ...]
        [--pw-bands ldos|energy] [--spacing A]

fcc Al (a = 4.05 A), cells^3 cubic cells (4, 32, 108 atoms) with 0.1 A random
displacements. Ours: one energy + forces (``run 0``) in the ``lmp`` executable on
``--ranks`` MPI ranks at the model's training grid spacing (that of QE's FFT grid in the
training cells; pw.x may round its own FFT size up to one with small prime factors) or at
``--spacing`` (A; the coarsest spacing that keeps the result on the training grid's, from
``benchmarks/grid_convergence.py``), Ewald E_ii; the wall time of the whole process
(start-up and model loading included). QE: pw.x SCF with the project's reference settings
(Al.pz-vbc, 20 Ry, 933 K Fermi-Dirac, k-spacing 0.2 1/A) on the same ranks (k-point
pools), its own WALL time. ``--pw-out`` takes the time from existing pw.x outputs
(matched by atom count) instead of running pw.x, e.g. those of ``make data`` / ``make
data32``; several outputs with the same atom count are the pieces of one run continued
with ``restart_mode = 'restart'`` (after ``max_seconds``) and their times add up (printed
as a lower bound, ">", until one piece reports a converged SCF): a 108-atom SCF takes
about 50 minutes on 2 cores. ``--pw-time cpu`` takes pw.x's CPU time instead (rank 0;
equal to its wall time on an otherwise idle machine, and not inflated when pieces ran
niced beside other work). ``--ours-only`` skips pw.x.

Bands (``--pw-bands``, for pw.x runs made here): ``ldos`` (default) is the training-data
setting, twice the occupied bands plus 4, so that the LDOS window (up to 11 eV, E_F + 3 eV)
is covered, which is what the model predicts; ``energy`` is QE's own default for a metal
(setup.f90: 20 % more than the occupied bands, at least 4 more), enough for the energy
and forces alone: the fair comparison for MD. The table shows the bands of each run.
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import tempfile
import time
from pathlib import Path

from ase.build import bulk

from mlsurrogate.descriptors import grid_for_spacing
from mlsurrogate.lammps_pair import lmp_command
from mlsurrogate.model import load_metadata
from mlsurrogate.qe import QESettings, mpi_commands, read_pw_clock, run_pw, valence_electrons

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
units metal
atom_style charge
read_data structure.data
mass 1 26.9815385
set type 1 charge 3.0
pair_style hybrid/overlay mlsurrogate {model} grid {grid} {grid} {grid} coul/long 10.0
pair_coeff * * mlsurrogate Al
pair_coeff * * coul/long
kspace_style ewald 1e-8
thermo_style custom step pe
run 0
"""


def structure(cells: int):
    atoms = bulk("Al", "fcc", a=4.05, cubic=True).repeat(cells)
    atoms.rattle(0.1, seed=cells)
    atoms.wrap()
    return atoms


def pw_atoms(text: str) -> int:
    return int(re.search(r"number of atoms/cell\s*=\s*(\d+)", text).group(1))


def pw_bands(text: str) -> int:
    return int(re.search(r"number of Kohn-Sham states\s*=\s*(\d+)", text).group(1))


def energy_bands(atoms) -> int:
    """QE's default band count for a metal: 20 % above the occupied bands (2 electrons
    each), at least 4 more."""
    occupied = valence_electrons(atoms, QESettings()) / 2
    return max(math.floor(1.2 * occupied + 0.5), math.floor(occupied + 0.5) + 4)  # NINT


def time_ours(model: Path, atoms, grid: int, ranks: int) -> float:
    import ase.io

    with tempfile.TemporaryDirectory() as work:
        ase.io.write(Path(work, "structure.data"), atoms, format="lammps-data", atom_style="charge")
        Path(work, "in.point").write_text(SCRIPT.format(model=model, grid=grid))
        command = lmp_command(["-in", "in.point", "-log", "none", "-nocite"], ranks)
        start = time.perf_counter()
        subprocess.run(command, cwd=work, check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - start


def time_qe(atoms, ranks: int, nbnd: int | None) -> tuple[float, int]:
    """pw.x SCF wall time (s) and its band count; ``nbnd`` None: the LDOS setting."""
    with tempfile.TemporaryDirectory() as work:
        run_pw(atoms, QESettings(nbnd=nbnd, **mpi_commands(ranks)), work, progress=False)
        out = Path(work, "pw.out")
        return read_pw_clock(out)["wall"], pw_bands(out.read_text(errors="replace"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=str(ROOT / "models" / "al_933K.pt"))
    parser.add_argument("--cells", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--pw-out", nargs="*", default=[], help="pw.x outputs to take times from")
    parser.add_argument("--pw-time", choices=["wall", "cpu"], default="wall")
    parser.add_argument(
        "--pw-bands",
        choices=["ldos", "energy"],
        default="ldos",
        help="bands of the pw.x runs made here: the LDOS window's or QE's default",
    )
    parser.add_argument(
        "--spacing", type=float, default=None, help="grid spacing (A); default: the model's"
    )
    parser.add_argument(
        "--ours-only", action="store_true", help="time mlsurrogate only (no pw.x run)"
    )
    args = parser.parse_args()
    model = Path(args.model).resolve()
    spacing = args.spacing or load_metadata(model)["grid_spacing_A"]
    known: dict[int, tuple[float, str, int]] = {}  # atoms -> (seconds, source, bands)
    converged: set[int] = set()
    for path in args.pw_out:
        text = Path(path).read_text(errors="replace")
        natoms = pw_atoms(text)
        if "convergence has been achieved" in text:
            converged.add(natoms)
        total, names, _ = known.get(natoms, (0.0, "", 0))
        name = Path(path).name
        known[natoms] = (
            total + read_pw_clock(path)[args.pw_time],
            f"{names} + {name}" if names else name,
            pw_bands(text),
        )
    print("| atoms | grid | mlsurrogate s | pw.x bands | pw.x s | pw.x / mlsurrogate |")
    print("|---:|---:|---:|---:|---:|---:|")
    for cells in args.cells:
        atoms = structure(cells)
        grid = grid_for_spacing(atoms.cell, spacing)[0]  # cubic cells
        ours = time_ours(model, atoms, grid, args.ranks)
        qe, source, bands = known.get(len(atoms), (None, None, None))
        if qe is None and args.ours_only:
            print(f"| {len(atoms)} | {grid}^3 | {ours:.1f} | - | - | - |", flush=True)
            continue
        bound = ""
        if qe is None:
            nbnd = energy_bands(atoms) if args.pw_bands == "energy" else None
            (qe, bands), source = time_qe(atoms, args.ranks, nbnd), "run now"
        elif len(atoms) not in converged:  # pieces so far of an unfinished SCF
            bound, source = ">", f"{source}, SCF not converged yet"
        print(
            f"| {len(atoms)} | {grid}^3 | {ours:.1f} | {bands} | {bound}{qe:.0f} ({source}) "
            f"| {bound}{qe / ours:.0f}x |",
            flush=True,
        )
    print(f"{args.ranks} MPI ranks for both; pw.x times include its start-up, ours too")


if __name__ == "__main__":
    main()
