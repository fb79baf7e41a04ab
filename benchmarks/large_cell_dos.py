"""The predicted DOS of a large Al cell against a k-converged 32-atom QE DOS (issue 19).

    python benchmarks/large_cell_dos.py MODEL.pt [MODEL.pt ...] --reference SNAPSHOT.h5
                [--cells 6] [--temperature 933] [--spacing 0.34] [--plot dos_large_cell.png]

A finite cell's DOS from a coarse k-grid is a comb of broadened eigenvalues: wiggles a
large cell does not have. A network trained on such LDOS learns the wiggles as if they
were local and puts them into every cell. Per model: the DOS per atom of an n x n x n
cubic fcc cell (n = 6: 864 atoms, a = 4.05 A) with Gaussian displacements of the
temperature's Debye-Waller amplitude, next to the reference snapshot's QE DOS (its
eigenvalues broadened with its LDOS kernel and width on the model's energies, so exactly
what the snapshot's LDOS integrates to). Both are aligned at their Fermi levels. Printed:

* wiggle amplitude: RMS of D(E) - (D * g)(E) over E_F - 8 .. E_F + 2 eV, with g a
  Gaussian of 0.5 eV (the comb spacing of a 32-atom 4x4x4 DOS is 0.1-0.5 eV), in
  states/eV/atom, and relative to the mean D over the window;
* the relative L1 difference to the reference DOS over the same window.

The LDOS is predicted on a grid of ``--spacing`` (not the training grid: the DOS is an
integral, and 864 atoms on the 0.18 A grid would hold 2.4M points x nE LDOS values).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from mlsurrogate.data import Snapshot
from mlsurrogate.descriptors import grid_for_spacing
from mlsurrogate.model import Model
from mlsurrogate.qe.ldos import kernel_values

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from make_al_dataset import displaced_cell  # noqa: E402  (the data's displacements, one copy)

WINDOW_EV = (-8.0, 2.0)  # about E_F: the occupied band and the LDOS window above it
SMOOTHING_EV = 0.5


def reference_dos(path: str, energies: np.ndarray) -> tuple[np.ndarray, float, int]:
    """QE's DOS of the snapshot on ``energies`` (states/eV per cell), its Fermi level, atoms."""
    with Snapshot(path) as snap:
        width = float(snap.attrs["ldos_broadening_eV"])
        kernel = str(snap.attrs["ldos_broadening_kernel"])
        eigenvalues = snap.reference("eigenvalues")
        kweights = snap.reference("kweights")
        fermi = float(snap.attrs["fermi_energy_eV"])
        natoms = len(snap.atoms)
        kgrid = tuple(int(n) for n in snap.attrs["ldos_kpoint_grid"])
    x = (energies[:, None, None] - eigenvalues[None]) / width
    dos = np.einsum("ekn,k->e", kernel_values(kernel, x), kweights) / width
    print(f"reference {path}: {natoms} atoms, LDOS k-grid {kgrid}, {kernel} width {width} eV")
    return dos, fermi, natoms


def wiggles(relative: np.ndarray, dos: np.ndarray) -> tuple[float, float]:
    """(RMS of D - D * g, that over the mean D) over the window, per atom."""
    step = relative[1] - relative[0]
    offsets = np.arange(-4 * SMOOTHING_EV, 4 * SMOOTHING_EV + step / 2, step)
    kernel = np.exp(-0.5 * (offsets / SMOOTHING_EV) ** 2)
    smooth = np.convolve(dos, kernel / kernel.sum(), mode="same")
    inside = (relative >= WINDOW_EV[0]) & (relative <= WINDOW_EV[1])
    rms = float(np.sqrt(np.mean((dos - smooth)[inside] ** 2)))
    return rms, rms / float(dos[inside].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--reference", required=True, help="k-converged 32-atom snapshot")
    parser.add_argument("--cells", type=int, default=6)
    parser.add_argument("--temperature", type=float, default=933.0)
    parser.add_argument("--spacing", type=float, default=0.34)
    parser.add_argument("--plot", default="dos_large_cell.png")
    args = parser.parse_args()

    atoms = displaced_cell(args.cells, args.temperature, np.random.default_rng(864))
    grid = grid_for_spacing(atoms.cell, args.spacing)
    curves = []
    for path in args.models:
        model = Model.load(path)
        energies = np.asarray(model.energies, dtype=np.float64)
        functional = model.module.functional
        ldos = model.predict_ldos(atoms, grid)
        rows = torch.as_tensor(ldos.reshape(-1, ldos.shape[-1]))
        dos = functional.dos(rows, atoms.get_volume() / rows.shape[0])
        mu = float(functional.fermi_level(dos, 3.0 * len(atoms)))
        curves.append((f"{Path(path).name}, {len(atoms)} atoms", energies - mu,
                       dos.numpy() / len(atoms), energies))  # fmt: skip
    energies = curves[0][3]
    qe, qe_fermi, qe_atoms = reference_dos(args.reference, energies)
    curves.append((f"QE {Path(args.reference).name}, {qe_atoms} atoms", energies - qe_fermi,
                   qe / qe_atoms, energies))  # fmt: skip
    reference_relative, reference = curves[-1][1], curves[-1][2]

    print(f"{len(atoms)} atoms, {args.temperature:.0f} K displacements, grid {tuple(grid)}")
    print("| DOS | wiggle RMS (states/eV/atom) | wiggles / mean D | L1 to QE k-converged |")
    print("|---|---:|---:|---:|")
    for label, relative, dos, _ in curves:
        rms, fraction = wiggles(relative, dos)
        inside = (relative >= WINDOW_EV[0]) & (relative <= WINDOW_EV[1])
        on_reference = np.interp(relative[inside], reference_relative, reference)
        l1 = float(np.abs(dos[inside] - on_reference).sum() / np.abs(on_reference).sum())
        print(f"| {label} | {rms:.4f} | {100 * fraction:.1f} % | {100 * l1:.1f} % |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for label, relative, dos, _ in curves:
        axes.plot(relative, dos, label=label, lw=1.2)
    axes.axvline(0.0, color="0.5", lw=0.8, ls=":")
    axes.set_xlim(*WINDOW_EV)
    axes.set_xlabel("E - E_F (eV)")
    axes.set_ylabel("DOS (states / eV / atom)")
    axes.set_title(f"DOS of {len(atoms)}-atom Al at {args.temperature:.0f} K displacements")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(args.plot, dpi=120)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
