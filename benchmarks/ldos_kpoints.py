"""The LDOS of one 32-atom Al snapshot on denser k-grids than its SCF's, and pp.x's time.

    python benchmarks/ldos_kpoints.py [--kpts 4 6 8] [--scf-kpts 6] [--pp-x]
                [--workdir build/ldos_kpoints] [--mpi-ranks 2] [--plot dos_kpoints.png]

One pw.x SCF (the bundled data's settings: 4x4x4 k-points for 32 atoms, Gaussian
displacements of 933 K), then per k-grid n x n x n a non-self-consistent pw.x run on the
SCF's density and the LDOS from its wavefunctions (:func:`mlsurrogate.qe.run_ldos`),
ingested into a snapshot. Printed per grid: the nscf and LDOS times, the DOS difference
to the densest grid (relative L1 over the window, and the largest difference in states
per eV and atom), the Fermi level and free energy from the snapshot's own LDOS against
QE's SCF values (the SCF's k-grid stays 4x4x4, so these differences are the k-grid's
effect on what the network would learn). ``--scf-kpts n`` also runs the SCF itself on
n^3: how far QE's own energy and forces move from the 4x4x4 SCF's, and how close the
n^3 LDOS on the 4x4x4 density comes to it (labels must agree: energies and forces from
one k-grid, the LDOS from another, contradict each other). ``--pp-x`` also times pp.x
(plot_num = 3) on the SCF's k-grid and compares its LDOS with the one-pass LDOS.
Finished runs are kept and reused (the benchmark resumes after a kill).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from mlsurrogate.data import Snapshot
from mlsurrogate.evaluate import evaluate_dft
from mlsurrogate.qe import (
    QESettings,
    ingest,
    mpi_commands,
    read_pw_clock,
    run_ldos,
    run_pp_ldos,
    run_pw,
)
from mlsurrogate.qe.discover import find_run_files
from mlsurrogate.qe.ingest import _read_ldos_cubes
from mlsurrogate.qe.readers import read_pw_xml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from make_al_dataset import displaced_cell  # noqa: E402  (the data's displacements, one copy)


def finished(output: Path) -> bool:
    return output.is_file() and "JOB DONE" in output.read_text(errors="replace")


def copy_scf(scf: Path, target: Path) -> None:
    """The SCF's input, output and save directory (not its LDOS) into ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    for name in ("pw.in", "pw.out"):
        shutil.copy2(scf / name, target / name)
    save = target / "out" / "pwscf.save"
    shutil.rmtree(save, ignore_errors=True)
    shutil.copytree(scf / "out" / "pwscf.save", save)


