"""Snapshot files: one HDF5 file (h5py) per DFT snapshot.

The layout (format ``mlsurrogate-snapshot``, version 1: every dataset, attribute and
unit) is documented once, in docs/snapshot-format.md. The big arrays are chunked by
x-planes and gzip-compressed, so training reads grid points plane by plane.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ase
import h5py
import numpy as np

from mlsurrogate.descriptors import BispectrumParams
from mlsurrogate.files import check_output_path, write_bytes_atomically

FORMAT_NAME = "mlsurrogate-snapshot"
FORMAT_VERSION = 1
GRID_DATASETS = ("ldos", "descriptors", "density")
ENERGY_TERMS = (
    "total",
    "one_electron",
    "hartree",
    "xc",
    "ewald",
    "smearing",
    "internal",
    "band",
)
REQUIRED_ATTRIBUTES = (
    "format",
    "format_version",
    "grid_shape",
    "num_energies",
    "energy_min_eV",
    "energy_spacing_eV",
    "ldos_units",
    "ldos_broadening_kernel",
    "ldos_broadening_eV",
    "ldos_mantissa_bits",
    "electronic_temperature_K",
    "smearing",
    "smearing_width_eV",
    "fermi_energy_eV",
    "num_valence_electrons",
    "valence_charges",
    "masses",
    "pseudopotentials",
    "core_correction",
    "xc_functional",
    "ecutwfc_eV",
    "ecutrho_eV",
    "kpoint_grid",
    "qe_version",
    "source",
    *(f"energy_{term}_eV" for term in ENERGY_TERMS),
)
REQUIRED_DATASETS = (
    "ldos",
    "energies",
    "cell",
    "positions",
    "species",
    "forces",
    "stress",
    "eigenvalues",
    "occupations",
    "kweights",
)


class SnapshotError(ValueError):
    """A snapshot file is missing, unreadable, or not in the expected format."""


def round_mantissa(values: np.ndarray, bits: int) -> np.ndarray:
    """float32 values rounded to nearest (ties to even) keeping ``bits`` mantissa bits.

    Relative error <= 2**-(bits + 1). The zeroed low bits compress well under
    shuffle + gzip (bit rounding: Kloewer et al., Nat. Comput. Sci. 1, 713 (2021)).
    """
    if not 1 <= bits <= 23:
        raise ValueError(f"mantissa bits must be in 1..23, got {bits}")
    values = np.ascontiguousarray(values, dtype=np.float32)
    if bits == 23:
        return values.copy()
    drop = 23 - bits
    raw = values.view(np.uint32).astype(np.uint64)
    raw += (1 << (drop - 1)) - 1 + ((raw >> drop) & 1)
    raw &= ~np.uint64((1 << drop) - 1)
    return raw.astype(np.uint32).view(np.float32)


def _plane_chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    """One x-plane per chunk: a training batch reads whole planes."""
    return (1, *shape[1:])


@contextmanager
def _hdf5_output(path: str | os.PathLike[str], initial: bytes = b"") -> Iterator[h5py.File]:
    """An HDF5 file built in memory (from ``initial``, or new) and written to ``path``
    atomically once complete: h5py leaves a file whose disk write failed half-closed
    and crashes the process at exit, so the disk is written by Python instead."""
    check_output_path(path)
    buffer = io.BytesIO(initial)
    with h5py.File(buffer, "r+" if initial else "w") as h5:
        yield h5
    write_bytes_atomically(path, buffer.getvalue())


def write_snapshot(
    path: str | os.PathLike[str],
    *,
    atoms: ase.Atoms,
    energies: np.ndarray,
    ldos: np.ndarray,
    reference: Mapping[str, np.ndarray],
    attributes: Mapping[str, Any],
    density: np.ndarray | None = None,
    descriptors: np.ndarray | None = None,
    descriptor_params: BispectrumParams | None = None,
    core_densities: Mapping[str, Mapping[str, np.ndarray]] | None = None,
) -> Path:
    """Write one snapshot file atomically (temporary name, then rename).

    ``reference`` holds the DFT arrays forces, stress, eigenvalues, occupations, kweights.
    ``attributes`` are stored as file attributes; dicts are stored as JSON strings.
    ``core_densities`` maps an element to its radial core density (``r``, ``rab``, ``rho``)
    for pseudopotentials with a nonlinear core correction.
    """
    grid = tuple(ldos.shape[:3])
    if ldos.ndim != 4 or ldos.shape[3] != len(energies):
        raise ValueError(f"ldos shape {ldos.shape} does not match {len(energies)} energies")
    if density is not None and density.shape != grid:
        raise ValueError(f"density shape {density.shape} differs from the LDOS grid {grid}")
    if descriptors is not None and (descriptors.shape[:3] != grid or descriptor_params is None):
        raise ValueError("descriptors need the LDOS grid shape and their parameters")
    path = Path(path)
    with _hdf5_output(path) as h5:
        for key, value in attributes.items():
            h5.attrs[key] = json.dumps(value) if isinstance(value, dict) else value
        h5.attrs["format"] = FORMAT_NAME
        h5.attrs["format_version"] = FORMAT_VERSION
        h5.attrs["grid_shape"] = np.array(grid, dtype=np.int64)
        h5.attrs["num_energies"] = len(energies)
        h5.create_dataset("energies", data=np.asarray(energies, dtype=np.float64))
        h5.create_dataset("cell", data=np.asarray(atoms.cell, dtype=np.float64))
        h5.create_dataset("positions", data=atoms.positions.astype(np.float64))
        h5.create_dataset("species", data=np.array(atoms.get_chemical_symbols(), dtype="S3"))
        for name in ("forces", "stress", "eigenvalues", "occupations", "kweights"):
            h5.create_dataset(name, data=np.asarray(reference[name], dtype=np.float64))
        _create_grid_dataset(h5, "ldos", np.asarray(ldos, dtype=np.float32))
        if density is not None:
            _create_grid_dataset(h5, "density", np.asarray(density, dtype=np.float64))
        if descriptors is not None:
            _write_descriptors(h5, descriptors, descriptor_params)  # type: ignore[arg-type]
        for element, radial in (core_densities or {}).items():
            for key in ("r", "rab", "rho"):
                h5.create_dataset(f"core_density/{element}/{key}", data=radial[key])
    return path


def _create_grid_dataset(h5: h5py.File, name: str, data: np.ndarray) -> None:
    h5.create_dataset(
        name,
        data=data,
        chunks=_plane_chunks(data.shape),
        compression="gzip",
        compression_opts=6,
        shuffle=True,
    )


def _write_descriptors(h5: h5py.File, descriptors: np.ndarray, params: BispectrumParams) -> None:
    if "descriptors" in h5:
        del h5["descriptors"]
    _create_grid_dataset(h5, "descriptors", np.asarray(descriptors, dtype=np.float32))
    h5["descriptors"].attrs["params"] = json.dumps(asdict(params))


def params_from_json(text: str) -> BispectrumParams:
    raw = json.loads(text)
    if raw.get("elements") is not None:
        raw["elements"] = tuple(raw["elements"])
    return BispectrumParams(**raw)


class Snapshot:
    """Read access to one snapshot file; big arrays stay on disk until sliced.

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self._h5 = h5py.File(self.path, "r")
        except FileNotFoundError as exc:
            raise SnapshotError(f"{self.path}: no such file") from exc
        except OSError as exc:
            raise SnapshotError(f"{self.path}: not an HDF5 file ({exc})") from exc
        try:
            self._check()
        except SnapshotError:
            self._h5.close()
            raise

    def _check(self) -> None:
        h5 = self._h5
        if h5.attrs.get("format") != FORMAT_NAME:
            raise SnapshotError(f"{self.path}: not an mlsurrogate snapshot (format attribute)")
        version = int(h5.attrs.get("format_version", -1))
        if version != FORMAT_VERSION:
            raise SnapshotError(
                f"{self.path}: snapshot format version {version}; this mlsurrogate reads "
                f"version {FORMAT_VERSION}"
            )
        missing = [n for n in REQUIRED_DATASETS if n not in h5] + [
            a for a in REQUIRED_ATTRIBUTES if a not in h5.attrs
        ]
        if missing:
            raise SnapshotError(f"{self.path}: missing {', '.join(missing)}")
        grid = self.grid_shape
        if "ldos_points" in h5:
            self._check_compact()
        for name in GRID_DATASETS:
            if name == "ldos" and "ldos_points" in h5:
                continue
            if name in h5 and tuple(h5[name].shape[:3]) != grid:
                raise SnapshotError(
                    f"{self.path}: dataset {name} has grid {h5[name].shape[:3]}, expected {grid}"
                )

    def _check_compact(self) -> None:
        h5, total = self._h5, int(np.prod(self.grid_shape))
        points = h5["ldos_points"][()]
        if "dos" not in h5 or h5["dos"].shape != h5["energies"].shape:
            raise SnapshotError(f"{self.path}: a compact snapshot needs its dataset dos [nE]")
        if h5["ldos"].shape != (len(points), len(h5["energies"])):
            raise SnapshotError(
                f"{self.path}: compact LDOS of shape {h5['ldos'].shape}, expected "
                f"({len(points)}, {len(h5['energies'])}) for its ldos_points"
            )
        if len(points) and (
            points[0] < 0 or points[-1] >= total or not np.all(np.diff(points) > 0)
        ):
            raise SnapshotError(
                f"{self.path}: ldos_points must be increasing grid indices in 0..{total - 1}"
            )

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._h5.close()

    @property
    def attrs(self) -> dict[str, Any]:
        """File attributes; JSON-encoded mappings are decoded."""
        out: dict[str, Any] = {}
        for key, value in self._h5.attrs.items():
            if isinstance(value, str) and value.startswith("{"):
                value = json.loads(value)
            out[key] = value
        return out

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self._h5.attrs["grid_shape"])  # type: ignore[return-value]

    @property
    def energies(self) -> np.ndarray:
        return self._h5["energies"][()]

    @property
    def atoms(self) -> ase.Atoms:
        species = [s.decode() for s in self._h5["species"][()]]
        return ase.Atoms(
            species, positions=self._h5["positions"][()], cell=self._h5["cell"][()], pbc=True
        )

    @property
    def ldos(self) -> h5py.Dataset:
        return self._h5["ldos"]

    @property
    def ldos_points(self) -> np.ndarray | None:
        """Flat grid indices (C order over [ix, iy, iz]) of the LDOS rows of a compact
        snapshot (:func:`compact_snapshot`); None when the LDOS covers the whole grid."""
        data = self._h5.get("ldos_points")
        return None if data is None else data[()]

    def require_full_grid(self, what: str) -> None:
        """SnapshotError naming the file when a compact snapshot cannot do ``what``."""
        points = self.ldos_points
        if points is not None:
            raise SnapshotError(
                f"{self.path}: a compact snapshot (the LDOS at {len(points)} of "
                f"{int(np.prod(self.grid_shape))} grid points): {what} needs the full grid; "
                f"use the full snapshot it was made from ({self._h5.attrs['compact_source']})"
            )

    def dos(self) -> np.ndarray:
        """The DFT DOS of the cell, states/eV [nE] (float64): the LDOS summed over the
        grid times the voxel volume, or the stored one of a compact snapshot."""
        if "dos" in self._h5:
            return self._h5["dos"][()]
        ldos, nx = self.ldos, self.grid_shape[0]
        total = sum(
            ldos[ix].astype(np.float64).reshape(-1, ldos.shape[3]).sum(0) for ix in range(nx)
        )
        return total * self.atoms.get_volume() / int(np.prod(self.grid_shape))

    @property
    def density(self) -> h5py.Dataset | None:
        return self._h5.get("density")

    @property
    def descriptors(self) -> h5py.Dataset | None:
        return self._h5.get("descriptors")

    @property
    def descriptor_params(self) -> BispectrumParams | None:
        data = self.descriptors
        return None if data is None else params_from_json(data.attrs["params"])

    def core_density_radial(self, element: str) -> dict[str, np.ndarray]:
        """Radial core density (r, rab in A; rho in 1/A^3) of an element with NLCC."""
        group = self._h5.get(f"core_density/{element}")
        if group is None:
            raise SnapshotError(f"{self.path}: no core density stored for {element}")
        return {key: group[key][()] for key in ("r", "rab", "rho")}

    def reference(self, name: str) -> np.ndarray:
        """A DFT reference array (forces, stress, eigenvalues, occupations, kweights)."""
        return self._h5[name][()]

    def read_points(self, name: str, flat_indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows of a grid dataset at flat grid indices (C order over [ix, iy, iz]).

        Reads only the x-planes (chunks) the points lie in; of a compact snapshot's LDOS,
        only its stored points can be read.
        """
        data = self._h5[name]
        flat = np.asarray(flat_indices, dtype=np.int64)
        nx, ny, nz = self.grid_shape
        if flat.size and (flat.min() < 0 or flat.max() >= nx * ny * nz):
            raise IndexError(f"{self.path}: grid index out of range 0..{nx * ny * nz - 1}")
        stored = self.ldos_points if name == "ldos" else None
        if stored is not None:
            rows = np.searchsorted(stored, flat)
            if flat.size and (rows.max() >= len(stored) or np.any(stored[rows] != flat)):
                raise IndexError(f"{self.path}: a compact snapshot's LDOS lacks some points")
            return data[()][rows]
        out = np.empty((flat.size, *data.shape[3:]), dtype=data.dtype)
        planes = flat // (ny * nz)
        for ix in np.unique(planes):
            mask = planes == ix
            plane = data[int(ix)].reshape(ny * nz, *data.shape[3:])
            out[mask] = plane[flat[mask] % (ny * nz)]
        return out


def add_descriptors(
    path: str | os.PathLike[str],
    params: BispectrumParams,
    *,
    output: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> Path:
    """Compute descriptors on the snapshot's grid and store them (replacing any).

    Written to ``output`` (default: in place) only once complete (temporary name, then
    rename); the output path is checked before the descriptors are computed.
    """
    from mlsurrogate.descriptors import compute_grid_descriptors

    source = Path(path)
    target = check_output_path(output if output is not None else source)
    with Snapshot(source) as snap:
        atoms, grid = snap.atoms, snap.grid_shape
    descriptors = compute_grid_descriptors(atoms, grid, params, threads=threads, progress=progress)
    with _hdf5_output(target, Path(source).read_bytes()) as h5:
        _write_descriptors(h5, descriptors, params)
    return target


def compact_snapshot(
    path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    points: int,
    seed: int = 0,
) -> Path:
    """A copy of a snapshot with the LDOS at ``points`` random grid points only (drawn
    without replacement with ``seed``), its DOS, and every attribute and QE reference of
    the original; no descriptors (recomputed from the atoms when training) and no density.

    Training needs no more: the LDOS term samples points anyway, the density weights and
    the Fermi level come from the DOS, and the energy, force and stress terms use the
    atoms and QE's values. A 32-atom snapshot on its 45^3 grid keeps 2 % of its size
    with 2000 points. What needs the full LDOS (``evaluate``, ``qe compare``) refuses it."""
    target = check_output_path(output)
    with Snapshot(path) as snap:
        snap.require_full_grid("compacting")
        total = int(np.prod(snap.grid_shape))
        if not 1 <= points <= total:
            raise ValueError(f"{path}: {points} points asked, the grid has {total}")
        flat = np.sort(np.random.default_rng(seed).choice(total, size=points, replace=False))
        ldos = snap.read_points("ldos", flat)
        dos = snap.dos()
        source = snap._h5
        with _hdf5_output(target) as h5:
            for key, value in source.attrs.items():
                h5.attrs[key] = value
            for name in source:
                if name not in GRID_DATASETS:
                    source.copy(source[name], h5, name)
            h5.create_dataset(
                "ldos", data=ldos, compression="gzip", compression_opts=6, shuffle=True
            )
            h5.create_dataset("ldos_points", data=flat.astype(np.int64))
            h5.create_dataset("dos", data=dos)
            h5.attrs["compact_source"] = str(Path(path).resolve())
            h5.attrs["compact_seed"] = int(seed)
    return target


# QE's printed energies and the electron count scale with the number of cells; the rest
# (Fermi level, temperatures, cutoffs, per-element data) do not
EXTENSIVE_ATTRIBUTES = (
    "num_valence_electrons",
    "energy_vtxc_eV",
    *(f"energy_{term}_eV" for term in ENERGY_TERMS),
)
# k-grids of a cell: the supercell's are these divided by the repeat
KPOINT_GRID_ATTRIBUTES = ("kpoint_grid", "ldos_kpoint_grid")


def replicate_snapshot(
    path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    repeat: tuple[int, int, int],
    seed: int = 0,
) -> Path:
    """The snapshot of the supercell ``repeat`` times the cell, exactly: a periodic
    calculation of a cell on a k-grid equals that of its n1 x n2 x n3 supercell on the
    k-grid divided by (n1, n2, n3), so every grid array tiles, the atoms repeat (ASE's
    order: image-major, so forces tile too), QE's energies and the electron count scale
    with the image count, and stress and Fermi level stay. Each k-point's bands are
    repeated once per image: the supercell's states unfolded onto the cell's k-points,
    so every sum over states (band energy, DOS) is the supercell's.

    A compact snapshot keeps its number of points: each stored point goes to one image
    drawn with ``seed``. Refused when a k-grid does not divide by ``repeat``: no supercell
    calculation would then equal the copy."""
    target = check_output_path(output)
    images = tuple(int(n) for n in repeat)
    if len(images) != 3 or min(images) < 1:
        raise ValueError(f"repeat {repeat}: three positive integers expected")
    count = int(np.prod(images))
    with Snapshot(path) as snap:
        source = snap._h5
        grid = np.array(snap.grid_shape)
        for key in KPOINT_GRID_ATTRIBUTES:
            kgrid = np.asarray(source.attrs.get(key, images), dtype=np.int64)
            if np.any(kgrid % images):
                raise ValueError(
                    f"{path}: its {key} {' '.join(map(str, kgrid))} does not divide by the "
                    f"repeat {' '.join(map(str, images))}; choose a repeat that divides it"
                )
        atoms = snap.atoms.repeat(images)
        with _hdf5_output(target) as h5:
            for key, value in source.attrs.items():
                if key in EXTENSIVE_ATTRIBUTES:
                    value = value * count
                elif key in KPOINT_GRID_ATTRIBUTES:
                    value = np.asarray(value) // images
                h5.attrs[key] = value
            h5.attrs["grid_shape"] = grid * images
            h5.attrs["replica_source"] = str(Path(path).resolve())
            h5.attrs["replica_repeat"] = np.array(images, dtype=np.int64)
            h5.create_dataset("cell", data=np.asarray(atoms.cell, dtype=np.float64))
            h5.create_dataset("positions", data=atoms.positions.astype(np.float64))
            h5.create_dataset("species", data=source["species"][()].tolist() * count)
            h5.create_dataset("forces", data=np.tile(source["forces"][()], (count, 1)))
            for name in ("eigenvalues", "occupations"):
                h5.create_dataset(name, data=np.repeat(source[name][()], count, axis=1))
            if "dos" in source:
                h5.create_dataset("dos", data=source["dos"][()] * count)
            points = snap.ldos_points
            if points is not None:
                shifts = np.random.default_rng(seed).integers(0, images, size=(len(points), 3))
                index = np.stack(np.unravel_index(points, tuple(grid)), axis=1) + shifts * grid
                flat = np.ravel_multi_index(tuple(index.T), tuple(grid * images))
                order = np.argsort(flat)
                h5.create_dataset("ldos_points", data=flat[order].astype(np.int64))
                rows = source["ldos"][()][order]
                h5.create_dataset(
                    "ldos", data=rows, compression="gzip", compression_opts=6, shuffle=True
                )
            for name in GRID_DATASETS:
                if name in source and not (name == "ldos" and points is not None):
                    data = source[name]
                    _create_grid_dataset(
                        h5, name, np.tile(data[()], images + (1,) * (data.ndim - 3))
                    )
                    h5[name].attrs.update(data.attrs)
            for name in source:
                if name not in h5:
                    source.copy(source[name], h5, name)
    return target


def _integration_rule(attrs: Mapping[str, Any]) -> str:
    """Which energy-integration rule the snapshot's LDOS gets (docs/energy-functional.md)."""
    from mlsurrogate.physics import exact_energy_integrals

    exact = exact_energy_integrals(
        float(attrs["electronic_temperature_K"]),
        str(attrs["ldos_broadening_kernel"]),
        float(attrs["ldos_broadening_eV"]),
    )
    return "exact energy integrals" if exact else "approximate energy integrals"


def summary(path: str | os.PathLike[str]) -> str:
    """A readable description of a snapshot file."""
    with Snapshot(path) as snap:
        a = snap.attrs
        atoms = snap.atoms
        natoms = len(atoms)
        energies = snap.energies
        lengths = atoms.cell.cellpar()
        forces = snap.reference("forces")
        lines = [
            f"snapshot {snap.path} (format version {a['format_version']}, {a['qe_version']})",
            f"  source        {a['source']}",
            f"  structure     {atoms.get_chemical_formula()}, {natoms} atoms, cell "
            f"a b c = {lengths[0]:.4f} {lengths[1]:.4f} {lengths[2]:.4f} A, "
            f"angles {lengths[3]:.2f} {lengths[4]:.2f} {lengths[5]:.2f} deg, "
            f"volume {atoms.get_volume():.4f} A^3",
            f"  DFT           {a['xc_functional']}, ecutwfc {a['ecutwfc_eV']:.3f} eV, "
            f"k-grid {' x '.join(str(k) for k in np.atleast_1d(a['kpoint_grid']))}, "
            f"{a['smearing']} smearing {a['smearing_width_eV']:.6f} eV "
            f"(T = {a['electronic_temperature_K']:.3f} K)",
            f"  electrons     N_val = {a['num_valence_electrons']:g}, valence charges "
            f"{a['valence_charges']}, E_F = {a['fermi_energy_eV']:.6f} eV",
            f"  grid          {' x '.join(str(n) for n in snap.grid_shape)}",
            f"  energy grid   {len(energies)} energies, {energies[0]:.4f} .. {energies[-1]:.4f} "
            f"eV, spacing {a['energy_spacing_eV']:.4f} eV",
            f"  LDOS          {a['ldos_units']}, broadened by {a['ldos_broadening_kernel']} of "
            f"width {a['ldos_broadening_eV']:.6f} eV ({_integration_rule(a)}), "
            + (
                "full float32 precision"
                if int(a["ldos_mantissa_bits"]) >= 23
                else f"rounded to {int(a['ldos_mantissa_bits'])} mantissa bits"
            ),
            "  QE energies   (eV per cell, meV per atom)",
        ]
        for term in ENERGY_TERMS:
            value = float(a[f"energy_{term}_eV"])
            lines.append(f"    {term:<13} {value:18.8f} {1000 * value / natoms:16.3f}")
        lines.append(f"  forces        max |F| = {np.linalg.norm(forces, axis=1).max():.6f} eV/A")
        lines.append("  datasets")
        points = snap.ldos_points
        if points is not None:
            lines.append(
                f"  compact       the LDOS at {len(points)} of {int(np.prod(snap.grid_shape))} "
                f"grid points (seed {a['compact_seed']}) and the DOS; from {a['compact_source']}"
            )
        for name in ("ldos", "descriptors", "density"):
            data = snap._h5.get(name)
            if data is None:
                lines.append(f"    {name:<12} absent")
                continue
            lines.append(
                f"    {name:<12} {data.shape} {data.dtype}, chunks {data.chunks}, "
                f"{data.compression or 'uncompressed'}"
            )
        params = snap.descriptor_params
        if params is not None:
            lines.append(f"  descriptor parameters {asdict(params)}")
    return "\n".join(lines)
