"""The LDOS of a finished pw.x run from its wavefunctions, every energy in one pass.

pp.x (plot_num = 3) rereads and Fourier-transforms every band at every k-point once per
energy of the grid. Here each band is transformed once:

    LDOS(r, E) = sum_k w_k sum_n g((E - e_nk) / sigma) / sigma |psi_nk(r)|^2

with w_k the k-point weights (summing to 2, the spin degeneracy), g pp.x's broadening
kernel of unit width (QE's ``w0gauss``) and psi_nk(r) = 1/sqrt(Omega) sum_G c_G
exp(i (k + G) r) on pw.x's FFT grid; the energy sum is one matrix product per k-point
(|psi|^2 [points, bands] x weights [bands, energies]). Same quantity and units as
pp.x's cubes after ingest's conversion: states / (eV A^3).

Norm-conserving pseudopotentials only (ultrasoft and PAW add augmentation charges), and
k-points that need no symmetrisation: pw.x runs with ``nosym`` (time reversal is fine:
|psi_-k|^2 = |psi_k|^2) or structures without symmetry.

The result goes to an ``ldos.h5`` file in the run directory that ingest recognises by
its ``format`` attribute; it also holds the eigenvalues and k-weights it was made from,
so that ingest can check the broadening and the window against the very k-set used
(the LDOS k-grid may be denser than the SCF's: :mod:`mlsurrogate.qe.run`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlsurrogate.files import atomic_output
from mlsurrogate.qe.errors import QEError
from mlsurrogate.qe.readers import PwResult, read_pw_xml, read_upf
from mlsurrogate.qe.wavefunctions import read_wavefunctions

LDOS_FILE = "ldos.h5"
LDOS_FORMAT = "mlsurrogate-ldos-1"
FERMI_DIRAC = "fermi-dirac-derivative"
GAUSSIAN = "gaussian"
# Bands transformed together: bounds the complex work array at this many grid values.
_BATCH_VALUES = 2**24


def kernel_values(kernel: str, x: np.ndarray) -> np.ndarray:
    """pp.x's broadening kernels of unit width (QE's w0gauss for ngauss -99 and 0)."""
    if kernel == FERMI_DIRAC:
        return 1.0 / (2.0 + np.exp(-np.abs(x)) + np.exp(np.abs(x)))
    if kernel == GAUSSIAN:
        return np.exp(-x * x) / math.sqrt(math.pi)
    raise QEError(f"LDOS broadening kernel {kernel!r}: only {FERMI_DIRAC} and {GAUSSIAN}")


@dataclass(frozen=True)
class LdosFile:
    """An LDOS computed from wavefunctions and the k-set it was computed on."""

    ldos: np.ndarray  # (n1, n2, n3, nE) float32, 1/(eV A^3), grid order [i1, i2, i3]
    energies: np.ndarray  # (nE,) eV, absolute (QE's zero), evenly spaced
    width: float  # eV
    kernel: str
    eigenvalues: np.ndarray  # (nk, nbnd) eV
    kweights: np.ndarray  # (nk,), sum 2
    kpoint_grid: tuple[int, int, int]


def require_norm_conserving(pseudopotentials: dict[str, Path]) -> None:
    """QEError unless every pseudopotential (element -> UPF path) is norm-conserving."""
    for species, path in pseudopotentials.items():
        if not read_upf(path).norm_conserving:
            raise QEError(
                f"{path}: {species} is ultrasoft or PAW; the LDOS from wavefunctions needs "
                "norm-conserving pseudopotentials: use ldos_program 'pp.x'"
            )


def check_supported(run: PwResult, kernel: str, xml: Path) -> None:
    """QEError unless the LDOS of the pw.x run of ``xml`` can be made from its
    wavefunctions with ``kernel``: norm-conserving pseudopotentials, no k-point symmetry."""
    if kernel not in (FERMI_DIRAC, GAUSSIAN):
        raise QEError(
            f"{xml}: smearing {run.smearing!r} ({kernel}): the LDOS from wavefunctions "
            "broadens with the Fermi-Dirac or Gaussian kernel; use smearing 'fd' or "
            "'gaussian', or ldos_program 'pp.x'"
        )
    require_norm_conserving(
        {
            s: p if (p := Path(run.pseudo_dir) / name).is_file() else xml.parent / name
            for s, name in run.pseudopotentials.items()
        }
    )
    if run.symmetry_count > 1:
        raise QEError(
            f"{xml}: pw.x reduced the k-points with {run.symmetry_count} symmetries; the "
            "LDOS from wavefunctions needs the unreduced set: rerun pw.x (nscf) with "
            "nosym = .true."
        )


def compute_ldos(
    save_dir: str | os.PathLike[str],
    energies: np.ndarray,
    width: float,
    kernel: str,
    *,
    progress: bool = True,
) -> LdosFile:
    """The LDOS at ``energies`` (eV) broadened by ``kernel`` of ``width`` (eV) from the
    wavefunctions in ``save_dir`` (a pw.x ``<prefix>.save`` directory)."""
    from tqdm import tqdm

    save_dir = Path(save_dir)
    xml = save_dir / "data-file-schema.xml"
    run = read_pw_xml(xml)
    check_supported(run, kernel, xml)
    nk = len(run.kweights)
    files = [save_dir / f"wfc{k + 1}.dat" for k in range(nk)]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise QEError(
            f"{save_dir}: {len(missing)} of {nk} wavefunction files missing ({missing[0]}, "
            "...): pw.x wrote none (disk_io = 'none'?) or an HDF5 build wrote wfc*.hdf5"
        )
    grid = tuple(run.fft_grid)
    points = math.prod(grid)
    volume = abs(float(np.linalg.det(run.cell)))
    energies = np.asarray(energies, dtype=np.float64)
    ldos = np.zeros((points, len(energies)), dtype=np.float64)
    bar = tqdm(files, desc="LDOS from wavefunctions", unit="k", disable=not progress)
    for k, path in enumerate(bar):
        wfc = read_wavefunctions(path)
        nbnd = wfc.coefficients.shape[0]
        if nbnd != run.eigenvalues.shape[1]:
            raise QEError(f"{path}: {nbnd} bands, the XML has {run.eigenvalues.shape[1]}")
        x = (energies[None, :] - run.eigenvalues[k][:, None]) / width
        band_weights = run.kweights[k] * kernel_values(kernel, x) / width  # [nbnd, nE]
        index = tuple((wfc.miller % np.array(grid)).T)
        batch = max(1, _BATCH_VALUES // points)
        for start in range(0, nbnd, batch):
            bands = slice(start, min(nbnd, start + batch))
            box = np.zeros((bands.stop - start, *grid), dtype=np.complex128)
            box[(slice(None), *index)] = wfc.coefficients[bands]
            psi = np.fft.ifftn(box, axes=(1, 2, 3)).reshape(bands.stop - start, points)
            # |psi(r)|^2 = N^2 / Omega |ifftn(c)|^2 (numpy's ifftn carries 1/N)
            density = (psi.real**2 + psi.imag**2) * (points**2 / volume)
            ldos += density.T @ band_weights[bands]
    return LdosFile(
        ldos=ldos.reshape(*grid, len(energies)).astype(np.float32),
        energies=energies,
        width=float(width),
        kernel=kernel,
        eigenvalues=run.eigenvalues,
        kweights=run.kweights,
        kpoint_grid=tuple(run.kpoint_grid),
    )


def write_ldos_file(path: str | os.PathLike[str], result: LdosFile) -> Path:
    """Write ``result`` atomically (see :func:`read_ldos_file` for the layout)."""
    import h5py

    with atomic_output(path) as tmp:
        with h5py.File(tmp, "w") as h5:
            h5.attrs["format"] = LDOS_FORMAT
            h5.attrs["broadening_eV"] = result.width
            h5.attrs["broadening_kernel"] = result.kernel
            h5.attrs["kpoint_grid"] = np.array(result.kpoint_grid, dtype=np.int64)
            h5.attrs["ldos_units"] = "1/(eV*Angstrom^3)"
            h5["ldos"] = result.ldos
            h5["energies"] = result.energies
            h5["eigenvalues"] = result.eigenvalues
            h5["kweights"] = result.kweights
    return Path(path)


def is_ldos_file(path: str | os.PathLike[str]) -> bool:
    """An HDF5 file written by :func:`write_ldos_file` (checked by content)."""
    import h5py

    try:
        with open(path, "rb") as handle:
            if handle.read(8) != b"\x89HDF\r\n\x1a\n":
                return False
        with h5py.File(path, "r") as h5:
            return h5.attrs.get("format") == LDOS_FORMAT
    except OSError:
        return False


def read_ldos_file(path: str | os.PathLike[str]) -> LdosFile:
    """Read an ``ldos.h5``: attributes ``format``, ``broadening_eV``, ``broadening_kernel``,
    ``kpoint_grid``; datasets ``ldos`` [n1, n2, n3, nE], ``energies``, ``eigenvalues``
    [nk, nbnd], ``kweights``."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            return LdosFile(
                ldos=h5["ldos"][()],
                energies=h5["energies"][()],
                width=float(h5.attrs["broadening_eV"]),
                kernel=str(h5.attrs["broadening_kernel"]),
                eigenvalues=h5["eigenvalues"][()],
                kweights=h5["kweights"][()],
                kpoint_grid=tuple(int(k) for k in h5.attrs["kpoint_grid"]),
            )
    except (OSError, KeyError) as exc:
        raise QEError(f"{path}: not a readable LDOS file ({exc})") from exc
