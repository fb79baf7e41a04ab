"""The free-energy functional (mlsurrogate.physics) against QE and against itself."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mlsurrogate.data import Snapshot
from mlsurrogate.evaluate import core_density_of, evaluate_dft, functional_for
from mlsurrogate.ion_ion import ion_ion_energy
from mlsurrogate.physics import LdosEnergy
from mlsurrogate.units import BOLTZMANN_EV_PER_K

DATA = Path(__file__).resolve().parents[1] / "data" / "al_fcc4_933K"
SNAPSHOTS = sorted(DATA.glob("snapshot_*.h5"))


def load(path):
    with Snapshot(path) as snap:
        functional = functional_for(snap)
        ldos = torch.as_tensor(snap.ldos[()], dtype=torch.float64)
        cell = torch.as_tensor(np.asarray(snap.atoms.cell), dtype=torch.float64)
        return functional, ldos, cell, snap.attrs, snap.atoms


@pytest.mark.parametrize("path", SNAPSHOTS, ids=lambda p: p.stem)
def test_terms_against_quantum_espresso(path):
    rows, natoms = evaluate_dft(path)
    by_key = {(r.name, r.source): r for r in rows}

    def diff(name, source):
        row = by_key[(name, source)]
        return row.ours - row.qe

    # each term on QE's own density: within 1e-4 eV per cell
    assert abs(diff("E_H", "QE n")) < 1e-4
    assert abs(diff("E_xc", "QE n")) < 1e-4
    assert abs(diff("int v_xc n", "QE n")) < 1e-4
    # ion-ion by LAMMPS Ewald vs QE's ewald term: within 0.1 meV/atom
    assert abs(diff("E_ii (LAMMPS Ewald)", "atoms")) / natoms < 1e-4
    # from QE's LDOS (issue targets 5 meV/atom, stretch 1; achieved well below 1)
    assert abs(diff("total free energy A", "LDOS + E_ii")) / natoms < 1e-3
    assert abs(diff("band energy", "LDOS")) / natoms < 1e-3
    assert abs(diff("-TS", "LDOS")) / natoms < 2e-4
    assert abs(diff("one-electron", "LDOS")) / natoms < 1e-3
    assert abs(diff("Fermi level", "LDOS")) < 5e-3


@pytest.mark.qe
def test_pbe_and_a_gap_on_real_silicon(silicon_snapshot):
    rows, natoms = evaluate_dft(silicon_snapshot)
    by_key = {(r.name, r.source): r for r in rows}
    for name in ("E_H", "E_xc", "int v_xc n"):
        row = by_key[(name, "QE n")]
        assert abs(row.ours - row.qe) < 1e-4, name
    with Snapshot(silicon_snapshot) as snap:
        assert snap.attrs["xc_functional"] == "PBE"
        eigenvalues = snap.reference("eigenvalues")
    valence_top, conduction_bottom = eigenvalues[:, 3].max(), eigenvalues[:, 4].min()
    mu = by_key[("Fermi level", "LDOS")]
    assert valence_top < mu.ours < conduction_bottom
    assert mu.ours == pytest.approx(mu.qe, abs=0.01)


@pytest.mark.qe
def test_nonlinear_core_correction_on_real_magnesium(magnesium_snapshot):
    rows, natoms = evaluate_dft(magnesium_snapshot)
    by_key = {(r.name, r.source): r for r in rows}
    for name in ("E_H", "E_xc", "int v_xc n"):
        row = by_key[(name, "QE n")]
        assert abs(row.ours - row.qe) < 1e-4, name
    total = by_key[("total free energy A", "LDOS + E_ii")]
    assert abs(total.ours - total.qe) / natoms < 1e-3
    with Snapshot(magnesium_snapshot) as snap:
        assert snap.attrs["core_correction"] == {"Mg": True}
        functional = functional_for(snap)
        cell = torch.as_tensor(np.asarray(snap.atoms.cell), dtype=torch.float64)
        density = torch.as_tensor(snap.density[()], dtype=torch.float64)
        core = core_density_of(snap)
        radial = snap.core_density_radial("Mg")
        qe_xc = snap.attrs["energy_xc_eV"]
    # the core density holds the pseudo-core charge of the UPF file, and it matters
    volume = float(torch.abs(torch.linalg.det(cell)))
    charge = np.sum(4 * np.pi * radial["r"] ** 2 * radial["rho"] * radial["rab"])
    assert float(core.sum()) * volume / core.numel() == pytest.approx(charge, rel=1e-3)
    without_core, _, _ = functional.potential_terms(density, cell)
    assert abs(float(without_core["xc"]) - qe_xc) > 0.05


# (kernel, width): -f' of k_B T (exact rule); -f' of 0.1 eV and a Gaussian (Fermi-weighted)
RULES = {
    "exact": ("fermi-dirac-derivative", None),
    "fd-0.1": ("fermi-dirac-derivative", 0.1),
    "gaussian-0.1": ("gaussian", 0.1),
}


def with_rule(functional: LdosEnergy, rule: str, xc: str = "lda_pz") -> LdosEnergy:
    kernel, width = RULES[rule]
    return LdosEnergy(functional.energies, functional.temperature_k, xc, kernel, width)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_gradient_against_finite_differences(rule):
    functional, ldos, cell, _, _ = load(SNAPSHOTS[3])
    functional = with_rule(functional, rule)
    assert functional.exact_integrals == (rule == "exact")
    terms, gradient = functional.evaluate(ldos, cell, 12.0, True)
    mu = float(terms["fermi_level"])
    energies = functional.energies

    def energy(x):
        return float(functional.evaluate(x, cell, 12.0, False)[0]["electronic"])

    # single entries: deep in the band, just below and just above mu, two points
    j_deep = int(torch.searchsorted(energies, torch.tensor(2.0, dtype=torch.float64)))
    j_mu = int(torch.searchsorted(energies, torch.tensor(mu, dtype=torch.float64)))
    for point, j in [((0, 0, 0), j_deep), ((5, 11, 3), j_mu - 1), ((17, 2, 9), j_mu)]:
        step = 1e-4
        plus, minus = ldos.clone(), ldos.clone()
        plus[point + (j,)] += step
        minus[point + (j,)] -= step
        fd = (energy(plus) - energy(minus)) / (2 * step)
        assert float(gradient[point + (j,)]) == pytest.approx(fd, rel=1e-6)
    # a direction touching every entry
    direction = torch.randn(
        ldos.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    direction *= 1e-3 * ldos.abs().max() / direction.abs().max()
    fd = (energy(ldos + direction) - energy(ldos - direction)) / 2
    assert float((gradient * direction).sum()) == pytest.approx(fd, rel=1e-6)


def test_potentials_are_derivatives_of_the_energies():
    with Snapshot(SNAPSHOTS[4]) as snap:
        functional = functional_for(snap)
        density = torch.as_tensor(snap.density[()], dtype=torch.float64)
        cell = torch.as_tensor(np.asarray(snap.atoms.cell), dtype=torch.float64)
        vtxc = snap.attrs["energy_vtxc_eV"]
    v_h, v_xc = functional.potentials(density, cell)
    terms, _, _ = functional.potential_terms(density, cell)
    voxel = float(torch.abs(torch.linalg.det(cell))) / density.numel()
    assert float((v_h * density).sum()) * voxel == pytest.approx(
        2 * float(terms["hartree"]), rel=1e-12
    )
    assert float((v_xc * density).sum()) * voxel == pytest.approx(vtxc, abs=1e-4)
    step = 1e-6
    for point in [(0, 0, 0), (7, 3, 12)]:
        plus, minus = density.clone(), density.clone()
        plus[point] += step
        minus[point] -= step
        hp, hm = (functional.potential_terms(x, cell)[0] for x in (plus, minus))
        assert float(v_h[point]) == pytest.approx(
            float(hp["hartree"] - hm["hartree"]) / (2 * step * voxel), rel=1e-6
        )
        assert float(v_xc[point]) == pytest.approx(
            float(hp["xc"] - hm["xc"]) / (2 * step * voxel), rel=1e-6
        )
    with pytest.raises(ValueError, match="core density grid differs"):
        functional.potential_terms(density, cell, density[:-1])


@pytest.mark.parametrize("rule", sorted(RULES))
def test_torchscript_equals_eager(rule):
    functional, ldos, cell, _, _ = load(SNAPSHOTS[1])
    functional = with_rule(functional, rule)
    scripted = torch.jit.script(functional)
    eager_terms, eager_gradient = functional.evaluate(ldos, cell, 12.0, True)
    script_terms, script_gradient = scripted.evaluate(ldos, cell, 12.0, True)
    for key, value in eager_terms.items():
        assert float(script_terms[key]) == pytest.approx(float(value), rel=1e-12, abs=1e-300)
    # Fermi rule: entries far above mu are differences of nearly equal terms (G dV and
    # W (phi - shift), both -> 0 with f); fused scripted kernels round them differently,
    # at the round-off of the largest entry.
    atol = 0.0 if rule == "exact" else 1e-14 * float(eager_gradient.abs().max())
    assert torch.allclose(script_gradient, eager_gradient, rtol=1e-12, atol=atol)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_fermi_level_is_a_root_of_the_rule(rule):
    """The bisection's closed-form N(mu) (exact rule) and its weight vectors (Fermi rule)
    give a mu where the rule's own W(mu) . D is N_val, on a network-like DOS that dips
    below zero in places."""
    functional, _, _, _, _ = load(SNAPSHOTS[0])
    functional = with_rule(functional, rule)
    energies = functional.energies
    rng = np.random.default_rng(5)
    dos = torch.sqrt(torch.clamp(energies - energies[0], min=0.0)) + torch.as_tensor(
        rng.normal(scale=0.3, size=energies.shape[0])
    )
    total = float((functional.occupation_weights(energies[-1]) * dos).sum())
    for electrons in (0.3 * total, 0.6 * total):
        mu = functional.fermi_level(dos, electrons)
        count = float((functional.occupation_weights(mu) * dos).sum())
        assert count == pytest.approx(electrons, rel=1e-12)


def fd_levels_dos(levels, weights, energies, kt):
    """D broadened by -f' of width kT, as pp.x makes it."""
    x = (energies[:, None] - levels[None, :]) / kt
    return (weights[None, :] * 0.25 / np.cosh(0.5 * x) ** 2 / kt).sum(1)


