"""Ingest: one finished QE run (pw.x SCF + pp.x LDOS) -> one snapshot file.

The run's files are recognised by content, whatever their names
(:mod:`mlsurrogate.qe.discover`; docs/qe-ingest.md). The LDOS comes from pp.x's cubes or
from a MALA-layout array (``mala_ldos``). The snapshot layout is docs/snapshot-format.md.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import replace
from pathlib import Path

import ase
import numpy as np

from mlsurrogate.descriptors import BispectrumParams
from mlsurrogate.files import check_output_path
from mlsurrogate.qe.discover import RunDirectory, RunFiles
from mlsurrogate.qe.errors import QEError
from mlsurrogate.qe.ldos import FERMI_DIRAC, GAUSSIAN, kernel_values, read_ldos_file
from mlsurrogate.qe.readers import (
    Cube,
    LdosEnergyGrid,
    PwResult,
    electronic_temperature_k,
    read_cube,
    read_mala_ldos,
    read_pw_output,
    read_pw_xml,
    read_upf,
    read_upf_core_density,
)
from mlsurrogate.qe.settings import BROADENING_KERNELS
from mlsurrogate.units import BOHR_ANGSTROM, RYDBERG_EV

_LDOS_TO_EV_ANGSTROM = 1.0 / (RYDBERG_EV * BOHR_ANGSTROM**3)  # 1/(Ry bohr^3) -> 1/(eV A^3)
_DENSITY_TO_ANGSTROM = 1.0 / BOHR_ANGSTROM**3
# pp.x sums the kernel over the eigenvalues, so the DOS of the right kernel matches the
# broadened eigenvalues to round-off (relative L1 misfit 5e-8 measured on 4-atom Al at a
# 0.1 eV width); the other kernel of the same width misses by 0.16.
_KERNEL_FIT_TOLERANCE = 0.02


class ApproximateIntegrationWarning(UserWarning):
    """The snapshot's LDOS broadening makes the energy integrals approximate."""


class NonSelfConsistentLdosWarning(UserWarning):
    """The LDOS comes from another k-grid than the SCF's energies: a label at odds with
    itself (the functional assumes the LDOS's eigenvalues are of its own density)."""


def _check_cube_geometry(cube: Cube, path: Path, reference: Cube, reference_path: Path) -> None:
    if cube.data.shape != reference.data.shape:
        raise QEError(
            f"{path}: grid {cube.data.shape} differs from {reference_path} ({reference.data.shape})"
        )
    if not np.allclose(cube.voxel, reference.voxel, atol=1e-5):
        raise QEError(f"{path}: cell differs from {reference_path}")


def _check_cube_matches_run(cube: Cube, path: Path, run: PwResult) -> None:
    cell_bohr = run.cell / BOHR_ANGSTROM
    if tuple(cube.data.shape) != tuple(run.fft_grid):
        raise QEError(f"{path}: grid {cube.data.shape} differs from pw.x's FFT grid {run.fft_grid}")
    if not np.allclose(cube.cell, cell_bohr, atol=1e-4):
        raise QEError(f"{path}: cell differs from the pw.x run's cell (another run's cube?)")
    if len(cube.numbers) != len(run.symbols):
        raise QEError(f"{path}: {len(cube.numbers)} atoms, the pw.x run has {len(run.symbols)}")
    frac = (cube.positions - run.positions / BOHR_ANGSTROM) @ np.linalg.inv(cell_bohr)
    if np.abs(frac - np.round(frac)).max() > 1e-4:
        raise QEError(f"{path}: atom positions differ from the pw.x run (another run's cube?)")


