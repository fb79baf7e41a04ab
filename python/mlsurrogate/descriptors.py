"""SNAP bispectrum descriptors on a real-space grid.

The kernel is the C++ one in ``src/`` (also used by the LAMMPS pair style); this module
validates parameters and converts ``ase.Atoms`` to what the kernel takes.
Conventions follow LAMMPS ``compute sna/grid`` (Thompson et al., J. Comput. Phys. 285,
316 (2015)): grid point (ix, iy, iz) sits at fractional position (ix/nx, iy/ny, iz/nz)
of the cell and acts as a centre of element ``elements[0]`` with self weight 1.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, NamedTuple

import ase
import numpy as np

from mlsurrogate import _core

if TYPE_CHECKING:
    from mlsurrogate.data import Snapshot

IndexRange = Sequence[tuple[int, int]]


@dataclass(frozen=True)
class BispectrumParams:
    """Keywords of LAMMPS ``compute sna/grid``; defaults are MALA's aluminium set.

    ``radius`` and ``weight`` are a single value for every element or a mapping
    element symbol -> value. ``elements`` fixes the element order (LAMMPS atom
    type 1, 2, ...); ``None`` means the sorted chemical symbols of the structure.
    With ``chemflag`` every element is its own density channel (``chem`` keyword),
    and the grid points are centres of element ``elements[0]`` (LAMMPS type 1).
    """

    rcutfac: float = 4.67637
    rfac0: float = 0.99363
    twojmax: int = 10
    radius: float | dict[str, float] = 0.5
    weight: float | dict[str, float] = 1.0
    rmin0: float = 0.0
    switchflag: bool = True
    bzeroflag: bool = False
    quadraticflag: bool = False
    chemflag: bool = False
    bnormflag: bool = False
    wselfallflag: bool = False
    elements: tuple[str, ...] | None = field(default=None)


# The descriptor keywords, in LAMMPS order: every list of them (model attributes, CLI
# options, metadata) is derived from this one; ``elements`` is the type order, not a keyword.
DESCRIPTOR_KEYWORDS: tuple[str, ...] = tuple(
    f.name for f in fields(BispectrumParams) if f.name != "elements"
)
# keywords with one value per element (LAMMPS R_1..R_n, w_1..w_n)
PER_ELEMENT_KEYWORDS = ("radius", "weight")
# the sna/grid positional arguments; the rest are optional ``keyword value`` pairs
POSITIONAL_KEYWORDS = ("rcutfac", "rfac0", "twojmax", *PER_ELEMENT_KEYWORDS)
COINCIDENCE_DISTANCE_A = 1e-8  # atoms closer than this are one point for the kernel


def keyword_type(name: str) -> type:
    """float, int or bool: the type of a descriptor keyword's (per-element) value."""
    return type(next(f.default for f in fields(BispectrumParams) if f.name == name))


def grid_for_spacing(cell: Any, spacing: float, minimum: int = 1) -> tuple[int, int, int]:
    """Grid points along each cell vector for a target spacing h (Angstrom): the pair
    style's rule (``_core.grid_points_for_spacing``, one C++ implementation),
    n_i = floor(|a_i| / h + 0.5) rounded half up (Python's ``round`` rounds half to even),
    and at least ``minimum``."""
    h = float(spacing) if isinstance(spacing, (int, float, np.floating)) else math.nan
    if not (math.isfinite(h) and h > 0):
        raise ValueError(f"grid spacing must be a finite number > 0 Angstrom, got {spacing!r}")
    lengths = np.linalg.norm(np.asarray(cell, dtype=np.float64).reshape(3, 3), axis=1)
    return tuple(  # type: ignore[return-value]
        max(int(minimum), _core.grid_points_for_spacing(float(length), h)) for length in lengths
    )