def test_identities_on_a_gapped_spectrum():
    """Silicon-like levels: a 1 eV gap. The LDOS formulas must give the exact
    Fermi-Dirac sums over the levels, and mu must fall in the gap."""
    rng = np.random.default_rng(3)
    valence = rng.uniform(-10.0, -1.0, 400)
    conduction = rng.uniform(0.0, 6.0, 400)
    levels = np.concatenate([valence, conduction])
    weights = np.full(levels.size, 8.0 / valence.size)  # 8 electrons fill the valence band
    temperature = 933.0
    kt = BOLTZMANN_EV_PER_K * temperature
    energies = np.arange(-12.0, 8.0, 0.02)
    dos = torch.as_tensor(fd_levels_dos(levels, weights, energies, kt))
    functional = LdosEnergy(energies, temperature)
    mu = functional.fermi_level(dos, 8.0)
    assert -1.0 < float(mu) < 0.0
    occupation = 1.0 / (1.0 + np.exp((levels - float(mu)) / kt))
    assert np.sum(weights * occupation) == pytest.approx(8.0, rel=1e-6)
    entropy = kt * np.sum(
        weights
        * np.where(
            (occupation > 0) & (occupation < 1),
            occupation * np.log(np.clip(occupation, 1e-300, 1))
            + (1 - occupation) * np.log(np.clip(1 - occupation, 1e-300, 1)),
            0.0,
        )
    )
    band = np.sum(weights * occupation * levels)
    assert float(functional.band_free_energy(dos, mu)) == pytest.approx(band + entropy, abs=1e-5)
    assert float(functional.entropy_term(dos, mu)) == pytest.approx(entropy, abs=1e-5)