def _broadening_kernel(
    stated: str,
    eigenvalues: np.ndarray,
    kweights: np.ndarray,
    energies: np.ndarray,
    dos: np.ndarray,
    width: float,
    source: str,
) -> str:
    """The kernel the LDOS was really broadened with, told apart by content.

    pp.x 6.7 takes the kernel from the SCF smearing in the XML (``stated``), but an XML
    edited before pp.x ran, or another tool, may differ: the DOS over the window is
    compared with the eigenvalues broadened by the Fermi-Dirac and the Gaussian kernel.
    """
    if stated not in (FERMI_DIRAC, GAUSSIAN):
        return stated
    x = (energies[:, None, None] - eigenvalues[None]) / width
    residual = {}
    for kernel in (FERMI_DIRAC, GAUSSIAN):
        expected = np.einsum("ekn,k->e", kernel_values(kernel, x), kweights) / width
        residual[kernel] = float(np.abs(dos - expected).sum() / np.abs(expected).sum())
    best = min(residual, key=residual.__getitem__)
    if residual[best] > _KERNEL_FIT_TOLERANCE:
        raise QEError(
            f"{source}: the LDOS matches neither a Fermi-Dirac nor a Gaussian broadening of "
            f"the eigenvalues with width {width} eV (relative misfit "
            f"{residual[FERMI_DIRAC]:.3f} and {residual[GAUSSIAN]:.3f}): LDOS and pw.x "
            "XML of different runs, or a wrong degauss_ldos in the pp.x input?"
        )
    return best


def _read_ldos_cubes(cubes: list[Path], run: PwResult, progress: bool) -> tuple[np.ndarray, Cube]:
    """The LDOS [nx, ny, nz, nE] in 1/(eV A^3) from cubes in energy order, and the first
    cube (the geometry reference)."""
    from tqdm import tqdm

    first = read_cube(cubes[0])
    _check_cube_matches_run(first, cubes[0], run)
    ldos = np.empty((*first.data.shape, len(cubes)), dtype=np.float32)
    for index, path in enumerate(tqdm(cubes, desc="reading LDOS cubes", disable=not progress)):
        cube = first if index == 0 else read_cube(path)
        _check_cube_geometry(cube, path, first, cubes[0])
        ldos[..., index] = cube.data * _LDOS_TO_EV_ANGSTROM
    return ldos, first


def _check_energy_count(count: int, files: RunFiles, source: str) -> None:
    grid = files.energy_grid
    allowed = {grid.count, grid.count - 1} if grid.count_is_ambiguous else {grid.count}
    if count not in allowed:
        raise QEError(
            f"{source}: {count} energies, but the energy grid of "
            f"{files.ldos_input or 'the cube headers'} has "
            f"{grid.count}"
        )


def _estimate_integration_error(path: Path) -> float:
    """A from the snapshot's own LDOS minus QE's total energy, meV/atom."""
    from mlsurrogate.evaluate import evaluate_dft

    rows, natoms = evaluate_dft(path)
    total = next(row for row in rows if row.name == "total free energy A")
    return 1000.0 * (total.ours - total.qe) / natoms