def available_memory_bytes() -> int:
    """Physical memory not in use now (Linux sysconf)."""
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_grid_fits_memory(points: int, values_per_point: int, what: str) -> None:
    """ValueError with the estimate when ``points`` x ``values_per_point`` float64 values
    (the arrays of one grid evaluation) cannot fit in the available memory."""
    needed = int(points) * int(values_per_point) * 8
    available = available_memory_bytes()
    if needed > available:
        raise ValueError(
            f"{what}: {points} grid points x {values_per_point} values x 8 bytes = "
            f"{needed / 2**30:.1f} GiB, more than the {available / 2**30:.1f} GiB of memory "
            "available; use a coarser grid, or run the structure with `pair_style "
            "mlsurrogate` on several MPI ranks (each holds only its own grid points)"
        )


def check_positions(atoms: ase.Atoms) -> None:
    """ValueError naming the atoms when a position is NaN/inf or two atoms (periodic
    images included) are closer than COINCIDENCE_DISTANCE_A: the kernel would silently
    skip such neighbours."""
    positions = np.asarray(atoms.positions, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(positions).all(axis=1))
    if bad.size:
        raise ValueError(
            f"atoms {bad.tolist()} have non-finite (NaN or inf) positions; fix the structure "
            "(e.g. an MD step that blew up, or a damaged file)"
        )
    if len(positions) < 2:
        return
    from scipy.spatial import cKDTree

    cell = np.asarray(atoms.cell, dtype=np.float64)
    volume = abs(np.linalg.det(cell))
    if not volume > 1e-12 * max(np.abs(cell).max(), 1.0) ** 3:
        return  # a zero-volume cell: the kernel's own check names it
    fractional = np.linalg.solve(cell.T, positions.T).T
    fractional -= np.floor(fractional)
    # atoms within the coincidence distance of a cell face also get the images across it
    heights = volume / np.linalg.norm(np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1)
    near_face = fractional < 2 * COINCIDENCE_DISTANCE_A / heights
    points, owners = [fractional], [np.arange(len(positions))]
    for shift in np.ndindex(2, 2, 2):
        shift_vector = np.array(shift, dtype=bool)
        if not shift_vector.any():
            continue
        chosen = np.flatnonzero((near_face | ~shift_vector).all(axis=1))
        points.append(fractional[chosen] + shift_vector)
        owners.append(chosen)
    tree = cKDTree(np.concatenate(points) @ cell)
    owner = np.concatenate(owners)
    for first, second in sorted(tree.query_pairs(COINCIDENCE_DISTANCE_A)):
        i, j = sorted((int(owner[first]), int(owner[second])))
        if i != j:
            raise ValueError(
                f"atoms {i} and {j} coincide (closer than {COINCIDENCE_DISTANCE_A:g} A, "
                "periodic images included); remove the duplicate atom"
            )


@dataclass(frozen=True)
class ResolvedSpecies:
    """Element order and per-element settings of one structure under ``BispectrumParams``."""

    elements: tuple[str, ...]
    types: np.ndarray  # 0-based index into elements for each atom
    radius: tuple[float, ...]
    weight: tuple[float, ...]


class DescriptorGradients(NamedTuple):
    """Gradients of E = sum(beta * B) over a grid.

    ``forces`` (natoms, 3) is -dE/dR. ``strain_derivative`` (3, 3) is dE/d(eps) for a
    homogeneous deformation x -> (1 + eps) x of atoms and grid points together; the
    LAMMPS virial of this term is its negative.
    """

    forces: np.ndarray
    strain_derivative: np.ndarray