def test_entropy_identity_for_a_metal():
    """Dense levels across mu: -TS and E_band - TS from the broadened DOS equal the sums.

    A fine energy grid tests the identities; the QE comparison tests the 0.1 eV grid."""
    levels = np.linspace(-5.0, 5.0, 2001)
    weights = np.full(levels.size, 0.01)
    temperature = 2000.0
    kt = BOLTZMANN_EV_PER_K * temperature
    energies = np.arange(-7.0, 7.0, 0.02)
    dos = torch.as_tensor(fd_levels_dos(levels, weights, energies, kt))
    functional = LdosEnergy(energies, temperature)
    mu = float(functional.fermi_level(dos, 10.0))
    occupation = 1.0 / (1.0 + np.exp((levels - mu) / kt))
    assert np.sum(weights * occupation) == pytest.approx(10.0, rel=1e-4)
    o = np.clip(occupation, 1e-300, 1 - 1e-16)
    entropy = kt * np.sum(weights * (o * np.log(o) + (1 - o) * np.log1p(-o)))
    mu_t = torch.tensor(mu, dtype=torch.float64)
    assert float(functional.entropy_term(dos, mu_t)) == pytest.approx(entropy, rel=1e-3)
    assert float(functional.band_free_energy(dos, mu_t)) == pytest.approx(
        np.sum(weights * occupation * levels) + entropy, abs=1e-4
    )