def ingest(
    directory: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    pw_out: str | os.PathLike[str] | None = None,
    xml: str | os.PathLike[str] | None = None,
    ldos: str | None = None,
    ldos_input: str | os.PathLike[str] | None = None,
    density: str | os.PathLike[str] | None = None,
    mala_ldos: str | os.PathLike[str] | None = None,
    descriptor_params: BispectrumParams | None = None,
    ldos_mantissa_bits: int = 23,
    threads: int | None = None,
    progress: bool = True,
) -> Path:
    """Turn the QE run in ``directory`` into one snapshot file ``output``.

    The files are found by content (:func:`mlsurrogate.qe.discover.find_run_files`);
    ``pw_out``, ``xml``, ``ldos`` (a glob), ``ldos_input`` (the pp.x input) and
    ``density`` name them instead, relative to ``directory`` unless absolute.
    ``mala_ldos`` is a MALA-layout ``.npy`` [nx, ny, nz, nE] in 1/(eV A^3) used instead of
    cubes. ``descriptor_params`` None stores no descriptors (add them later with
    :func:`mlsurrogate.data.add_descriptors`). ``ldos_mantissa_bits`` < 23 rounds the
    stored LDOS (see :func:`mlsurrogate.data.round_mantissa`); the default keeps it exact.
    An LDOS whose energy integrals are approximate (a broadening other than -f' of width
    k_B T) gives an :class:`ApproximateIntegrationWarning` with the free-energy error
    measured on this run.
    """
    from mlsurrogate.data import round_mantissa, write_snapshot
    from mlsurrogate.descriptors import compute_grid_descriptors

    output = check_output_path(output)
    directory = Path(directory)
    found = RunDirectory(directory)
    pw_path, xml_path = found.scf_files(pw_out, xml)
    printed = read_pw_output(pw_path)
    run = read_pw_xml(xml_path)
    if not run.converged:
        raise QEError(f"{xml_path}: the SCF did not converge; this run cannot be used")
    for term in ("total", "one_electron", "hartree", "xc", "ewald", "smearing"):
        if abs(printed[term] - run.energies[term]) > 1e-6 * RYDBERG_EV:
            raise QEError(
                f"{pw_path} and {xml_path} disagree on the {term} energy "
                f"({printed[term]:.8f} vs {run.energies[term]:.8f} eV): files of different "
                "runs? Name the right ones with --pw-out and --xml"
            )
    computed_path = found.ldos_file() if ldos is None and mala_ldos is None else None
    if computed_path is None:
        input_path, grid, cubes = found.ldos_files(ldos, ldos_input, mala_ldos is None)
    else:
        computed = read_ldos_file(computed_path)
        spacing = float(computed.energies[1] - computed.energies[0])
        input_path, cubes = computed_path, []
        grid = LdosEnergyGrid(
            emin=float(computed.energies[0]),
            emax=float(computed.energies[-1]),
            spacing=spacing,
            width=computed.width,
            filplot="",
            fileout="",
        )
    files = RunFiles(
        pw_output=pw_path,
        xml=xml_path,
        ldos_input=input_path,
        energy_grid=grid,
        ldos_cubes=cubes,
        density=found.density_file(run.nelec, density),
    )
    stated_kernel = BROADENING_KERNELS.get(run.smearing.lower())
    if stated_kernel is None:
        raise QEError(f"{files.xml}: smearing {run.smearing!r} unknown; LDOS kernel undefined")
    upf_paths = {
        s: Path(run.pseudo_dir) / f if (Path(run.pseudo_dir) / f).is_file() else directory / f
        for s, f in run.pseudopotentials.items()
    }
    upf = {s: read_upf(p) for s, p in upf_paths.items()}
    core_densities = {
        s: read_upf_core_density(upf_paths[s]) for s, u in upf.items() if u.core_correction
    }
    nval = sum(upf[s].z_valence for s in run.symbols)
    if abs(nval - run.nelec) > 1e-6:
        raise QEError(
            f"{files.xml}: {run.nelec} electrons, but the UPF valence charges sum to {nval}: "
            "charged cells are not supported"
        )

    # the k-set the LDOS was made on: the SCF's, or the LDOS file's own (a denser grid)
    ldos_kset = run
    if computed_path is not None:
        ldos_source = str(computed_path)
        _check_energy_count(computed.ldos.shape[3], files, ldos_source)
        ldos_array, first = computed.ldos, None
        if computed.ldos.shape[:3] != tuple(run.fft_grid):
            raise QEError(
                f"{computed_path}: grid {computed.ldos.shape[:3]} differs from pw.x's FFT "
                f"grid {run.fft_grid} (another run's LDOS?)"
            )
        ldos_kset = replace(
            run,
            eigenvalues=computed.eigenvalues,
            kweights=computed.kweights,
            kpoint_grid=computed.kpoint_grid,
        )
    elif mala_ldos is None:
        ldos_source = str(files.ldos_cubes[0].parent)
        _check_energy_count(len(files.ldos_cubes), files, ldos_source)
        ldos_array, first = _read_ldos_cubes(files.ldos_cubes, run, progress)
    else:
        ldos_source = str(mala_ldos)
        ldos_array = read_mala_ldos(mala_ldos, tuple(run.fft_grid))
        _check_energy_count(ldos_array.shape[3], files, ldos_source)
        first = None
    energies = grid.emin + grid.spacing * np.arange(ldos_array.shape[3])
    ldos_kset.check_ldos_window(float(energies[0]), float(energies[-1]), grid.width)
    volume = abs(float(np.linalg.det(run.cell)))
    dos = ldos_array.reshape(-1, ldos_array.shape[3]).sum(0, dtype=np.float64) * (
        volume / ldos_array[..., 0].size
    )
    kernel = _broadening_kernel(
        stated_kernel,
        ldos_kset.eigenvalues,
        ldos_kset.kweights,
        energies,
        dos,
        grid.width,
        ldos_source,
    )
    if ldos_mantissa_bits < 23:
        ldos_array = round_mantissa(ldos_array, ldos_mantissa_bits)

    density_grid = None
    if files.density is not None:
        cube = read_cube(files.density)
        if first is None:
            _check_cube_matches_run(cube, files.density, run)
        else:
            _check_cube_geometry(cube, files.density, first, files.ldos_cubes[0])
        density_grid = cube.data * _DENSITY_TO_ANGSTROM

    atoms = ase.Atoms(run.symbols, positions=run.positions, cell=run.cell, pbc=True)
    descriptors = None
    if descriptor_params is not None:
        descriptors = compute_grid_descriptors(
            atoms, ldos_array.shape[:3], descriptor_params, threads=threads, progress=progress
        )
    temperature = electronic_temperature_k(run.degauss)
    attributes = {
        "energy_min_eV": float(grid.emin),
        "energy_spacing_eV": float(grid.spacing),
        "ldos_units": "1/(eV*Angstrom^3)",
        "ldos_broadening_kernel": kernel,
        "ldos_broadening_eV": float(grid.width),
        "ldos_mantissa_bits": int(ldos_mantissa_bits),
        "electronic_temperature_K": temperature,
        "smearing": run.smearing,
        "smearing_width_eV": run.degauss,
        "fermi_energy_eV": run.fermi_energy,
        "num_valence_electrons": float(nval),
        "valence_charges": {s: u.z_valence for s, u in upf.items()},
        "masses": run.masses,
        "pseudopotentials": run.pseudopotentials,
        "core_correction": {s: u.core_correction for s, u in upf.items()},
        "xc_functional": run.functional,
        "ecutwfc_eV": run.ecutwfc,
        "ecutrho_eV": run.ecutrho,
        "kpoint_grid": np.array(run.kpoint_grid, dtype=np.int64),
        "ldos_kpoint_grid": np.array(ldos_kset.kpoint_grid, dtype=np.int64),
        "qe_version": f"Quantum ESPRESSO {run.qe_version}",
        "source": str(directory.resolve()),
        **{f"energy_{term}_eV": value for term, value in run.energies.items()},
        "energy_band_eV": run.band_energy,
    }
    reference = {
        "forces": run.forces,
        "stress": run.stress,
        "eigenvalues": run.eigenvalues,
        "occupations": run.occupations,
        "kweights": run.kweights,
    }
    path = write_snapshot(
        output,
        atoms=atoms,
        energies=energies,
        ldos=ldos_array,
        reference=reference,
        attributes=attributes,
        density=density_grid,
        descriptors=descriptors,
        descriptor_params=descriptor_params,
        core_densities=core_densities,
    )
    from mlsurrogate.physics import exact_energy_integrals

    def measured() -> str:
        try:
            error = _estimate_integration_error(path)
            return f"differs from QE's total energy by {error:+.2f} meV/atom"
        except ValueError as exc:  # e.g. a window without mu: no free energy to compare
            return f"cannot be compared with QE's total energy ({exc})"

    if tuple(ldos_kset.kpoint_grid) != tuple(run.kpoint_grid):
        warnings.warn(
            f"{path}: the LDOS is of a non-self-consistent run on a {ldos_kset.kpoint_grid} "
            f"k-grid, the energies and forces of the SCF's {run.kpoint_grid}: the free energy "
            f"from this LDOS {measured()}; as a training label that contradicts itself: run "
            "the SCF on the dense grid instead (docs/qe-ingest.md)",
            NonSelfConsistentLdosWarning,
            stacklevel=2,
        )
    if not exact_energy_integrals(temperature, kernel, grid.width):
        warnings.warn(
            f"{path}: LDOS broadened by {kernel} of width {grid.width} eV, not -f' of width "
            f"k_B T: the energy integrals are approximate; on this run the free energy from "
            f"its LDOS {measured()} (docs/qe-ingest.md)",
            ApproximateIntegrationWarning,
            stacklevel=2,
        )
    return path
