"""Candidate generators: entropy-maximized structures and their pieces (atom-centred
descriptors from LAMMPS, the Kozachenko-Leonenko entropy). Model MD: tests/test_learn.py."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk
from ase.geometry import get_distances

from mlsurrogate.candidates import entropy_maximized_frames, kozachenko_leonenko_entropy
from mlsurrogate.descriptors import BispectrumParams, compute_grid_descriptors
from mlsurrogate.lammps_reference import LammpsAtomDescriptors

PARAMS = BispectrumParams(twojmax=2)




def test_atom_descriptors_equal_the_grid_kernel_at_an_atom():
    # a grid point on an atom leaves that atom out, as sna/atom leaves out the centre
    atoms = bulk("Al", "fcc", a=4.05, cubic=True)
    atoms.rattle(0.1, seed=5)
    atoms.positions -= atoms.positions[2]
    atoms.wrap()
    grid = compute_grid_descriptors(atoms, (6, 6, 6), PARAMS)
    with LammpsAtomDescriptors(atoms, PARAMS) as descriptors:
        values = descriptors(atoms.positions)
        np.testing.assert_allclose(values[2], grid[0, 0, 0], rtol=1e-12)
        # another image of the same positions gives the same descriptors
        shifted = atoms.positions + np.asarray(atoms.cell)[0]
        np.testing.assert_allclose(descriptors(shifted), values, rtol=1e-12)


def test_kozachenko_leonenko_entropy_of_a_known_distribution():
    rng = np.random.default_rng(0)
    samples = rng.normal(size=(20000, 2)) * [1.0, 3.0]
    exact = np.log(2 * np.pi * np.e) + np.log(3.0)  # 2-d Gaussian, sigmas 1 and 3
    assert kozachenko_leonenko_entropy(samples) == pytest.approx(exact, abs=0.03)
    with pytest.raises(ValueError, match="at least two points"):
        kozachenko_leonenko_entropy(samples[:1])


def test_entropy_maximization_spreads_or_gathers_the_descriptors():
    atoms = bulk("Al", "fcc", a=4.05, cubic=True).repeat(2)
    atoms.rattle(0.05, seed=3)
    frames = entropy_maximized_frames(atoms, (1.0, -1.0), steps=200, every=100, seed=4)
    assert [name for name, _ in frames] == [
        "entropy_K+1_move100", "entropy_K+1_move200", "entropy_K-1_move100",
        "entropy_K-1_move200",
    ]  # fmt: skip
    with LammpsAtomDescriptors(atoms, PARAMS) as descriptors:
        start = kozachenko_leonenko_entropy(descriptors(atoms.positions))
        entropy = [kozachenko_leonenko_entropy(descriptors(f.positions)) for _, f in frames]
    assert entropy[0] > start + 1.0 and entropy[1] >= entropy[0]  # +K: more spread
    assert entropy[3] <= entropy[2] < start  # -K: gathered
    for _, frame in frames:
        _, distances = get_distances(frame.positions, cell=frame.cell, pbc=True)
        assert distances[np.triu_indices(len(frame), k=1)].min() > 2.2 - 0.05
    again = entropy_maximized_frames(atoms, (1.0, -1.0), steps=200, every=100, seed=4)
    assert all(np.array_equal(a.positions, b.positions) for (_, a), (_, b) in zip(frames, again))


def test_entropy_maximization_refuses_bad_input():
    atoms = bulk("Al", "fcc", a=4.05, cubic=True)
    with pytest.raises(ValueError, match="K values must be nonzero"):
        entropy_maximized_frames(atoms, (0.0,))
    with pytest.raises(ValueError, match="need steps >= 1"):
        entropy_maximized_frames(atoms, steps=0)
    with pytest.raises(ValueError, match="periodic orthogonal cell"):
        entropy_maximized_frames(bulk("Al", "fcc", a=4.05).repeat(2), steps=1, every=1)


def test_explore_command_line(tmp_path, capsys):
    import ase.io

    from mlsurrogate import cli

    start = tmp_path / "start.xyz"
    atoms = bulk("Al", "fcc", a=4.05, cubic=True).repeat(2)
    atoms.rattle(0.05, seed=3)
    ase.io.write(start, atoms)
    out = tmp_path / "frames.extxyz"
    code = cli.main(["explore", str(start), "--method", "entropy", "--steps", "20",
                     "--every", "10", "-o", str(out)])  # fmt: skip
    assert code == 0 and len(ase.io.read(out, index=":")) == 4  # 2 frames for each of +-K
    assert cli.main(["explore", str(start), "--method", "model", "-o", str(out)]) == 2
    assert "--method model needs --model" in capsys.readouterr().err
