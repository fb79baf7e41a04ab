"""The grid descriptor kernel against LAMMPS compute sna/grid, and its adjoint forces
against finite differences."""

from __future__ import annotations

import ase
import ase.build
import ase.io
import numpy as np
import pytest

from mlsurrogate import _core
from mlsurrogate import descriptors as descriptors_module
from mlsurrogate.descriptors import (
    DESCRIPTOR_KEYWORDS,
    BispectrumParams,
    compute_grid_descriptors,
    descriptor_forces,
    descriptor_gradients,
    grid_for_spacing,
    num_descriptors,
    partition_to_atoms,
)
from mlsurrogate.lammps_reference import lammps_sna_grid

TWO_ELEMENTS = {"radius": {"Al": 0.5, "Cu": 0.42}, "weight": {"Al": 1.0, "Cu": 0.73}}


def al4(displacement: float = 0.1, seed: int = 0) -> ase.Atoms:
    """The bundled data's cell: 4-atom fcc Al (a = 4.05), smaller than the cutoff."""
    atoms = ase.build.bulk("Al", "fcc", a=4.05, cubic=True)
    rng = np.random.default_rng(seed)
    atoms.positions += rng.normal(scale=displacement, size=atoms.positions.shape)
    return atoms


def triclinic_alcu(seed: int = 1) -> ase.Atoms:
    rng = np.random.default_rng(seed)
    cell = np.array([[5.1, 0.0, 0.0], [1.3, 4.7, 0.0], [0.8, -0.9, 5.4]])
    return ase.Atoms("Al3Cu2", cell=cell, pbc=True, scaled_positions=rng.random((5, 3)))


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


