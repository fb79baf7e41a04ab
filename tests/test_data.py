"""Snapshot files: writing, lazy reading, descriptors, summaries and bad files."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from ase.build import bulk

from mlsurrogate import cli
from mlsurrogate.data import (
    REQUIRED_ATTRIBUTES,
    Snapshot,
    SnapshotError,
    add_descriptors,
    round_mantissa,
    write_snapshot,
)
from mlsurrogate.descriptors import BispectrumParams, compute_grid_descriptors, num_descriptors

PARAMS = BispectrumParams(twojmax=2)
DATA = Path(__file__).resolve().parents[1] / "data" / "al_fcc4_933K"


def synthetic_snapshot(path, grid=(4, 5, 6), nenergies=7):
    """A snapshot with made-up values: tests the format, not the physics."""
    atoms = bulk("Al", "fcc", a=4.05, cubic=True)
    atoms.positions[1] += (0.1, -0.05, 0.02)
    rng = np.random.default_rng(7)
    ldos = rng.random((*grid, nenergies)).astype(np.float32)
    attributes = {name: 1.0 for name in REQUIRED_ATTRIBUTES}
    attributes.update(valence_charges={"Al": 3.0}, qe_version="test", source="synthetic")
    reference = {
        "forces": np.zeros((4, 3)),
        "stress": np.zeros((3, 3)),
        "eigenvalues": np.zeros((2, 3)),
        "occupations": np.zeros((2, 3)),
        "kweights": np.ones(2),
    }
    write_snapshot(
        path,
        atoms=atoms,
        energies=np.linspace(-1.0, 1.0, nenergies),
        ldos=ldos,
        reference=reference,
        attributes=attributes,
        density=rng.random(grid),
    )
    return atoms, ldos


def test_round_trip_and_lazy_points(tmp_path):
    path = tmp_path / "s.h5"
    atoms, ldos = synthetic_snapshot(path)
    with Snapshot(path) as snap:
        assert snap.grid_shape == (4, 5, 6)
        np.testing.assert_array_equal(snap.ldos[()], ldos)
        np.testing.assert_allclose(snap.atoms.positions, atoms.positions)
        assert snap.atoms.get_chemical_symbols() == ["Al"] * 4
        assert snap.attrs["valence_charges"] == {"Al": 3.0}
        assert snap.ldos.chunks == (1, 5, 6, 7) and snap.ldos.compression == "gzip"
        flat = np.array([119, 0, 37, 36, 64])
        np.testing.assert_array_equal(snap.read_points("ldos", flat), ldos.reshape(-1, 7)[flat])
        with pytest.raises(IndexError, match="out of range"):
            snap.read_points("ldos", [120])


def test_add_descriptors_in_place_and_to_copy(tmp_path, capsys):
    path = tmp_path / "s.h5"
    atoms, _ = synthetic_snapshot(path)
    expected = compute_grid_descriptors(atoms, (4, 5, 6), PARAMS)
    copy = add_descriptors(path, PARAMS, output=tmp_path / "copy.h5", progress=False)
    with Snapshot(path) as original:
        assert original.descriptors is None
    with Snapshot(copy) as snap:
        np.testing.assert_allclose(snap.descriptors[()], expected, rtol=1e-6, atol=1e-7)
        assert snap.descriptor_params == PARAMS
    assert cli.main(["data", "descriptors", str(path), "--twojmax", "2", "-q"]) == 0
    with Snapshot(path) as snap:
        assert snap.descriptors.shape == (4, 5, 6, num_descriptors(PARAMS))
    assert cli.main(["data", "info", str(path)]) == 0
    assert "descriptor parameters" in capsys.readouterr().out


def test_round_mantissa_bound_and_ties():
    values = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 3.14159, -2.5e-7, 0.0], np.float32)
    rounded = round_mantissa(values, 7)
    # ties go to even: 1 + 2^-8 -> 1, 1 + 3*2^-8 -> 1 + 2^-6
    assert rounded[1] == 1.0 and rounded[2] == np.float32(1.0 + 2**-6)
    assert np.all(np.abs(rounded - values) <= 2.0**-8 * np.abs(values))
    np.testing.assert_array_equal(round_mantissa(values, 23), values)
    with pytest.raises(ValueError, match="mantissa bits"):
        round_mantissa(values, 0)


def test_bad_snapshot_files(tmp_path):
    with pytest.raises(SnapshotError, match="no such file"):
        Snapshot(tmp_path / "missing.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(SnapshotError, match="text.h5: not an HDF5 file"):
        Snapshot(tmp_path / "text.h5")
    with h5py.File(tmp_path / "other.h5", "w") as h5:
        h5["x"] = 1
    with pytest.raises(SnapshotError, match="not an mlsurrogate snapshot"):
        Snapshot(tmp_path / "other.h5")
    path = tmp_path / "s.h5"
    synthetic_snapshot(path)
    with h5py.File(path, "r+") as h5:
        del h5["ldos"]
        del h5.attrs["fermi_energy_eV"]
    with pytest.raises(SnapshotError, match="s.h5: missing ldos, fermi_energy_eV"):
        Snapshot(path)


def test_write_refuses_inconsistent_arrays(tmp_path):
    atoms = bulk("Al", "fcc", a=4.05, cubic=True)
    with pytest.raises(ValueError, match="does not match 3 energies"):
        write_snapshot(
            tmp_path / "x.h5",
            atoms=atoms,
            energies=np.zeros(3),
            ldos=np.zeros((2, 2, 2, 4), np.float32),
            reference={},
            attributes={},
        )
    assert list(tmp_path.iterdir()) == []


def test_stored_descriptors_serve_params_naming_the_same_elements(tmp_path):
    from dataclasses import replace

    from mlsurrogate.descriptors import snapshot_descriptors

    path = tmp_path / "s.h5"
    atoms, _ = synthetic_snapshot(path)
    add_descriptors(path, replace(PARAMS, elements=None), progress=False)
    elements = tuple(sorted(set(atoms.get_chemical_symbols())))
    with Snapshot(path) as snap:
        stored = snapshot_descriptors(snap, replace(PARAMS, elements=elements))
        assert stored.shape[:3] == snap.grid_shape  # the stored dataset, not an error
        with pytest.raises(ValueError, match="its descriptors were computed with"):
            snapshot_descriptors(snap, replace(PARAMS, elements=(*elements, "Cu")))


def test_compact_snapshot_keeps_points_dos_and_references_and_refuses_full_grid_work(
    tmp_path, capsys
):
    from mlsurrogate.data import compact_snapshot
    from mlsurrogate.evaluate import evaluate_dft

    path = tmp_path / "s.h5"
    _, ldos = synthetic_snapshot(path)
    out = compact_snapshot(path, tmp_path / "c.h5", 30, seed=4)
    with Snapshot(path) as full, Snapshot(out) as snap:
        points = snap.ldos_points
        assert len(points) == 30 and np.all(np.diff(points) > 0)
        np.testing.assert_array_equal(snap.ldos[()], ldos.reshape(-1, 7)[points])
        np.testing.assert_array_equal(snap.read_points("ldos", points[3:9]), snap.ldos[3:9])
        np.testing.assert_allclose(snap.dos(), full.dos(), rtol=1e-12)
        assert snap.dos() == pytest.approx(
            ldos.reshape(-1, 7).sum(0) * full.atoms.get_volume() / 120, rel=1e-6
        )
        assert snap.density is None and snap.descriptors is None
        attrs = snap.attrs
        for key, value in full.attrs.items():
            assert np.array_equal(attrs[key], value), key
        np.testing.assert_array_equal(snap.reference("forces"), full.reference("forces"))
        missing = sorted(set(range(120)) - set(points))[:1]
        with pytest.raises(IndexError, match="lacks some points"):
            snap.read_points("ldos", missing)
    with pytest.raises(SnapshotError, match=r"c\.h5: a compact snapshot \(the LDOS at 30 of 120"):
        evaluate_dft(out)
    with pytest.raises(SnapshotError, match="compacting needs the full grid"):
        compact_snapshot(out, tmp_path / "again.h5", 10)
    with pytest.raises(ValueError, match="121 points asked, the grid has 120"):
        compact_snapshot(path, tmp_path / "x.h5", 121)
    assert cli.main(["data", "info", str(out)]) == 0
    assert "the LDOS at 30 of 120 grid points (seed 4)" in capsys.readouterr().out
    (tmp_path / "dir").mkdir()
    argv = ["data", "compact", str(path), "-o", str(tmp_path / "dir"), "--points", "12"]
    assert cli.main(argv) == 0
    with Snapshot(tmp_path / "dir" / "s.h5") as snap:
        assert len(snap.ldos_points) == 12
    assert cli.main(["data", "compact", str(path), "-o", str(tmp_path / "nowhere")]) == 2
    assert "-o " in capsys.readouterr().err
    with h5py.File(out, "r+") as h5:
        h5["ldos_points"][0] = h5["ldos_points"][1]
    with pytest.raises(SnapshotError, match="ldos_points must be increasing"):
        Snapshot(out)


def test_replicated_snapshot_is_the_supercell_by_the_functional_descriptors_and_points(
    tmp_path, capsys
):
    """A 2x1x1 copy of a real 4-atom snapshot: the functional gives QE's terms per atom
    as for the cell, its descriptors are those the kernel computes for the supercell,
    and a compact copy's points hold the full copy's LDOS."""
    from mlsurrogate.data import compact_snapshot, replicate_snapshot
    from mlsurrogate.evaluate import evaluate_dft

    source = DATA / "snapshot_00.h5"
    full = add_descriptors(source, PARAMS, output=tmp_path / "with_descriptors.h5", progress=False)
    copy = replicate_snapshot(full, tmp_path / "copy.h5", (2, 1, 1))
    cell_rows, cell_atoms = evaluate_dft(full)
    copy_rows, copy_atoms = evaluate_dft(copy)
    assert copy_atoms == 2 * cell_atoms
    for cell_row, copy_row in zip(cell_rows, copy_rows):
        per_atom = 1.0 if cell_row.name == "Fermi level" else 2.0
        assert copy_row.qe == pytest.approx(per_atom * cell_row.qe, rel=1e-12), cell_row.name
        assert copy_row.ours == pytest.approx(per_atom * cell_row.ours, rel=1e-9), cell_row.name
    with Snapshot(copy) as snap, Snapshot(full) as cell:
        assert snap.grid_shape == (48, 24, 24)
        assert list(snap.attrs["kpoint_grid"]) == [4, 8, 8]
        kernel = compute_grid_descriptors(snap.atoms, snap.grid_shape, PARAMS, progress=False)
        np.testing.assert_allclose(snap.descriptors[()], kernel, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(snap.reference("forces")[4:], cell.reference("forces"))
        np.testing.assert_array_equal(snap.reference("stress"), cell.reference("stress"))
        np.testing.assert_allclose(snap.dos(), 2 * cell.dos(), rtol=1e-6)
        whole = snap.ldos[()].reshape(-1, snap.ldos.shape[-1])
    compact = compact_snapshot(full, tmp_path / "compact.h5", 300, seed=2)
    compact_copy = replicate_snapshot(compact, tmp_path / "compact_copy.h5", (2, 1, 1), seed=5)
    with Snapshot(compact) as cell:
        cell_dos = cell.dos()
    with Snapshot(compact_copy) as snap:
        points = snap.ldos_points
        assert len(points) == 300 and np.all(np.diff(points) > 0)
        assert np.any(points >= 24**3), "some points lie in the second image"
        np.testing.assert_array_equal(snap.ldos[()], whole[points])
        np.testing.assert_allclose(snap.dos(), 2 * cell_dos, rtol=1e-12)
    with pytest.raises(ValueError, match=r"kpoint_grid 8 8 8 does not divide by the repeat 3 1 1"):
        replicate_snapshot(full, tmp_path / "bad.h5", (3, 1, 1))
    assert not (tmp_path / "bad.h5").exists()
    argv = ["data", "replicate", str(full), "2", "2", "1", "-o", str(tmp_path / "cli.h5")]
    assert cli.main(argv) == 0
    assert "16 atoms" in capsys.readouterr().out
    assert cli.main([*argv[:2], str(full), "3", "1", "1", "-o", str(tmp_path / "x.h5")]) == 2
    assert "does not divide" in capsys.readouterr().err