def resolve_species(atoms: ase.Atoms, params: BispectrumParams) -> ResolvedSpecies:
    """Element order (LAMMPS types 1..n), atom types and per-element radius and weight."""
    symbols = atoms.get_chemical_symbols()
    elements = (
        tuple(params.elements) if params.elements is not None else tuple(sorted(set(symbols)))
    )
    if not elements:
        raise ValueError("no elements: the structure is empty and params.elements is None")
    if len(set(elements)) != len(elements):
        raise ValueError(f"duplicate elements in params.elements: {elements}")
    unknown = sorted(set(symbols) - set(elements))
    if unknown:
        raise ValueError(f"atoms contain elements {unknown} not in params.elements {elements}")

    def per_element(value: float | dict[str, float], name: str) -> tuple[float, ...]:
        if isinstance(value, dict):
            missing = [e for e in elements if e not in value]
            if missing:
                raise ValueError(f"BispectrumParams.{name} has no value for elements {missing}")
            return tuple(float(value[e]) for e in elements)
        return (float(value),) * len(elements)

    index = {e: i for i, e in enumerate(elements)}
    types = np.array([index[s] for s in symbols], dtype=np.int32)
    return ResolvedSpecies(
        elements, types, per_element(params.radius, "radius"), per_element(params.weight, "weight")
    )


def core_settings(params: BispectrumParams, species: ResolvedSpecies) -> _core.BispectrumSettings:
    """The C++ kernel's settings; raises ValueError naming a bad keyword."""
    s = _core.BispectrumSettings()
    for name in DESCRIPTOR_KEYWORDS:
        if name in PER_ELEMENT_KEYWORDS:
            setattr(s, name, list(getattr(species, name)))
        elif name == "chemflag":  # the kernel takes the element -> channel map
            s.chem_map = list(range(len(species.elements))) if params.chemflag else []
        else:
            setattr(s, name, keyword_type(name)(getattr(params, name)))
    s.validate()
    return s


def num_descriptors(params: BispectrumParams, num_elements: int = 1) -> int:
    """Number K of descriptor components per grid point."""
    species = ResolvedSpecies(
        tuple(f"X{i}" for i in range(num_elements)),
        np.zeros(0, np.int32),
        (1.0,) * num_elements,
        (1.0,) * num_elements,
    )
    return core_settings(params, species).num_descriptors()


def _grid_shape(grid: tuple[int, int, int]) -> tuple[int, int, int]:
    shape = tuple(int(n) for n in grid)
    if len(shape) != 3 or any(n <= 0 for n in shape) or any(n != g for n, g in zip(shape, grid)):
        raise ValueError(f"grid must be three positive integers (nx, ny, nz), got {grid!r}")
    return shape  # type: ignore[return-value]


def _block(
    grid: tuple[int, int, int], index_range: IndexRange | None
) -> tuple[list[int], list[int]]:
    if index_range is None:
        return [0, 0, 0], list(grid)
    if len(index_range) != 3:
        raise ValueError(f"index_range needs three (lo, hi) pairs, got {index_range!r}")
    lo = [int(r[0]) for r in index_range]
    hi = [int(r[1]) for r in index_range]
    return lo, hi


def _periodic_cell(atoms: ase.Atoms) -> np.ndarray:
    if not all(atoms.pbc):
        raise ValueError(
            f"grid descriptors need a periodic cell in all directions, got pbc={atoms.pbc}"
        )
    return np.ascontiguousarray(atoms.cell.array, dtype=np.float64)


def _kernel_inputs(
    atoms: ase.Atoms,
    grid: tuple[int, int, int],
    params: BispectrumParams | None,
    index_range: IndexRange | None,
) -> tuple:
    """Checked arguments of the kernel: settings, cell, positions, types, shape, lo, hi."""
    params = params or BispectrumParams()
    species = resolve_species(atoms, params)
    settings = core_settings(params, species)
    shape = _grid_shape(grid)
    lo, hi = _block(shape, index_range)
    check_positions(atoms)
    return settings, _periodic_cell(atoms), atoms.positions, species.types, shape, lo, hi


def default_threads() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0))


