"""pw.x's wavefunction files ``<prefix>.save/wfc<k>.dat`` (QE >= 6.2, binary).

Each file is one k-point, written by QE's ``Modules/io_base.f90`` (``write_wfc``) as
Fortran sequential unformatted records (a 4-byte length before and after each record):

1. ``ik`` (int32), ``xk(3)`` (float64, Cartesian, 2 pi / alat), ``ispin`` (int32),
   ``gamma_only`` (int32 logical), ``scalef`` (float64)
2. ``ngw``, ``igwx``, ``npol``, ``nbnd`` (int32)
3. the reciprocal vectors ``b1, b2, b3`` (float64, 2 pi / alat)
4. Miller indices of the plane waves (int32, [igwx, 3])
5. one record per band: the coefficients (complex128, [npol * igwx]), normalised so
   that sum |c_G|^2 = 1

QE built with HDF5 writes ``wfc<k>.hdf5`` instead; that layout is not read here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlsurrogate.qe.errors import QEError


@dataclass(frozen=True)
class KPointWavefunctions:
    """The plane-wave coefficients of every band at one k-point."""

    miller: np.ndarray  # (npw, 3) int, the G vectors in units of b1, b2, b3
    coefficients: np.ndarray  # (nbnd, npw) complex128


def _records(data: bytes, path: Path) -> list[bytes]:
    records = []
    offset = 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise QEError(f"{path}: truncated Fortran record marker at byte {offset}")
        length = int(np.frombuffer(data, "<i4", 1, offset)[0])
        end = offset + 4 + length
        if length < 0 or end + 4 > len(data):
            raise QEError(f"{path}: truncated record at byte {offset}; an incomplete pw.x run?")
        if int(np.frombuffer(data, "<i4", 1, end)[0]) != length:
            raise QEError(f"{path}: record markers disagree at byte {offset}: not a wfc file")
        records.append(data[offset + 4 : end])
        offset = end + 4
    return records


def read_wavefunctions(path: str | os.PathLike[str]) -> KPointWavefunctions:
    """Read one ``wfc<k>.dat`` (layout in the module docstring)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise QEError(f"{path}: cannot read the wavefunction file ({exc})") from exc
    records = _records(data, path)
    if len(records) < 4 or len(records[0]) != 44 or len(records[1]) != 16:
        raise QEError(f"{path}: not a pw.x binary wavefunction file (QE >= 6.2)")
    gamma_only = int(np.frombuffer(records[0], "<i4", 1, 32)[0]) != 0
    _, igwx, npol, nbnd = (int(x) for x in np.frombuffer(records[1], "<i4"))
    if gamma_only:
        raise QEError(
            f"{path}: gamma-only wavefunctions (half the G sphere) are not supported; run "
            "pw.x with K_POINTS automatic instead of K_POINTS gamma"
        )
    if npol != 1:
        raise QEError(f"{path}: noncollinear wavefunctions (npol = {npol}) are not supported")
    if len(records) != 4 + nbnd or len(records[3]) != 12 * igwx:
        raise QEError(
            f"{path}: {len(records) - 4} band records for {nbnd} bands or a wrong Miller index "
            "record: a truncated or foreign file"
        )
    miller = np.frombuffer(records[3], "<i4").reshape(igwx, 3).astype(np.int64)
    coefficients = np.empty((nbnd, igwx), dtype=np.complex128)
    for band, record in enumerate(records[4:]):
        if len(record) != 16 * igwx:
            raise QEError(f"{path}: band {band + 1} has {len(record)} bytes, not {16 * igwx}")
        coefficients[band] = np.frombuffer(record, "<c16")
    return KPointWavefunctions(miller=miller, coefficients=coefficients)
