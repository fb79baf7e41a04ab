"""Size transfer: a model trained on 32-atom cells, applied to 256 atoms and more.

    python examples/size_transfer.py [--cells 2 4 6] [--points-per-cell 8] [--outdir example_output]

For fcc Al with cells^3 cubic cells (32, 256, 864 atoms) and 0.1 A random displacements,
predicts the LDOS on a grid of ``points-per-cell`` points per cubic cell edge (8: 0.51 A),
and prints free energy per atom, Fermi level and band energy per atom (a local model
should give size-independent values), with the time each size took; plots the DOS per
atom of every size (``size_transfer_dos.png``). Python API only (no LAMMPS run needed,
LAMMPS computes E_ii).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib
import torch
from ase.build import bulk

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import mlsurrogate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "al_933K.pt"))
    parser.add_argument("--cells", type=int, nargs="+", default=[2, 4, 6])
    parser.add_argument("--points-per-cell", type=int, default=8)
    parser.add_argument("--outdir", default="example_output")
    args = parser.parse_args()
    outdir = Path(args.outdir)
    outdir.mkdir(exist_ok=True)
    model = mlsurrogate.Model.load(args.model)
    functional = model.module.functional
    fig, ax = plt.subplots(figsize=(6, 4))
    print("| atoms | grid | A (eV/atom) | E_F (eV) | band energy (eV/atom) | seconds |")
    print("|---:|---:|---:|---:|---:|---:|")
    for cells in args.cells:
        atoms = bulk("Al", "fcc", a=4.05, cubic=True).repeat(cells)
        atoms.rattle(0.1, seed=cells)
        n = args.points_per_cell * cells
        start = time.perf_counter()
        ldos = model.predict_ldos(atoms, (n, n, n))
        terms = model.energy_terms(atoms, ldos)
        seconds = time.perf_counter() - start
        natoms = len(atoms)
        print(
            f"| {natoms} | {n}^3 | {terms['free_energy'] / natoms:.4f} | "
            f"{terms['fermi_level']:.3f} | {terms['band'] / natoms:.4f} | {seconds:.1f} |",
            flush=True,
        )
        rows = torch.as_tensor(ldos.reshape(-1, ldos.shape[-1]))
        dos = functional.dos(rows, atoms.get_volume() / rows.shape[0]).numpy()
        ax.plot(model.energies - terms["fermi_level"], dos / natoms, label=f"{natoms} atoms")
    ax.axvline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("E - E_F (eV)")
    ax.set_ylabel("DOS (states / eV / atom)")
    ax.set_title("predicted DOS of Al against cell size")
    ax.legend()
    fig.tight_layout()
    fig.savefig(outdir / "size_transfer_dos.png", dpi=120)
    print(f"wrote {outdir / 'size_transfer_dos.png'}")


if __name__ == "__main__":
    main()