def compute_grid_descriptors(
    atoms: ase.Atoms,
    grid: tuple[int, int, int],
    params: BispectrumParams | None = None,
    *,
    index_range: IndexRange | None = None,
    threads: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Bispectrum descriptors at every point of an nx x ny x nz grid of the cell.

    Returns float64 of shape (nx, ny, nz, K) indexed [ix, iy, iz, k], equal to LAMMPS
    ``compute sna/grid`` with the same keywords. ``index_range`` ((xlo, xhi), (ylo, yhi),
    (zlo, zhi)), half-open, restricts the result to that block of the grid.
    ``progress`` shows a progress bar over x-planes.
    """
    settings, cell, positions, types, shape, lo, hi = _kernel_inputs(
        atoms, grid, params, index_range
    )
    points = int(np.prod([max(0, h - low) for low, h in zip(lo, hi)]))
    check_grid_fits_memory(points, settings.num_descriptors(), "descriptors")
    threads = threads or default_threads()
    if not progress:
        return _core.grid_descriptors(settings, cell, positions, types, shape, lo, hi, threads)
    from tqdm import tqdm

    planes = [
        _core.grid_descriptors(
            settings,
            cell,
            positions,
            types,
            shape,
            [ix, lo[1], lo[2]],
            [ix + 1, hi[1], hi[2]],
            threads,
        )
        for ix in tqdm(range(lo[0], hi[0]), desc="descriptors", unit="plane")
    ]
    return np.concatenate(planes, axis=0)


def descriptor_gradients(
    atoms: ase.Atoms,
    grid: tuple[int, int, int],
    params: BispectrumParams | None,
    beta: np.ndarray,
    *,
    index_range: IndexRange | None = None,
    threads: int | None = None,
) -> DescriptorGradients:
    """Forces and strain derivative of E = sum(beta * B) by the adjoint (no dB/dR stored).

    ``beta`` = dE/dB has the shape of :func:`compute_grid_descriptors`' result.
    """
    beta = np.asarray(beta)
    if beta.dtype.kind not in "fiu":
        raise ValueError(f"beta must be a real array, got dtype {beta.dtype}")
    grad, strain = _core.grid_descriptor_gradient(
        *_kernel_inputs(atoms, grid, params, index_range), beta, threads or default_threads()
    )
    return DescriptorGradients(forces=-grad, strain_derivative=strain)


def partition_to_atoms(
    atoms: ase.Atoms,
    grid: tuple[int, int, int],
    params: BispectrumParams | None,
    values: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Shares of per-point ``values`` [nx, ny, nz, width] among the atoms (natoms, width)
    by Becke's fuzzy Voronoi cells over the atoms within the descriptor cutoff, and the
    sums (width,) of points with no atom that close (the pair style's per-atom rule)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 4:
        raise ValueError(f"values must be [nx, ny, nz, width], got shape {values.shape}")
    return _core.grid_partition(*_kernel_inputs(atoms, grid, params, None), values)


def descriptor_forces(
    atoms: ase.Atoms,
    grid: tuple[int, int, int],
    params: BispectrumParams | None,
    beta: np.ndarray,
    *,
    threads: int | None = None,
) -> np.ndarray:
    """Forces -d(sum(beta * B))/dR, shape (natoms, 3), eV/Angstrom if beta is in eV."""
    return descriptor_gradients(atoms, grid, params, beta, threads=threads).forces


def snapshot_descriptors(snapshot: Snapshot, params: BispectrumParams) -> Any:
    """A snapshot's descriptors under ``params``, float32, indexable by x-plane: the
    stored dataset (read lazily) when it was computed with ``params``, else computed now
    on the snapshot's grid. The one rule every reader of training data follows."""
    stored = snapshot.descriptors
    if stored is None:
        return compute_grid_descriptors(snapshot.atoms, snapshot.grid_shape, params).astype(
            np.float32
        )
    stored_params = snapshot.descriptor_params

    def explicit(values: BispectrumParams) -> BispectrumParams:
        # elements None means the structure's own, sorted (resolve_species)
        if values.elements is not None:
            return values
        species = resolve_species(snapshot.atoms, values)
        return replace(values, elements=species.elements)

    if explicit(stored_params) != explicit(params):
        raise ValueError(
            f"{snapshot.path}: its descriptors were computed with {stored_params}, the model "
            f"uses {params}; run `mlsurrogate data descriptors` with the model's parameters"
        )
    return stored