def test_ion_ion_forces_and_virial():
    atoms = Snapshot(SNAPSHOTS[2]).atoms
    result = ion_ion_energy(atoms, {"Al": 3.0})
    step = 1e-4
    for atom, axis in [(0, 0), (3, 2)]:
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[atom, axis] += step
        minus.positions[atom, axis] -= step
        fd = ion_ion_energy(plus, {"Al": 3.0}).energy - ion_ion_energy(minus, {"Al": 3.0}).energy
        assert result.forces[atom, axis] == pytest.approx(-fd / (2 * step), rel=1e-5, abs=1e-6)

    def strained(a, b, eps):
        deformed = atoms.copy()
        deformation = np.eye(3)
        deformation[a, b] += eps / 2
        deformation[b, a] += eps / 2
        deformed.set_cell(np.asarray(atoms.cell) @ deformation, scale_atoms=True)
        return ion_ion_energy(deformed, {"Al": 3.0}).energy

    # virial W = -dE/d(strain), diagonal included (LAMMPS leaves out the background term
    # there; ion_ion_energy adds it). Tolerance: Ewald accuracy 1e-10 -> ~1e-5 eV here.
    for a, b in [(0, 0), (2, 2), (0, 1), (1, 2)]:
        fd = (strained(a, b, 1e-4) - strained(a, b, -1e-4)) / 2e-4
        assert result.virial[a, b] == pytest.approx(-fd, rel=1e-5, abs=5e-5)


