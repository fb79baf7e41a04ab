"""Start structures of the 32-atom Al active-learning run (``learn.toml``).

    python examples/learn_al/make_starts.py

Writes fcc32.xyz (the 2x2x2 cubic fcc cell, a = 4.05 A, 0.01 A random displacements so no
atom sits on a grid point), vacancy31.xyz (the same cell less one atom) and liquid32.xyz
(the cell at the liquid's density, a = 4.23 A, melted by 4 ps of EMT Langevin MD at 2500 K
and 2 ps at 1300 K). Seed 7: independent of the held-out references (seed 2026).
"""

from __future__ import annotations

from pathlib import Path

import ase.io
from ase.build import bulk

from mlsurrogate.candidates import classical_md_frames

HERE = Path(__file__).resolve().parent
SEED = 7


def main() -> None:
    crystal = bulk("Al", "fcc", a=4.05, cubic=True).repeat(2)
    crystal.rattle(0.01, seed=SEED)
    ase.io.write(HERE / "fcc32.xyz", crystal)
    vacancy = crystal.copy()
    del vacancy[0]
    ase.io.write(HERE / "vacancy31.xyz", vacancy)
    liquid = bulk("Al", "fcc", a=4.23, cubic=True).repeat(2)
    (_, melt), *_ = classical_md_frames(liquid, [2500.0], steps=2000, every=2000, seed=SEED)
    (_, liquid), *_ = classical_md_frames(melt, [1300.0], steps=1000, every=1000, seed=SEED)
    ase.io.write(HERE / "liquid32.xyz", liquid)
    print(f"wrote fcc32.xyz, vacancy31.xyz and liquid32.xyz in {HERE}")


if __name__ == "__main__":
    main()