def dos_per_atom(snapshot: Path) -> tuple[np.ndarray, np.ndarray]:
    with Snapshot(snapshot) as snap:
        ldos = snap.ldos[()].astype(np.float64)
        points = math.prod(ldos.shape[:3])
        dos = ldos.reshape(points, -1).sum(0) * snap.atoms.get_volume() / points
        return snap.energies, dos / len(snap.atoms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kpts", type=int, nargs="+", default=[4, 6, 8], help="n of n x n x n")
    parser.add_argument("--workdir", default="build/ldos_kpoints")
    parser.add_argument("--seed", type=int, default=20261203, help="displacement draw")
    parser.add_argument("--pp-x", action="store_true", help="also time pp.x on the SCF grid")
    parser.add_argument("--mpi-ranks", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--plot", help="write the DOS per k-grid to this PNG")
    parser.add_argument(
        "--scf-kpts", type=int, nargs="*", default=[], help="also SCFs on these n^3 grids"
    )
    args = parser.parse_args()

    workdir = Path(args.workdir)
    settings = QESettings(**mpi_commands(args.mpi_ranks))
    atoms = displaced_cell(2, 933.0, np.random.default_rng(args.seed))
    scf = workdir / "scf"
    if not finished(scf / "pw.out"):
        start = time.perf_counter()
        run_pw(atoms, settings, scf)
        print(f"pw.x SCF (4x4x4): {time.perf_counter() - start:.0f} s")

    rows = []
    for n in args.kpts:
        run = workdir / f"k{n}"
        snapshot = workdir / f"k{n}.h5"
        timing = run / "timing.txt"
        if not snapshot.is_file():
            copy_scf(scf, run)
            start = time.perf_counter()
            run_ldos(atoms, replace(settings, ldos_kpts=(n, n, n)), run)
            total = time.perf_counter() - start
            nscf_out = run / "ldos_nscf" / "pw.out"
            nscf = read_pw_clock(nscf_out)["wall"] if nscf_out.is_file() else 0.0
            timing.write_text(f"{nscf} {total - nscf}\n")
            ingest(run, snapshot, progress=False)
            shutil.rmtree(run / "out")  # the wavefunctions: GBs on dense grids
        nscf, ldos_time = (float(x) for x in timing.read_text().split())
        table, natoms = evaluate_dft(snapshot)
        by_name = {row.name: row for row in table}
        rows.append((n, snapshot, nscf, ldos_time, by_name, natoms))

    reference_energies, reference = dos_per_atom(rows[-1][1])
    print(f"\nLDOS k-grids of one 32-atom snapshot (SCF 4x4x4); DOS against {args.kpts[-1]}^3")
    print(
        f"{'k-grid':>7} {'nscf s':>7} {'LDOS s':>7} {'DOS L1':>8} {'max dD':>8} "
        f"{'E_F-QE meV':>11} {'A-QE meV/at':>12}"
    )
    curves = []
    for n, snapshot, nscf, ldos_time, by_name, natoms in rows:
        energies, dos = dos_per_atom(snapshot)
        curves.append((n, energies, dos))
        l1 = np.abs(dos - reference).sum() / np.abs(reference).sum()
        fermi, total = by_name["Fermi level"], by_name["total free energy A"]
        print(
            f"{n:>5}^3 {nscf:>7.0f} {ldos_time:>7.1f} {l1:>8.4f} "
            f"{np.abs(dos - reference).max():>8.4f} {1000 * (fermi.ours - fermi.qe):>11.2f} "
            f"{1000 * (total.ours - total.qe) / natoms:>12.2f}"
        )
    assert np.allclose(reference_energies, curves[0][1])

    for n in args.scf_kpts:
        compare_scf(atoms, settings, workdir, n, scf)
    if args.pp_x:
        compare_pp_x(atoms, settings, scf, workdir, args.mpi_ranks)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(7, 4))
        for n, energies, dos in curves:
            axis.plot(energies, dos, lw=1, label=f"{n}x{n}x{n}")
        axis.set_xlabel("E (eV, QE's zero)")
        axis.set_ylabel("DOS (states / eV / atom)")
        axis.set_title("32-atom Al at 933 K: LDOS k-grid (SCF 4x4x4)")
        axis.legend()
        figure.tight_layout()
        figure.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")


def compare_scf(atoms, settings: QESettings, workdir: Path, n: int, scf: Path) -> None:
    """An SCF on the n^3 grid: QE's free energy and forces against the 4x4x4 SCF's, and
    against the free energy of its own LDOS and of the n^3 LDOS on the 4x4x4 density."""
    run = workdir / f"scf{n}"
    snapshot = workdir / f"scf{n}.h5"
    if not snapshot.is_file():
        start = time.perf_counter()
        run_pw(atoms, replace(settings, kpts=(n, n, n)), run)
        run_ldos(atoms, replace(settings, kpts=(n, n, n)), run)
        (run / "timing.txt").write_text(f"{time.perf_counter() - start}\n")
        ingest(run, snapshot, progress=False)
        shutil.rmtree(run / "out" / "pwscf.save", ignore_errors=True)
    dense, coarse = read_pw_xml_of(snapshot), read_pw_xml_of(workdir / "k4.h5")
    natoms = len(atoms)
    table, _ = evaluate_dft(snapshot)
    own = {row.name: row for row in table}["total free energy A"]
    nscf_path = workdir / f"k{n}.h5"
    print(
        f"\nSCF on {n}^3 ({float((run / 'timing.txt').read_text()):.0f} s with its LDOS): QE's "
        f"free energy {1000 * (dense[0] - coarse[0]) / natoms:+.2f} meV/atom from the "
        f"4x4x4 SCF's, forces differ by {np.sqrt(np.mean((dense[1] - coarse[1]) ** 2)):.4f} "
        f"eV/A RMS (max {np.abs(dense[1] - coarse[1]).max():.4f}); A of its own LDOS - QE "
        f"{1000 * (own.ours - own.qe) / natoms:+.2f} meV/atom"
    )
    if nscf_path.is_file():
        table, _ = evaluate_dft(nscf_path)
        ours = {row.name: row for row in table}["total free energy A"].ours
        print(
            f"A of the {n}^3 LDOS on the 4x4x4 density - QE's {n}^3 SCF: "
            f"{1000 * (ours - dense[0]) / natoms:+.2f} meV/atom"
        )


def read_pw_xml_of(snapshot: Path) -> tuple[float, np.ndarray]:
    """QE's total free energy (eV) and forces (eV/A) stored in a snapshot."""
    with Snapshot(snapshot) as snap:
        return float(snap.attrs["energy_total_eV"]), snap.reference("forces")


def compare_pp_x(atoms, settings: QESettings, scf: Path, workdir: Path, ranks: int) -> None:
    """pp.x's LDOS on the SCF's grid against the one pass over the same wavefunctions."""
    run = workdir / "pp_x"
    if not (run / "timing.txt").is_file():
        copy_scf(scf, run)
        start = time.perf_counter()
        run_pp_ldos(replace(settings, ldos_program="pp.x"), run, progress=False)
        (run / "timing.txt").write_text(f"{time.perf_counter() - start}\n")
    pp_time = float((run / "timing.txt").read_text())
    files = find_run_files(run)
    cubes, _ = _read_ldos_cubes(files.ldos_cubes, read_pw_xml(files.xml), False)
    start = time.perf_counter()
    own_run = workdir / "one_pass"
    copy_scf(scf, own_run)
    run_ldos(atoms, settings, own_run, progress=False)
    own_time = time.perf_counter() - start
    with Snapshot(ingest(own_run, workdir / "one_pass.h5", progress=False)) as snap:
        own = snap.ldos[()]
    scale = float(np.abs(cubes).max())
    print(
        f"\npp.x plot_num=3 on {ranks} ranks: "
        f"{pp_time:.0f} s for {cubes.shape[3]} energies; one pass over the wavefunctions "
        f"(one process): {own_time:.1f} s ({pp_time / own_time:.1f}x); largest LDOS "
        f"difference {np.abs(cubes - own).max() / scale:.1e} of the largest value"
    )


if __name__ == "__main__":
    main()