def test_bad_input_is_a_clear_error():
    functional, ldos, cell, attrs, _ = load(SNAPSHOTS[0])
    energies = functional.energies.numpy()
    for value in ("nan", "inf", "-inf"):
        bad = ldos.clone()
        bad[1, 2, 3, 40] = float(value)
        with pytest.raises(ValueError, match="NaN or infinite"):
            functional.evaluate(bad, cell, 12.0, False)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        LdosEnergy(energies, 0.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        LdosEnergy(energies, -10.0)
    # an energy grid ending below mu + 10 kT
    top = int(np.searchsorted(energies, attrs["fermi_energy_eV"] + 0.3))
    short = LdosEnergy(energies[:top], 933.0)
    with pytest.raises(ValueError, match=r"does not cover mu \+/- 10 k_B T"):
        short.evaluate(ldos[..., :top].contiguous(), cell, 12.0, False)
    with pytest.raises(ValueError, match="model's energy grid"):
        functional.evaluate(ldos[..., :-1], cell, 12.0, False)
    with pytest.raises(ValueError, match="singular"):
        functional.evaluate(ldos, torch.zeros(3, 3, dtype=torch.float64), 12.0, False)
    with pytest.raises(ValueError, match="uniform"):
        LdosEnergy(np.array([0.0, 0.1, 0.3, 0.4]), 933.0)
    with pytest.raises(ValueError, match="'marzari-vanderbilt': supported are"):
        LdosEnergy(energies, 933.0, "lda_pz", "marzari-vanderbilt", 0.1)
    with pytest.raises(ValueError, match="broadening width must be > 0"):
        LdosEnergy(energies, 933.0, "lda_pz", "gaussian", 0.0)
    with pytest.raises(ValueError, match="fewer than N_val"):
        functional.evaluate(ldos * 0.5, cell, 12.0, False)
    assert math.isfinite(float(functional.evaluate(ldos, cell, 12.0, False)[0]["electronic"]))


def strain_difference(function, cell: torch.Tensor, a: int, b: int, step: float) -> float:
    """Central difference of ``function(cell)`` in the strain component eps_ab, for the
    deformation x -> (I + eps) x of the cell."""
    unit = torch.zeros(3, 3, dtype=torch.float64)
    unit[a, b] = step
    identity = torch.eye(3, dtype=torch.float64)
    return (function(cell @ (identity + unit).T) - function(cell @ (identity - unit).T)) / (
        2 * step
    )


@pytest.mark.parametrize("xc", ["lda_pz", "pbe"])
def test_strain_derivative_at_fixed_density(xc):
    """dPhi/dstrain (Phi = -E_H + E_xc - int v_xc n, density values kept at the moving grid
    points) against central differences of Phi over deformed cells."""
    with Snapshot(SNAPSHOTS[2]) as snap:
        density = torch.as_tensor(snap.density[()], dtype=torch.float64)
        cell = torch.as_tensor(np.asarray(snap.atoms.cell), dtype=torch.float64)
        functional = LdosEnergy(snap.energies, 933.0, xc)

    def phi(c):
        terms, _, _ = functional.potential_terms(density, c)
        return float(-terms["hartree"] + terms["xc"] - terms["vxc_n"])

    _, _, derivative = functional.potential_terms(density, cell)
    for a, b in [(0, 0), (1, 2), (2, 1)]:
        difference = strain_difference(phi, cell, a, b, 1e-6)
        assert float(derivative[a, b]) == pytest.approx(difference, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize(
    ("xc", "rule"), [("lda_pz", "exact"), ("pbe", "exact"), ("lda_pz", "fd-0.1")]
)
def test_point_shares_sum_to_the_energy(xc, rule):
    """The per-point shares behind per-atom energies add up to E_band - TS and to A - E_ii."""
    functional, ldos, cell, attrs, _ = load(SNAPSHOTS[1])
    functional = with_rule(functional, rule, xc)
    terms, _ = functional.evaluate(ldos, cell, 12.0, False)
    rows = ldos.reshape(-1, ldos.shape[-1])
    voxel = float(torch.linalg.det(cell)) / rows.shape[0]
    mu = terms["fermi_level"]
    band = functional.band_free_points(rows, mu, voxel)
    potential = functional.potential_points(
        functional.density(rows, mu).reshape(ldos.shape[:3]), cell
    )
    assert float(band.sum()) == pytest.approx(float(terms["band_free"]), rel=1e-12)
    assert float(band.sum() + potential.sum()) == pytest.approx(
        float(terms["electronic"]), rel=1e-12
    )


def test_fermi_rule_integrates_the_linear_interpolant():
    """The Fermi-weighted rule's weights against a dense trapezoid of f(e; mu, T) times the
    piecewise-linear interpolant: N, E_band - TS and -TS; and W', G' against differences."""
    energies = np.arange(-5.0, 11.0 + 1e-9, 0.1)
    dos = np.random.default_rng(5).uniform(0.0, 2.0, energies.size)
    functional = LdosEnergy(energies, 933.0, "lda_pz", "gaussian", 0.1)
    kt = functional.kt
    mu = 7.6321
    fine = np.linspace(energies[0], energies[-1], 2_000_001)
    interpolant = np.interp(fine, energies, dos)
    occupation = 1.0 / (1.0 + np.exp((fine - mu) / kt))
    o = np.clip(occupation, 1e-300, 1.0 - 1e-16)
    entropy = kt * (o * np.log(o) + (1.0 - o) * np.log1p(-o))
    mu_t = torch.tensor(mu, dtype=torch.float64)
    weights, slope, band_free, band_slope = functional.rule_weights(mu_t)
    d = torch.as_tensor(dos)
    assert float(weights @ d) == pytest.approx(
        np.trapezoid(occupation * interpolant, fine), rel=1e-9
    )
    assert float(band_free @ d) == pytest.approx(
        np.trapezoid((fine * occupation + entropy) * interpolant, fine), rel=1e-9
    )
    assert float(functional.entropy_term(d, mu_t)) == pytest.approx(
        np.trapezoid(entropy * interpolant, fine), rel=1e-7
    )
    h = 1e-6
    plus, minus = (
        functional.rule_weights(torch.tensor(mu + s, dtype=torch.float64)) for s in (h, -h)
    )
    torch.testing.assert_close(slope, (plus[0] - minus[0]) / (2 * h), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(band_slope, (plus[2] - minus[2]) / (2 * h), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_strain_derivative_of_the_electronic_energy(rule):
    """d(A - E_ii)/d(strain) at fixed LDOS values = (E_band - TS) I + dPhi/deps
    - c N / N'(mu) I, the formula the pair style's virial uses (c, N' from global_terms
    and fermi_shift_part), against central differences over deformed cells."""
    functional, ldos, cell, _, _ = load(SNAPSHOTS[2])
    functional = with_rule(functional, rule)
    electrons = 12.0
    rows = ldos.reshape(-1, ldos.shape[-1])
    voxel = float(torch.linalg.det(cell)) / rows.shape[0]
    dos = functional.dos(rows, voxel)
    mu = functional.fermi_level(dos, electrons)
    density = functional.density(rows, mu).reshape(ldos.shape[:3])
    terms, phi, phi_strain = functional.global_terms(dos, density, cell, mu)
    c = terms["edos_at_mu"] + functional.fermi_shift_part(rows, mu, phi.reshape(-1))
    isotropic = float(terms["band_free"]) - float(c) * electrons / float(terms["dos_at_mu"])
    formula = phi_strain + isotropic * torch.eye(3, dtype=torch.float64)

    def energy(c_):
        return float(functional.evaluate(ldos, c_, electrons, False)[0]["electronic"])

    for a, b in [(0, 0), (1, 2)]:
        difference = strain_difference(energy, cell, a, b, 1e-5)
        assert float(formula[a, b]) == pytest.approx(difference, rel=1e-5, abs=1e-5)
