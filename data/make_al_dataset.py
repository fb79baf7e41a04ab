"""Generate the aluminium dataset with Quantum ESPRESSO (``make data``).

fcc Al, a = 4.05 A (``--lattice``: other densities, e.g. for the stress term),
``--supercell`` 1 (4 atoms, the bundled set) or 2 (32 atoms, a recipe users can run),
with the project's reference settings: Al.pz-vbc.UPF, ecutwfc 20 Ry, Fermi-Dirac
smearing at 933 K, k-spacing 0.2 1/A (8x8x8 for 4 atoms, 4x4x4 for 32).

Snapshot i gets Gaussian displacements of the size thermal motion has at a temperature
T_i spread evenly over 300..1000 K or given with ``--temperatures`` (the random draws do
not depend on T_i): <u_x^2> = B / (8 pi^2) x T / 295 K, with Al's room-temperature
Debye-Waller factor B = 0.80 A^2 (harmonic scaling; about 0.10 A per component at 300 K,
0.18 A at 1000 K). The electronic temperature is 933 K throughout.

The LDOS of the bundled files is rounded to 7 mantissa bits (relative error <= 0.2 %)
so that ten snapshots fit in the repository; the script prints what that rounding does
to the integrated quantities. Descriptors are not stored (``mlsurrogate data
descriptors`` adds them in a second).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
from pathlib import Path

import numpy as np
from ase.build import bulk

from mlsurrogate.data import Snapshot
from mlsurrogate.qe import QESettings, ingest, mpi_commands, run_qe

B_295K = 0.80  # A^2, Debye-Waller factor of Al near room temperature


def displaced_cell(
    supercell: int, temperature: float, rng: np.random.Generator, lattice: float = 4.05
):
    atoms = bulk("Al", "fcc", a=lattice, cubic=True).repeat(supercell)
    sigma = math.sqrt(B_295K / (8 * math.pi**2) * temperature / 295.0)
    shift = rng.normal(0.0, sigma, atoms.positions.shape)
    atoms.positions += shift - shift.mean(axis=0)
    atoms.wrap()
    return atoms


def integrals(path: Path) -> tuple[float, float]:
    """Electron count over the window and integral of e*D up to QE's Fermi level (eV)."""
    with Snapshot(path) as snap:
        e = snap.energies
        npts = np.prod(snap.grid_shape)
        dos = snap.ldos[()].astype(np.float64).reshape(npts, -1).sum(0)
        dos *= snap.atoms.get_volume() / npts
        occupied = e <= snap.attrs["fermi_energy_eV"]
        step = e[1] - e[0]
        return float(dos.sum() * step), float((e * dos)[occupied].sum() * step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--supercell", type=int, default=1, help="1: 4 atoms, 2: 32 atoms")
    parser.add_argument("--snapshots", type=int, default=10)
    parser.add_argument(
        "--temperatures", type=float, nargs="+", help="displacement temperatures (K) instead of "
        "--snapshots values spread evenly over 300..1000 K"
    )  # fmt: skip
    parser.add_argument("--lattice", type=float, default=4.05, help="fcc lattice constant (A)")
    parser.add_argument("--seed", type=int, default=933)
    parser.add_argument("--output", default="data/al_fcc4_933K", help="snapshot directory")
    parser.add_argument("--workdir", default="build/qe_runs", help="QE run directories")
    parser.add_argument("--mantissa-bits", type=int, default=7, help="23 keeps the LDOS exact")
    parser.add_argument("--mpi-ranks", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--emin", type=float, default=-5.0, help="LDOS window start (eV)")
    parser.add_argument("--emax", type=float, default=11.0, help="LDOS window end (eV)")
    parser.add_argument(
        "--kspacing", type=float, default=0.2, help="SCF k-spacing (1/A, 2 pi included); "
        "0.13 gives the k-converged 6^3 of 32-atom cells (benchmarks/README.md)"
    )  # fmt: skip
    args = parser.parse_args()
    if not 3.0 < args.lattice < 6.0:
        parser.error(f"--lattice {args.lattice}: expected an fcc Al lattice constant in A (4.05)")

    settings = QESettings(
        ldos_emin_ev=args.emin,
        ldos_emax_ev=args.emax,
        kspacing=args.kspacing,
        **mpi_commands(args.mpi_ranks),
    )
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    temperatures = args.temperatures or np.linspace(300.0, 1000.0, args.snapshots)
    for index, temperature in enumerate(temperatures):
        atoms = displaced_cell(args.supercell, temperature, rng, args.lattice)
        name = f"snapshot_{index:02d}"
        if (output / f"{name}.h5").exists():
            # Resuming a long run: the structure was drawn above, so later ones stay the same.
            print(f"{name}: {output / name}.h5 exists, skipped")
            continue
        rundir = Path(args.workdir) / output.name / name
        if rundir.exists():
            shutil.rmtree(rundir)
        print(
            f"{name}: displacements for {temperature:.0f} K, {len(atoms)} atoms, "
            f"a = {args.lattice} A"
        )
        run_qe(atoms, settings, rundir)
        exact = ingest(rundir, rundir / "exact.h5")
        stored = ingest(rundir, output / f"{name}.h5", ldos_mantissa_bits=args.mantissa_bits)
        (n_exact, e_exact), (n_stored, e_stored) = integrals(exact), integrals(stored)
        print(
            f"  rounding to {args.mantissa_bits} bits changes the electron count by "
            f"{n_stored - n_exact:+.2e} and integral e*D by {1000 * (e_stored - e_exact):+.4f} meV"
        )
        shutil.rmtree(Path(rundir) / "out")  # wavefunctions: hundreds of MB, not needed
        (Path(rundir) / "ldos.h5").unlink(missing_ok=True)  # in the snapshot now


if __name__ == "__main__":
    main()