CASES = {
    "al4-mala-twojmax10": (al4(), (6, 5, 4), BispectrumParams()),
    "al4-twojmax4-bzero": (
        al4(0.2, seed=3),
        (5, 5, 5),
        BispectrumParams(twojmax=4, bzeroflag=True),
    ),
    "al-supercell-twojmax8-rmin0": (
        al4(0.05, seed=4).repeat((2, 1, 1)),
        (8, 4, 4),
        BispectrumParams(twojmax=8, rmin0=0.3, rfac0=0.98),
    ),
    "triclinic-two-elements": (
        triclinic_alcu(),
        (4, 3, 5),
        BispectrumParams(twojmax=6, rcutfac=4.2, bzeroflag=True, **TWO_ELEMENTS),
    ),
    "triclinic-chem-bnorm": (
        triclinic_alcu(2),
        (3, 4, 3),
        BispectrumParams(twojmax=4, rcutfac=4.2, chemflag=True, bnormflag=True, **TWO_ELEMENTS),
    ),
    "triclinic-chem-wselfall-bzero": (
        triclinic_alcu(3),
        (3, 3, 4),
        BispectrumParams(
            twojmax=5,
            rcutfac=4.2,
            chemflag=True,
            wselfallflag=True,
            bzeroflag=True,
            elements=("Cu", "Al"),
            **TWO_ELEMENTS,
        ),
    ),
    "al4-quadratic-noswitch": (
        al4(0.1, seed=5),
        (3, 3, 3),
        BispectrumParams(twojmax=4, quadraticflag=True, switchflag=False),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_equals_lammps_sna_grid(case: str) -> None:
    atoms, grid, params = CASES[case]
    ours = compute_grid_descriptors(atoms, grid, params, threads=2)
    reference = lammps_sna_grid(atoms, grid, params)
    assert ours.shape == reference.shape == (*grid, ours.shape[-1])
    assert ours.dtype == np.float64
    assert relative_error(ours, reference) <= 1e-10


def test_component_counts() -> None:
    assert num_descriptors(BispectrumParams()) == 91  # MALA's set
    assert num_descriptors(BispectrumParams(twojmax=4, chemflag=True), 2) == 14 * 8
    assert num_descriptors(BispectrumParams(twojmax=2, quadraticflag=True)) == 5 + 15


def test_block_and_threads_agree_with_full_grid() -> None:
    atoms, grid, params = CASES["triclinic-two-elements"]
    full = compute_grid_descriptors(atoms, grid, params, threads=1)
    np.testing.assert_array_equal(compute_grid_descriptors(atoms, grid, params, threads=2), full)
    block = compute_grid_descriptors(atoms, grid, params, index_range=((1, 3), (0, 2), (2, 5)))
    np.testing.assert_array_equal(block, full[1:3, 0:2, 2:5])


def test_periodic_images_and_wrapping() -> None:
    atoms = al4()
    params = BispectrumParams(twojmax=6)
    small = compute_grid_descriptors(atoms, (3, 3, 3), params)
    shifted = atoms.copy()
    shifted.positions += atoms.cell[0] - 2 * atoms.cell[2]  # whole lattice vectors
    np.testing.assert_allclose(
        compute_grid_descriptors(shifted, (3, 3, 3), params), small, rtol=0, atol=1e-12
    )
    big = compute_grid_descriptors(atoms.repeat((2, 1, 1)), (6, 3, 3), params)
    np.testing.assert_allclose(big[:3], small, rtol=0, atol=1e-12)
    np.testing.assert_allclose(big[3:], small, rtol=0, atol=1e-12)


def energy(
    atoms: ase.Atoms, grid: tuple[int, int, int], params: BispectrumParams, beta: np.ndarray
) -> float:
    return float((beta * compute_grid_descriptors(atoms, grid, params)).sum())


@pytest.mark.parametrize(
    "params",
    [
        BispectrumParams(twojmax=6, rcutfac=4.2, bzeroflag=True, **TWO_ELEMENTS),
        BispectrumParams(twojmax=4, rcutfac=4.2, chemflag=True, rmin0=0.2, **TWO_ELEMENTS),
        BispectrumParams(
            twojmax=3,
            rcutfac=4.2,
            chemflag=True,
            quadraticflag=True,
            bnormflag=True,
            wselfallflag=True,
            **TWO_ELEMENTS,
        ),
    ],
    ids=["two-elements", "chem", "chem-quadratic-bnorm"],
)
def test_forces_and_strain_match_finite_differences(params: BispectrumParams) -> None:
    atoms = triclinic_alcu(4)
    grid = (4, 3, 5)
    beta = np.random.default_rng(7).normal(size=(*grid, num_descriptors(params, 2)))
    grads = descriptor_gradients(atoms, grid, params, beta)
    np.testing.assert_array_equal(descriptor_forces(atoms, grid, params, beta), grads.forces)

    h = 1e-5
    fd_forces = np.zeros((len(atoms), 3))
    for i in range(len(atoms)):
        for k in range(3):
            plus, minus = atoms.copy(), atoms.copy()
            plus.positions[i, k] += h
            minus.positions[i, k] -= h
            fd_forces[i, k] = -(
                energy(plus, grid, params, beta) - energy(minus, grid, params, beta)
            ) / (2 * h)
    assert relative_error(grads.forces, fd_forces) <= 1e-6

    cell = atoms.cell.array
    fd_strain = np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            eps = np.zeros((3, 3))
            eps[a, b] = h
            plus, minus = atoms.copy(), atoms.copy()
            plus.set_cell(cell @ (np.eye(3) + eps).T, scale_atoms=True)
            minus.set_cell(cell @ (np.eye(3) - eps).T, scale_atoms=True)
            fd_strain[a, b] = (
                energy(plus, grid, params, beta) - energy(minus, grid, params, beta)
            ) / (2 * h)
    assert relative_error(grads.strain_derivative, fd_strain) <= 1e-6


def test_force_sum_matches_rigid_shift() -> None:
    atoms, grid, params = CASES["al4-mala-twojmax10"]
    beta = np.random.default_rng(2).normal(size=(*grid, 91))
    forces = descriptor_forces(atoms, grid, params, beta)
    # moving every atom moves the density past a fixed grid: not translation invariant,
    # but the total must match the derivative with respect to a rigid shift of the atoms
    shift = np.array([1e-5, 0.0, 0.0])
    plus, minus = atoms.copy(), atoms.copy()
    plus.positions += shift
    minus.positions -= shift
    fd = -(energy(plus, grid, params, beta) - energy(minus, grid, params, beta)) / 2e-5
    assert forces[:, 0].sum() == pytest.approx(fd, rel=1e-6)


def test_becke_partition_shares() -> None:
    """Per-point values split among atoms (the pair style's per-atom energies): nothing is
    lost, a point on an atom is that atom's alone, and far-away points stay unclaimed."""
    atoms, grid, params = al4(), (12, 12, 12), BispectrumParams()
    values = np.random.default_rng(4).normal(size=(*grid, 2))
    shares, unclaimed = partition_to_atoms(atoms, grid, params, values)
    assert shares.shape == (4, 2) and np.abs(unclaimed).max() == 0.0
    np.testing.assert_allclose(shares.sum(0), values.sum((0, 1, 2)), rtol=1e-12)
    # one non-zero point sitting on atom 2: all of it goes to atom 2
    on_atom = al4()
    on_atom.positions[2] = on_atom.cell.array.T @ np.array([3, 6, 9]) / 12
    single = np.zeros((*grid, 1))
    single[3, 6, 9] = 1.0
    shares, _ = partition_to_atoms(on_atom, grid, params, single)
    np.testing.assert_allclose(shares[:, 0], [0, 0, 1, 0], atol=1e-14)
    # halfway between two atoms (and far from the others): half each
    pair = ase.Atoms("Al2", positions=[[4, 10, 10], [8, 10, 10]], cell=[20] * 3, pbc=True)
    middle = np.zeros((20, 20, 20, 1))  # 1 A spacing
    middle[6, 10, 10] = 1.0
    middle[0, 0, 0] = 2.0  # > cutoff (4.7 A) from both: unclaimed
    shares, unclaimed = partition_to_atoms(pair, (20, 20, 20), params, middle)
    np.testing.assert_allclose(shares[:, 0], [0.5, 0.5], rtol=1e-12)
    assert unclaimed[0] == 2.0


def test_owned_grid_range_rule() -> None:
    # lower boundary belongs to the subdomain, upper does not (compute grid/local)
    assert _core.owned_grid_range(10, 0.0, 0.5) == (0, 5)
    assert _core.owned_grid_range(10, 0.5, 1.0) == (5, 10)
    assert _core.owned_grid_range(9, 0.0, 0.5) == (0, 5)
    assert _core.owned_grid_range(9, 0.5, 1.0) == (5, 9)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"grid": (4, 0, 4)}, "grid"),
        ({"grid": (4, -2, 4)}, "grid"),
        ({"grid": (4, 4)}, "grid"),
        ({"params": BispectrumParams(twojmax=-1)}, "twojmax"),
        ({"params": BispectrumParams(rcutfac=0.0)}, "rcutfac"),
        ({"params": BispectrumParams(rcutfac=-1.0)}, "rcutfac"),
        ({"params": BispectrumParams(rfac0=1.5)}, "rfac0"),
        ({"params": BispectrumParams(radius={"Cu": 0.5})}, "radius.*Al"),
        ({"params": BispectrumParams(radius=-0.5)}, "radius"),
        ({"params": BispectrumParams(elements=("Cu",))}, "not in params.elements"),
        ({"index_range": ((0, 5), (0, 4), (0, 4))}, "index range"),
    ],
)
def test_bad_input_raises_value_error(kwargs: dict, message: str) -> None:
    args = {"atoms": al4(), "grid": (4, 4, 4), "params": BispectrumParams(twojmax=2)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        compute_grid_descriptors(
            args["atoms"], args["grid"], args["params"], index_range=args.get("index_range")
        )


def test_bad_cells_and_beta_raise_value_error() -> None:
    params = BispectrumParams(twojmax=2)
    flat = al4()
    flat.set_cell([[4.05, 0, 0], [0, 4.05, 0], [4.05, 4.05, 0]], scale_atoms=False)
    with pytest.raises(ValueError, match="zero volume"):
        compute_grid_descriptors(flat, (2, 2, 2), params)
    open_box = al4()
    open_box.pbc = (True, True, False)
    with pytest.raises(ValueError, match="periodic"):
        compute_grid_descriptors(open_box, (2, 2, 2), params)
    with pytest.raises(ValueError, match="beta has shape"):
        descriptor_forces(al4(), (2, 2, 2), params, np.zeros((2, 2, 2, 4)))
    with pytest.raises(ValueError, match="beta has shape"):
        descriptor_forces(al4(), (2, 2, 2), params, np.zeros((8, 5)))
    with pytest.raises(ValueError, match="threads"):
        compute_grid_descriptors(al4(), (2, 2, 2), params, threads=-1)


def test_cli_descriptors_writes_npy(tmp_path) -> None:
    from mlsurrogate.cli import main

    structure = tmp_path / "al.xyz"
    al4().write(structure)
    out = tmp_path / "b.npy"
    assert (
        main(
            [
                "descriptors",
                str(structure),
                "--grid",
                "3",
                "2",
                "2",
                "--twojmax",
                "4",
                "-o",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    # the file holds positions to finite precision: compare with what was written
    expected = compute_grid_descriptors(
        ase.io.read(structure), (3, 2, 2), BispectrumParams(twojmax=4)
    )
    np.testing.assert_allclose(np.load(out), expected, rtol=0, atol=1e-14)


def test_cli_descriptors_bad_input_leaves_no_file(tmp_path, capsys) -> None:
    from mlsurrogate.cli import main

    out = tmp_path / "b.npy"
    assert (
        main(
            ["descriptors", str(tmp_path / "missing.xyz"), "--grid", "2", "2", "2", "-o", str(out)]
        )
        == 2
    )
    assert "missing.xyz" in capsys.readouterr().err
    structure = tmp_path / "al.xyz"
    al4().write(structure)
    assert main(["descriptors", str(structure), "--grid", "0", "2", "2", "-o", str(out)]) == 2
    assert "grid" in capsys.readouterr().err
    assert not list(tmp_path.glob("b.npy*"))


@pytest.mark.parametrize(
    ("length", "spacing", "expected"),
    [
        (2.5, 1.0, 3),  # half-integer: rounded up (Python's round gives 2)
        (3.5, 1.0, 4),
        (0.5, 1.0, 1),
        (0.4, 1.0, 1),  # never fewer than one point
        (2.4999, 1.0, 2),
        (4.05, 0.18, 23),  # 22.5 points: the bundled model's spacing on a 4.05 A cell
        (7.0, 0.5, 14),
    ],
)
def test_grid_for_spacing_rounds_half_up(length: float, spacing: float, expected: int) -> None:
    assert grid_for_spacing(np.diag([length] * 3), spacing) == (expected,) * 3
    # the length of each cell vector counts, not its x component
    tilted = np.array([[length * 0.6, length * 0.8, 0.0], [0, 1, 0], [0, 0, 1]])
    assert grid_for_spacing(tilted, spacing)[0] == expected


def test_grid_for_spacing_minimum_and_bad_spacing() -> None:
    assert grid_for_spacing(np.eye(3), 1.0, minimum=2) == (2, 2, 2)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="grid spacing must be a finite number > 0"):
            grid_for_spacing(np.eye(3), bad)


def test_non_finite_and_coincident_positions_are_named() -> None:
    params = BispectrumParams(twojmax=2)
    broken = al4()
    broken.positions[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"atoms \[2\] have non-finite"):
        compute_grid_descriptors(broken, (2, 2, 2), params)
    with pytest.raises(ValueError, match=r"atoms \[2\] have non-finite"):
        descriptor_forces(broken, (2, 2, 2), params, np.zeros((2, 2, 2, 5)))
    duplicate = al4()
    duplicate.positions[3] = duplicate.positions[1] + 1e-9
    with pytest.raises(ValueError, match="atoms 1 and 3 coincide"):
        compute_grid_descriptors(duplicate, (2, 2, 2), params)
    # a periodic image: atom 3 one lattice vector (and a little) away from atom 0
    image = al4()
    image.positions[3] = image.positions[0] + image.cell[0] + image.cell[2] + 3e-9
    with pytest.raises(ValueError, match="atoms 0 and 3 coincide"):
        compute_grid_descriptors(image, (2, 2, 2), params)
    # across a face of the wrapped cell: fractional 1e-12 and 1 - 1e-12
    edge = ase.Atoms(
        "Al2", cell=np.diag([4.0, 4.0, 4.0]), pbc=True,
        scaled_positions=[[1e-12, 0.5, 0.5], [1 - 1e-12, 0.5, 0.5]],
    )  # fmt: skip
    with pytest.raises(ValueError, match="atoms 0 and 1 coincide"):
        compute_grid_descriptors(edge, (2, 2, 2), params)
    # 1e-6 A apart is two atoms, not one
    close = al4()
    close.positions[3] = close.positions[1] + 1e-6
    assert np.isfinite(compute_grid_descriptors(close, (2, 2, 2), params)).all()


def test_grid_too_big_for_memory_is_refused(monkeypatch) -> None:
    params = BispectrumParams(twojmax=2)
    with pytest.raises(ValueError, match="GiB, more than the .* GiB of memory available"):
        compute_grid_descriptors(al4(), (4000, 4000, 4000), params)
    # the estimate is points x K x 8 bytes against the available memory
    points, k = 4 * 4 * 4, num_descriptors(params)
    monkeypatch.setattr(descriptors_module, "available_memory_bytes", lambda: points * k * 8 - 1)
    with pytest.raises(ValueError, match="coarser grid"):
        compute_grid_descriptors(al4(), (4, 4, 4), params)
    monkeypatch.setattr(descriptors_module, "available_memory_bytes", lambda: points * k * 8)
    assert compute_grid_descriptors(al4(), (4, 4, 4), params).shape == (4, 4, 4, k)


def test_one_keyword_list() -> None:
    """The keyword list is the BispectrumParams fields (less the element order)."""
    from dataclasses import fields

    assert DESCRIPTOR_KEYWORDS == tuple(
        f.name for f in fields(BispectrumParams) if f.name != "elements"
    )
    assert "wselfallflag" in DESCRIPTOR_KEYWORDS and "elements" not in DESCRIPTOR_KEYWORDS
