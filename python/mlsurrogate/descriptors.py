"""SNAP bispectrum descriptors on a real-space grid.

The kernel is the C++ one in ``src/`` (also used by the LAMMPS pair style); this module
validates parameters and converts ``ase.Atoms`` to what the kernel takes.
Conventions follow LAMMPS ``compute sna/grid`` (Thompson et al., J. Comput. Phys. 285,
316 (2015)): grid point (ix, iy, iz) sits at fractional position (ix/nx, iy/ny, iz/nz)
of the cell and acts as a centre of element ``elements[0]`` with self weight 1.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import ase
import numpy as np

from mlsurrogate import _core

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
    s.rcutfac = float(params.rcutfac)
    s.rfac0 = float(params.rfac0)
    s.twojmax = int(params.twojmax)
    s.radius = list(species.radius)
    s.weight = list(species.weight)
    s.rmin0 = float(params.rmin0)
    s.switchflag = bool(params.switchflag)
    s.bzeroflag = bool(params.bzeroflag)
    s.quadraticflag = bool(params.quadraticflag)
    s.bnormflag = bool(params.bnormflag)
    s.wselfallflag = bool(params.wselfallflag)
    s.chem_map = list(range(len(species.elements))) if params.chemflag else []
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


def grid_for_spacing(cell: np.ndarray, spacing: float) -> tuple[int, int, int]:
    """Grid points along each cell vector for a target spacing (A): round half up,
    n = max(1, floor(|a_i| / h + 0.5)), the rule of the pair style's ``spacing``."""
    lengths = np.linalg.norm(np.asarray(cell, dtype=float), axis=1)
    return tuple(max(1, int(np.floor(length / spacing + 0.5))) for length in lengths)


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


def lammps_sna_grid(
    atoms: ase.Atoms, grid: tuple[int, int, int], params: BispectrumParams | None = None
) -> np.ndarray:
    """The same descriptors from LAMMPS ``compute sna/grid`` (reference for tests)."""
    from mlsurrogate.lammps_reference import lammps_sna_grid as reference

    return reference(atoms, _grid_shape(grid), params or BispectrumParams())
