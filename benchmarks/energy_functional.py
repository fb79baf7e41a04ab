"""Energy terms from QE's own LDOS and density vs QE's printout, over a dataset.

    python benchmarks/energy_functional.py [snapshot.h5 ...]   (default: the bundled Al set)

Prints, per term, the mean and max |ours - QE| in meV/atom (Fermi level in meV) and the
time of one functional evaluation with its gradient dA/dLDOS.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from mlsurrogate.data import Snapshot
from mlsurrogate.evaluate import evaluate_dft, functional_for

DATA = Path(__file__).resolve().parents[1] / "data" / "al_fcc4_933K"


def main(paths: list[str]) -> None:
    paths = paths or sorted(str(p) for p in DATA.glob("snapshot_*.h5"))
    diffs: dict[tuple[str, str], list[float]] = defaultdict(list)
    for path in paths:
        rows, natoms = evaluate_dft(path)
        for row in rows:
            scale = 1.0 if row.name == "Fermi level" else 1.0 / natoms
            diffs[(row.name, row.source)].append(1000.0 * (row.ours - row.qe) * scale)
    print(f"{len(paths)} snapshots; |mlsurrogate - QE| in meV/atom (Fermi level: meV)")
    print(f"| {'term':<22} | {'from':<12} | {'mean':>8} | {'max':>8} |")
    print(f"|{'-' * 24}|{'-' * 14}|{'-' * 10}|{'-' * 10}|")
    for (name, source), values in diffs.items():
        values_abs = np.abs(values)
        print(f"| {name:<22} | {source:<12} | {values_abs.mean():8.4f} | {values_abs.max():8.4f} |")
    with Snapshot(paths[0]) as snap:
        functional = functional_for(snap)
        ldos = torch.as_tensor(snap.ldos[()], dtype=torch.float64)
        cell = torch.as_tensor(np.asarray(snap.atoms.cell), dtype=torch.float64)
        shape = snap.grid_shape
        snap_electrons = snap.attrs["num_valence_electrons"]
    functional.evaluate(ldos, cell, snap_electrons, True)
    start = time.perf_counter()
    repeats = 5
    for _ in range(repeats):
        functional.evaluate(ldos, cell, snap_electrons, True)
    elapsed = (time.perf_counter() - start) / repeats
    print(
        f"functional + gradient on a {shape[0]}x{shape[1]}x{shape[2]} grid x "
        f"{ldos.shape[3]} energies: {1000 * elapsed:.1f} ms ({torch.get_num_threads()} threads)"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
