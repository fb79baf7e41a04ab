"""The bundled aluminium dataset (data/al_fcc4_933K, made by data/make_al_dataset.py).

Physics checks against QE's own numbers in each snapshot: the LDOS counts the states
of the eigenvalues, re-solving the Fermi level on it gives back N_val near QE's E_F,
and the density from the LDOS equals QE's density cube.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mlsurrogate.data import REQUIRED_ATTRIBUTES, Snapshot

DATA = Path(__file__).resolve().parents[1] / "data" / "al_fcc4_933K"
SNAPSHOTS = sorted(DATA.glob("snapshot_*.h5"))


def test_dataset_is_complete_and_small():
    assert len(SNAPSHOTS) >= 10
    size = sum(p.stat().st_size for p in DATA.iterdir())
    assert size <= 25e6, f"bundled data is {size / 1e6:.1f} MB"
    displacements = []
    for path in SNAPSHOTS:
        with Snapshot(path) as snap:
            atoms = snap.atoms
            ideal = np.array([[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]]) * 4.05
            d = atoms.positions - ideal
            d -= np.round(d / 4.05) * 4.05
            displacements.append(np.sqrt(np.mean(d**2)))
    # thermal displacements of 300..1000 K: about 0.1 to 0.2 A per component
    assert 0.05 < min(displacements) < 0.13 and 0.13 < max(displacements) < 0.3


def fermi_cdf(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def occupied_integral(values: np.ndarray, energies: np.ndarray, mu: float) -> np.ndarray:
    """Integral from the window start to mu of samples on the energy grid (last axis),
    piecewise linear between samples (the broadened LDOS is smooth on the grid's scale)."""
    step = energies[1] - energies[0]
    k = int(np.searchsorted(energies, mu)) - 1
    t = (mu - energies[k]) / step
    weights = np.zeros(len(energies))
    weights[: k + 1] = step
    weights[0] -= step / 2
    weights[k] -= step / 2
    weights[k] += step * t * (1 - t / 2)
    weights[k + 1] += step * t * t / 2
    return values @ weights


@pytest.mark.parametrize("path", SNAPSHOTS, ids=lambda p: p.stem)
def test_snapshot_physics(path):
    with Snapshot(path) as snap:
        attrs = snap.attrs
        assert set(REQUIRED_ATTRIBUTES) <= set(attrs)
        assert attrs["electronic_temperature_K"] == pytest.approx(933.0, rel=1e-9)
        assert attrs["ldos_broadening_kernel"] == "fermi-dirac-derivative"
        kt = attrs["electronic_temperature_K"] * 8.617333262e-5
        assert attrs["ldos_broadening_eV"] == pytest.approx(kt, rel=1e-9)
        energies = snap.energies
        fermi = attrs["fermi_energy_eV"]
        assert energies[0] < snap.reference("eigenvalues").min() - 0.5
        assert energies[-1] >= fermi + 3.0
        ldos = snap.ldos[()].astype(np.float64)
        npts, volume = ldos[..., 0].size, snap.atoms.get_volume()
        dos = ldos.reshape(npts, -1).sum(axis=0) * volume / npts
        eig, w = snap.reference("eigenvalues"), snap.reference("kweights")

        # states in the window: plain count of eigenvalues (issue bound 1%) and the
        # count broadened by the same kernel (much tighter)
        inside = np.sum(w[:, None] * ((eig >= energies[0]) & (eig <= energies[-1])))
        width = attrs["ldos_broadening_eV"]
        broadened = np.sum(
            w[:, None]
            * (fermi_cdf((energies[-1] - eig) / width) - fermi_cdf((energies[0] - eig) / width))
        )
        total = np.trapezoid(dos, energies)
        assert total == pytest.approx(inside, rel=0.01)
        assert total == pytest.approx(broadened, rel=1e-3)

        # Fermi level re-solved on the LDOS: with the kernel -f' of width k_B T,
        # N(mu) = integral_{-inf}^{mu} D exactly (docs/energy-functional.md).
        nval = attrs["num_valence_electrons"]
        lo, hi = energies[1], energies[-2]
        for _ in range(60):
            mu = 0.5 * (lo + hi)
            lo, hi = (mu, hi) if occupied_integral(dos, energies, mu) < nval else (lo, mu)
        assert occupied_integral(dos, energies, mu) == pytest.approx(nval, rel=1e-9)
        assert mu == pytest.approx(fermi, abs=0.02)

        # the density from the LDOS is QE's density cube (both in 1/A^3)
        density = occupied_integral(ldos, energies, mu)
        qe_density = snap.density[()]
        assert density.sum() * volume / npts == pytest.approx(nval, rel=1e-3)
        assert np.abs(density - qe_density).max() < 2e-3 * qe_density.max()
