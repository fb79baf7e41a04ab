"""`make demo`: LAMMPS MD of 32-atom aluminium with the bundled model, then a check
against Quantum ESPRESSO.

    python examples/demo.py [--steps 100] [--ranks 2] [--grid 16] [--outdir demo_output]

1. NVE MD of 32-atom fcc Al (velocities for 933 K, 1 fs steps) with
   ``pair_style hybrid/overlay mlsurrogate ... coul/long`` + Ewald on ``--ranks`` MPI
   ranks; thermo prints temperature, total energy, Fermi level and band energy.
2. A single point on the held-out QE structure(s) bundled with the model
   (models/al_933K_heldout.json) on their QE grid: free energy error in meV/atom and
   force RMSE in eV/A.
3. Plots: energy over time, and the DOS of the last frame next to the perfect lattice's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import ase.io
import matplotlib
import numpy as np
import torch
from ase.build import bulk

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import mlsurrogate  # noqa: E402
from mlsurrogate.lammps_pair import (  # noqa: E402
    lmp_command,
    pair_style_energy_forces,
    read_thermo,
)

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "al_933K.pt"
HELD_OUT = ROOT / "models" / "al_933K_heldout.json"
MD_INPUT = ROOT / "examples" / "lammps" / "in.al_nve"


def run_md(outdir: Path, steps: int, ranks: int, grid: int) -> np.ndarray:
    """Run examples/lammps/in.al_nve; return the thermo table."""
    args = ["-in", str(MD_INPUT), "-nocite", "-var", "model", str(MODEL)]
    args += ["-var", "grid", str(grid), "-var", "steps", str(steps)]
    command = lmp_command(args, ranks)
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, cwd=outdir, check=True)
    return read_thermo((outdir / "log.lammps").read_text())


def compare_with_qe(threads: int) -> list[tuple[str, float, float, float]]:
    """(name, free energy error meV/atom, force RMSE, RMS QE force) per held-out structure."""
    results = []
    for ref in json.loads(HELD_OUT.read_text()):
        start = time.perf_counter()
        energy, forces = pair_style_energy_forces(
            str(MODEL), ref["cell_A"], ref["positions_A"], ref["grid"], ionion=True,
            options=f"threads {threads}",
        )  # fmt: skip
        natoms = len(ref["positions_A"])
        qe_forces = np.asarray(ref["qe_forces_eV_per_A"])
        results.append(
            (
                ref["name"],
                1000.0 * (energy - ref["qe_free_energy_eV"]) / natoms,
                float(np.sqrt(np.mean((forces - qe_forces) ** 2))),
                float(np.sqrt(np.mean(qe_forces**2))),
            )
        )
        print(f"  {ref['name']}: {time.perf_counter() - start:.0f} s on a {ref['grid']} grid")
    return results


def plot_energy(thermo: np.ndarray, natoms: int, path: Path) -> None:
    # columns of in.al_nve: step time temp pe ke etotal E_F E_band
    time_fs = 1000.0 * thermo[:, 1]
    fig, ax = plt.subplots(figsize=(6, 4))
    for column, label in ((3, "potential"), (5, "total")):
        ax.plot(time_fs, 1000.0 * (thermo[:, column] - thermo[0, 5]) / natoms, label=label)
    ax.set_xlabel("time (fs)")
    ax.set_ylabel("E - E_total(0) (meV/atom)")
    ax.set_title("NVE MD, 32-atom Al, pair_style mlsurrogate")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_dos(model: mlsurrogate.Model, final: ase.Atoms, grid: int, path: Path) -> None:
    functional = model.module.functional
    fig, ax = plt.subplots(figsize=(6, 4))
    lattice = bulk("Al", "fcc", a=4.05, cubic=True).repeat(2)
    # 1e-3 A off the grid points: an atom exactly on one is left out of its descriptors
    lattice.rattle(1e-3, seed=1)
    for atoms, label in ((lattice, "fcc lattice"), (final, "last MD frame")):
        ldos = model.predict_ldos(atoms, (grid, grid, grid))
        flat = torch.as_tensor(ldos.reshape(-1, ldos.shape[-1]))
        dos = functional.dos(flat, atoms.get_volume() / flat.shape[0])
        mu = float(functional.fermi_level(dos, 3.0 * len(atoms)))
        ax.plot(model.energies - mu, dos.numpy() / len(atoms), label=label)
    ax.axvline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("E - E_F (eV)")
    ax.set_ylabel("DOS (states / eV / atom)")
    ax.set_title("predicted DOS, 32-atom Al")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--grid", type=int, default=16, help="MD grid points per box edge")
    parser.add_argument("--outdir", default="demo_output")
    args = parser.parse_args()
    outdir = Path(args.outdir)
    outdir.mkdir(exist_ok=True)

    print(f"1. NVE MD of 32-atom Al, {args.steps} steps, {args.ranks} MPI ranks", flush=True)
    start = time.perf_counter()
    thermo = run_md(outdir, args.steps, args.ranks, args.grid)
    md_seconds = time.perf_counter() - start
    natoms = 32
    drift = 1000.0 * np.abs(thermo[:, 5] - thermo[0, 5]).max() / natoms
    print(
        f"   {md_seconds:.0f} s; max |E_total(t) - E_total(0)| = {drift:.3f} meV/atom over "
        f"{1000.0 * thermo[-1, 1]:.0f} fs; final T = {thermo[-1, 2]:.0f} K"
    )

    print("2. Single point on held-out QE structures (LAMMPS, QE grid, Ewald E_ii)", flush=True)
    rows = compare_with_qe(threads=args.ranks)
    print("| structure    | A - A_QE (meV/atom) | force RMSE (eV/A) | RMS F_QE |")
    print("|---|---:|---:|---:|")
    for name, energy_error, force_rmse, force_rms in rows:
        print(f"| {name:<12} | {energy_error:19.1f} | {force_rmse:17.3f} | {force_rms:8.3f} |")

    print("3. Plots", flush=True)
    model = mlsurrogate.Model.load(MODEL)
    final = ase.io.read(outdir / "final.dump", format="lammps-dump-text", index=-1)
    final.set_chemical_symbols(["Al"] * len(final))
    plot_energy(thermo, natoms, outdir / "energy.png")
    plot_dos(model, final, args.grid, outdir / "dos.png")
    for name in ("energy.png", "dos.png", "log.lammps"):
        print(f"   wrote {outdir / name}")


if __name__ == "__main__":
    main()
