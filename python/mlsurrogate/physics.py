"""Electronic free energy from the local density of states, written once in torch.

Used by Python evaluation and scripted (TorchScript) into exported models for the pair
style. Units eV and Angstrom; float64 throughout. The LDOS d(e, r) [1/(eV A^3)] is given
on grid points r (flattened in C order over [ix, iy, iz]) and on a uniform energy grid
e_j (absolute energies).

The derivations are written once, in docs/energy-functional.md: the total free energy
(section 1), the exact integrals of an LDOS broadened by -f' of width k_B T (2), the
Fermi-weighted rule for other broadenings (3), the Fermi level (4), dA/dLDOS at fixed
electron count (5), the strain derivative (6) and the distributed interface the pair
style calls (7). :meth:`LdosEnergy.rule_weights` is the one place the two rules differ.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from mlsurrogate.units import BOHR_ANGSTROM, BOLTZMANN_EV_PER_K, COULOMB_EV_ANGSTROM, HARTREE_EV

FERMI_DIRAC_KERNEL = "fermi-dirac-derivative"
GAUSSIAN_KERNEL = "gaussian"
# Kernels whose LDOS the Fermi-weighted (approximate) rule accepts.
APPROXIMATE_KERNELS = (FERMI_DIRAC_KERNEL, GAUSSIAN_KERNEL)
XC_FUNCTIONALS = ("lda_pz", "pbe")
_QUADRATURE_POINTS = 16
# Fermi-weighted rule: Gauss-Legendre points per sub-interval, and sub-intervals short
# enough (<= k_B T / 2) that f is smooth on each: the rule integrates the linear
# interpolant against f to ~1e-10 relative.
_FERMI_POINTS = 8
_FERMI_SUBINTERVAL_KT = 0.5
# TorchScript cannot read module globals: these reach scripted code as module attributes.
_BISECTION_STEPS = 200
# Energies must reach this many k_B T on either side of mu: f and -f' are < 5e-5 there.
_WINDOW_WIDTHS = 10.0


def exact_energy_integrals(temperature_k: float, kernel: str, width_ev: float) -> bool:
    """True when an LDOS broadened by ``kernel`` of ``width_ev`` makes the energy integrals
    exact identities (-f' of width k_B T; docs/energy-functional.md, section 2)."""
    kt = BOLTZMANN_EV_PER_K * temperature_k
    return kernel == FERMI_DIRAC_KERNEL and abs(width_ev - kt) <= 1e-6 * kt


def fermi_rule_nodes(
    energies: np.ndarray, kt: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Nodes x_q, weights w_q, segment k_q and position t_q in the segment of a fixed
    quadrature of integral_{e_0}^{e_last} g(e) y(e) de for the linear interpolant y of
    samples on ``energies`` (docs/energy-functional.md, section 3)."""
    step = float(energies[1] - energies[0])
    pieces = max(1, math.ceil(step / (_FERMI_SUBINTERVAL_KT * kt)))
    gauss, gauss_weights = np.polynomial.legendre.leggauss(_FERMI_POINTS)
    t = ((np.arange(pieces)[:, None] + 0.5 * (gauss[None] + 1.0)) / pieces).ravel()
    w = np.tile(gauss_weights * 0.5 * step / pieces, pieces)
    segments = np.arange(len(energies) - 1)
    nodes = energies[segments][:, None] + step * t[None]
    return (
        nodes.ravel(),
        np.tile(w, len(segments)),
        np.repeat(segments, t.size),
        np.tile(t, len(segments)),
    )


def _segment(energies: torch.Tensor, mu: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Index k of the energy segment [e_k, e_k+1] holding mu, and t = (mu - e_k) / step
    (differentiable in mu; mu outside the grid extrapolates the end segment)."""
    position = (mu - energies[0]) / (energies[1] - energies[0])
    segment = torch.clamp(torch.floor(position.detach()), 0.0, float(energies.shape[0] - 2))
    return int(segment.item()), position - segment


def integration_weights(energies: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """W_j with sum_j W_j y_j = integral_{e_0}^{mu} of the piecewise-linear interpolant.

    Differentiable in mu. ``energies`` must be uniform (checked by the caller).
    """
    k, t = _segment(energies, mu)
    step = energies[1] - energies[0]
    index = torch.arange(energies.shape[0], dtype=torch.int64, device=energies.device)
    zero = torch.zeros_like(energies)
    # trapezoid over the full segments up to e_k, then the part of segment k up to mu
    weights = torch.where(index <= k, step + zero, zero)
    weights = weights - torch.where(index == 0, 0.5 * step + zero, zero)
    weights = weights - torch.where(index == k, 0.5 * step + zero, zero)
    weights = weights + torch.where(index == k, step * t * (1.0 - 0.5 * t) + zero, zero)
    return weights + torch.where(index == k + 1, 0.5 * step * t * t + zero, zero)


def interpolation_weights(energies: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Weights of the linear interpolation at mu; they equal dW_j/dmu."""
    k, t = _segment(energies, mu)
    index = torch.arange(energies.shape[0], dtype=torch.int64, device=energies.device)
    zero = torch.zeros_like(energies)
    return torch.where(index == k, 1.0 - t + zero, zero) + torch.where(
        index == k + 1, t + zero, zero
    )


def g_vectors(
    cell: torch.Tensor, shape: tuple[int, int, int], zero_nyquist: bool = False
) -> torch.Tensor:
    """G = 2 pi m . inv(cell)^T on the FFT grid (integer m in FFT order), [nx, ny, nz, 3].

    ``zero_nyquist`` sets m = 0 at the Nyquist index of even axes (for derivatives,
    which that mode does not define).
    """
    reciprocal = 2.0 * math.pi * torch.linalg.inv(cell).transpose(0, 1)
    g = torch.zeros(shape[0], shape[1], shape[2], 3, dtype=cell.dtype, device=cell.device)
    for axis in range(3):
        n = shape[axis]
        m = torch.fft.fftfreq(n, dtype=cell.dtype, device=cell.device) * n
        if zero_nyquist and n % 2 == 0:
            m[n // 2] = 0.0
        view = [1, 1, 1, 1]
        view[axis] = n
        g = g + m.view(view) * reciprocal[axis].view(1, 1, 1, 3)
    return g


def _reciprocal_squared(cell: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """|G|^2 on the FFT grid (A^-2); the G = 0 entry is 1."""
    g = g_vectors(cell, shape)
    g2 = (g * g).sum(-1)
    g2[0, 0, 0] = 1.0
    return g2


def simpson_weights(rab: np.ndarray) -> np.ndarray:
    """Composite Simpson weights on a radial mesh with Jacobian ``rab`` = dr/di (odd size)."""
    weights = np.full(rab.size, 2.0)
    weights[1::2] = 4.0
    weights[0] = weights[-1] = 1.0
    return weights * rab / 3.0


def core_form_factors(
    radial: dict[str, np.ndarray], g_norm: np.ndarray, g_max: float
) -> np.ndarray:
    """4 pi integral r^2 rho_c(r) sin(Gr)/(Gr) dr at each |G| (electrons), 0 above g_max.

    As QE's set_rhoc: the radial mesh is cut at the first r > 10 bohr (kept odd) and
    only G inside the density-cutoff sphere enter.
    """
    r, rab, rho = radial["r"], radial["rab"], radial["rho"]
    beyond = np.nonzero(r > 10.0 * BOHR_ANGSTROM)[0]
    size = int(beyond[0]) + 1 if beyond.size else r.size
    size = 2 * ((size + 1) // 2) - 1
    r, rab, rho = r[:size], rab[:size], rho[:size]
    weights = simpson_weights(rab) * 4.0 * np.pi * r * r * rho
    flat = g_norm.ravel()
    values = np.empty(flat.size)
    for start in range(0, flat.size, 4096):  # bounded memory: 4096 x mesh at a time
        gr = np.outer(flat[start : start + 4096], r)
        values[start : start + 4096] = np.sinc(gr / np.pi) @ weights
    values[flat > g_max] = 0.0
    return values.reshape(g_norm.shape)


def core_density(
    cell: torch.Tensor,
    positions: torch.Tensor,
    species: torch.Tensor,
    form_factors: torch.Tensor,
) -> torch.Tensor:
    """n_core(r) = (1/V) sum_G sum_a F_s(a)(|G|) exp(iG.(r - R_a)) on the grid (1/A^3).

    ``form_factors`` [n_species, nx, ny, nz] from :func:`core_form_factors`; ``species``
    [natoms] indexes it. Differentiable in ``positions`` (forces of the core correction).
    """
    shape = (form_factors.shape[1], form_factors.shape[2], form_factors.shape[3])
    g = g_vectors(cell, shape)
    volume = torch.abs(torch.linalg.det(cell))
    coefficients = torch.zeros(shape, dtype=torch.complex128, device=cell.device)
    for atom in range(positions.shape[0]):
        phase = (g * positions[atom].view(1, 1, 1, 3)).sum(-1)
        coefficients = coefficients + form_factors[species[atom]] * torch.exp(-1j * phase)
    points = float(shape[0] * shape[1] * shape[2])
    return torch.fft.ifftn(coefficients).real * points / volume


def _fft_gradient(field: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
    """Spectral gradient of a periodic field on the grid, shape [nx, ny, nz, 3]."""
    shape = (field.shape[0], field.shape[1], field.shape[2])
    g = g_vectors(cell, shape, True)
    coefficients = torch.fft.fftn(field)
    parts = [torch.fft.ifftn(1j * g[..., c] * coefficients).real for c in range(3)]
    return torch.stack(parts, dim=-1)


def hartree_energy(density: torch.Tensor, cell: torch.Tensor, coulomb: float) -> torch.Tensor:
    """E_H = (V/2) sum_{G != 0} 4 pi e^2 |n(G)|^2 / G^2, n(G) = FFT / N; e^2 = ``coulomb``
    (eV A for n in 1/A^3 and a cell in A: the result is in eV)."""
    shape = (density.shape[0], density.shape[1], density.shape[2])
    volume = torch.abs(torch.linalg.det(cell))
    points = float(shape[0] * shape[1] * shape[2])
    coefficients = torch.fft.fftn(density) / points
    power = coefficients.real**2 + coefficients.imag**2
    inverse_g2 = 1.0 / _reciprocal_squared(cell, shape)
    inverse_g2[0, 0, 0] = 0.0
    return 0.5 * volume * 4.0 * math.pi * coulomb * (power * inverse_g2).sum()


def hartree_potential(density: torch.Tensor, cell: torch.Tensor, coulomb: float) -> torch.Tensor:
    """v_H(r) = sum_{G != 0} 4 pi e^2 n(G) / G^2 e^{iG.r} (eV), the derivative of E_H."""
    shape = (density.shape[0], density.shape[1], density.shape[2])
    inverse_g2 = 1.0 / _reciprocal_squared(cell, shape)
    inverse_g2[0, 0, 0] = 0.0
    return torch.fft.ifftn(torch.fft.fftn(density) * inverse_g2).real * 4.0 * math.pi * coulomb


def _pw92_correlation(
    rs: torch.Tensor,
    a: float,
    alpha1: float,
    beta1: float,
    beta2: float,
    beta3: float,
    beta4: float,
) -> torch.Tensor:
    """Perdew & Wang, PRB 45, 13244 (1992), eq. 10 (Hartree), p = 1."""
    sqrt_rs = torch.sqrt(rs)
    denominator = 2.0 * a * (beta1 * sqrt_rs + beta2 * rs + beta3 * rs * sqrt_rs + beta4 * rs * rs)
    return -2.0 * a * (1.0 + alpha1 * rs) * torch.log1p(1.0 / denominator)


def xc_energy_density(
    density: torch.Tensor, gradient_sq: torch.Tensor, functional: str
) -> torch.Tensor:
    """Exchange-correlation energy per electron (Hartree) at each point, atomic units:

    ``density`` in 1/bohr^3, ``gradient_sq`` = |grad n|^2 in 1/bohr^8 (ignored by LDA).
    Densities below 1e-10 (QE's vanishing charge) are raised to it.
    """
    n = torch.clamp(density, min=1e-10)
    rs = (3.0 / (4.0 * math.pi * n)) ** (1.0 / 3.0)
    kf = (3.0 * math.pi**2 * n) ** (1.0 / 3.0)
    exchange = -3.0 * kf / (4.0 * math.pi)  # Hartree
    if functional == "lda_pz":
        # Perdew & Zunger 1981, appendix C (unpolarized)
        high = 0.0311 * torch.log(rs) - 0.048 + 0.0020 * rs * torch.log(rs) - 0.0116 * rs
        low = -0.1423 / (1.0 + 1.0529 * torch.sqrt(rs) + 0.3334 * rs)
        correlation = torch.where(rs < 1.0, high, low)
        return exchange + correlation
    if functional == "pbe":
        kappa = 0.804
        mu = 0.2195149727645171
        beta = 0.06672455060314922
        gamma = (1.0 - math.log(2.0)) / math.pi**2
        s2 = gradient_sq / (4.0 * kf * kf * n * n)
        exchange_gga = exchange * (1.0 + kappa - kappa / (1.0 + mu * s2 / kappa))
        ec = _pw92_correlation(rs, 0.031091, 0.21370, 7.5957, 3.5876, 1.6382, 0.49294)
        ks = torch.sqrt(4.0 * kf / math.pi)
        t2 = gradient_sq / (4.0 * ks * ks * n * n)
        big_a = beta / gamma / torch.expm1(-ec / gamma)
        at2 = big_a * t2
        h = gamma * torch.log1p(beta / gamma * t2 * (1.0 + at2) / (1.0 + at2 + at2 * at2))
        return exchange_gga + ec + h
    raise ValueError("xc functional must be lda_pz or pbe, got " + functional)


class LdosEnergy(torch.nn.Module):
    """The free-energy functional of one model: energy grid, temperature, N_val, XC."""

    def __init__(
        self,
        energies: np.ndarray | torch.Tensor,
        temperature_k: float,
        xc: str = "lda_pz",
        broadening_kernel: str = FERMI_DIRAC_KERNEL,
        broadening_ev: float | None = None,
    ) -> None:
        super().__init__()
        energies = torch.as_tensor(energies, dtype=torch.float64)
        if energies.ndim != 1 or energies.numel() < 3:
            raise ValueError("the energy grid needs at least 3 energies")
        steps = energies[1:] - energies[:-1]
        if not bool(torch.all(steps > 0)) or float((steps - steps[0]).abs().max()) > 1e-9:
            raise ValueError("the energy grid must be uniform and increasing")
        if not temperature_k > 0 or not math.isfinite(temperature_k):
            raise ValueError(f"temperature must be > 0 K, got {temperature_k}")
        if xc not in XC_FUNCTIONALS:
            raise ValueError(f"xc functional must be one of {XC_FUNCTIONALS}, got {xc!r}")
        kt = BOLTZMANN_EV_PER_K * temperature_k
        width = kt if broadening_ev is None else broadening_ev
        if not width > 0 or not math.isfinite(width):
            raise ValueError(f"LDOS broadening width must be > 0 eV, got {width}")
        exact = exact_energy_integrals(temperature_k, broadening_kernel, width)
        if not exact and broadening_kernel not in APPROXIMATE_KERNELS:
            raise ValueError(
                f"LDOS broadened by {broadening_kernel!r}: supported are "
                f"{FERMI_DIRAC_KERNEL} (exact integrals at width k_B T = {kt:.6f} eV, "
                f"approximate otherwise) and {GAUSSIAN_KERNEL} (approximate); regenerate the "
                "LDOS with smearing='fd' or 'gaussian'"
            )
        nodes, weights = np.polynomial.legendre.leggauss(_QUADRATURE_POINTS)
        # the exact rule needs no Fermi-rule nodes: empty buffers keep model files small
        fermi_nodes, fermi_weights, fermi_segment, fermi_t = (
            (np.zeros(0), np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros(0))
            if exact
            else fermi_rule_nodes(energies.numpy(), kt)
        )
        self.register_buffer("energies", energies)
        self.register_buffer("quadrature_nodes", torch.as_tensor(nodes, dtype=torch.float64))
        self.register_buffer("quadrature_weights", torch.as_tensor(weights, dtype=torch.float64))
        self.register_buffer("fermi_nodes", torch.as_tensor(fermi_nodes, dtype=torch.float64))
        self.register_buffer("fermi_weights", torch.as_tensor(fermi_weights, dtype=torch.float64))
        self.register_buffer("fermi_segment", torch.as_tensor(fermi_segment, dtype=torch.int64))
        self.register_buffer("fermi_t", torch.as_tensor(fermi_t, dtype=torch.float64))
        self.exact_integrals = exact
        self.broadening_kernel = broadening_kernel
        self.broadening_ev = float(width)
        self.kt = kt
        self.temperature_k = float(temperature_k)
        self.xc = xc
        self.bohr = BOHR_ANGSTROM
        self.hartree = HARTREE_EV
        self.coulomb = COULOMB_EV_ANGSTROM
        self.bisection_steps = _BISECTION_STEPS
        self.window_widths = _WINDOW_WIDTHS

    # ------------------------------------------------------------------ integration rule
    def _scatter(self, values: torch.Tensor) -> torch.Tensor:
        """sum_q values_q hat_j(x_q): node values onto the energy samples' weights."""
        weights = torch.zeros_like(self.energies)
        weights = weights.index_add(0, self.fermi_segment, values * (1.0 - self.fermi_t))
        return weights.index_add(0, self.fermi_segment + 1, values * self.fermi_t)

    def _fermi_at_nodes(self, mu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f(x_q; mu, T) and s(f) = f ln f + (1 - f) ln(1 - f) at the rule's nodes."""
        y = (self.fermi_nodes - mu) / self.kt
        occupation = torch.sigmoid(-y)
        entropy = -occupation * F.softplus(y) - (1.0 - occupation) * F.softplus(-y)
        return occupation, entropy

    @torch.jit.export
    def rule_weights(
        self, mu: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Weights of the energy integrals at mu, each [nE], dotted with D (or d(r)):

        occupation (N = W . D, n(r) = W . d(r)), its mu-derivative W', band-free energy
        G (E_band - TS = G . D) and G'. Exact rule: W = integral^{mu} of the linear
        interpolant, G = W e. Fermi-weighted rule: W = integral f(e; mu, T) (.),
        G = integral [e f + k_B T s(f)] (.), G' = mu W'
        (docs/energy-functional.md, sections 2 and 3).
        """
        if self.exact_integrals:
            weights = integration_weights(self.energies, mu)
            slope = interpolation_weights(self.energies, mu)
            return weights, slope, weights * self.energies, slope * self.energies
        occupation, entropy = self._fermi_at_nodes(mu)
        occupied = self.fermi_weights * occupation
        weights = self._scatter(occupied)
        slope = self._scatter(self.fermi_weights * occupation * (1.0 - occupation) / self.kt)
        band_free = self._scatter(
            occupied * self.fermi_nodes + self.fermi_weights * self.kt * entropy
        )
        return weights, slope, band_free, mu * slope

    @torch.jit.export
    def occupation_weights(self, mu: torch.Tensor) -> torch.Tensor:
        """W_j(mu) with n(r) = sum_j W_j d_j(r) and N = sum_j W_j D_j."""
        weights, _, _, _ = self.rule_weights(mu)
        return weights

    # ------------------------------------------------------------------ step 1, local
    @torch.jit.export
    def dos(self, ldos: torch.Tensor, voxel_volume: float) -> torch.Tensor:
        """D_j = dV sum_r d_j(r) over the given points (a partial sum on one rank)."""
        if ldos.dim() != 2 or ldos.shape[1] != self.energies.shape[0]:
            raise ValueError("ldos must be [points, energies] on the model's energy grid")
        dos = ldos.sum(0) * voxel_volume
        # a NaN or inf anywhere in the LDOS reaches its energy's sum: one pass, not two
        if not bool(torch.isfinite(dos).all()):
            raise ValueError("the LDOS holds NaN or infinite values")
        return dos

    # ------------------------------------------------------------------ step 2, global
    def _electron_count(
        self, mu: float, dos: torch.Tensor, values: list[float], cumulative: list[float]
    ) -> float:
        """N(mu) = W(mu) . D. Exact rule: the trapezoid sum to e_k plus the integral of the
        linear interpolant over [e_k, mu] (``integration_weights`` in closed form, as
        Python floats: the bisection's 60 steps cost microseconds, not 60 weight vectors)."""
        if not self.exact_integrals:
            # torch.full, not torch.tensor: scripted, torch.tensor(float) rounds to float32
            point = torch.full([], mu, dtype=self.energies.dtype, device=self.energies.device)
            return float((self.occupation_weights(point) * dos).sum())
        e0 = float(self.energies[0])
        step = float(self.energies[1] - self.energies[0])
        position = (mu - e0) / step
        k = min(max(int(math.floor(position)), 0), len(values) - 2)
        t = position - k
        partial = t * (1.0 - 0.5 * t) * values[k] + 0.5 * t * t * values[k + 1]
        return cumulative[k] + step * partial

    @torch.jit.export
    def fermi_level(self, dos: torch.Tensor, n_electrons: float) -> torch.Tensor:
        """mu with N(mu) = n_electrons (N_val of the structure): bisection on N(mu) of the
        integration rule (piecewise quadratic for the exact rule).

        Robust with a gap (N flat in it: the bisection ends inside the gap) and with
        non-monotonic D from a network. Not differentiable: ``ldos_gradient`` accounts for
        the shift of mu with the LDOS.
        """
        energies = self.energies
        if not n_electrons > 0.0:
            raise ValueError("the number of electrons must be > 0, got " + str(n_electrons))
        total = (self.occupation_weights(energies[-1]) * dos).sum()
        if bool(total < n_electrons):
            raise ValueError(
                "the LDOS holds " + str(float(total)) + " electrons over the energy grid, "
                "fewer than N_val = " + str(n_electrons)
            )
        values: list[float] = dos.detach().tolist()
        # exact rule: N(e_k) by the trapezoid rule once, then N(mu) in closed form per step
        cumulative: list[float] = [0.0]
        step = float(energies[1] - energies[0])
        for j in range(1, len(values)):
            cumulative.append(cumulative[j - 1] + 0.5 * step * (values[j - 1] + values[j]))
        low, high = float(energies[0]), float(energies[-1])
        for _ in range(self.bisection_steps):
            mid = 0.5 * (low + high)
            if mid == low or mid == high:  # adjacent doubles: further steps repeat this one
                break
            if self._electron_count(mid, dos, values, cumulative) < n_electrons:
                low = mid
            else:
                high = mid
        mu = torch.full([], 0.5 * (low + high), dtype=energies.dtype, device=energies.device)
        margin = self.window_widths * self.kt
        if bool(mu - margin < energies[0]) or bool(mu + margin > energies[-1]):
            raise ValueError(
                "the energy grid ["
                + str(float(energies[0]))
                + ", "
                + str(float(energies[-1]))
                + "] eV does not cover mu +/- 10 k_B T (mu = "
                + str(float(mu))
                + " eV)"
            )
        return mu

    @torch.jit.export
    def density(self, ldos: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        """n(r) = sum_j W_j(mu) d_j(r) for the given points (1/A^3)."""
        return ldos @ self.occupation_weights(mu)

    @torch.jit.export
    def band_free_energy(self, dos: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        """E_band - TS = sum_j G_j(mu) D_j."""
        _, _, band_free, _ = self.rule_weights(mu)
        return (band_free * dos).sum()

    @torch.jit.export
    def entropy_term(self, dos: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        """-TS. Exact rule: k_B T integral ln(1 - exp(-|e - mu| / k_B T)) D(e) de (product
        quadrature on the linear interpolant, split at mu where the kernel is
        log-singular). Fermi-weighted rule: k_B T integral s(f(e; mu, T)) D(e) de."""
        if not self.exact_integrals:
            _, entropy = self._fermi_at_nodes(mu)
            return (self._scatter(self.fermi_weights * self.kt * entropy) * dos).sum()
        energies = self.energies
        breaks, _ = torch.sort(torch.cat([energies, mu.reshape(1)]))
        left, right = breaks[:-1], breaks[1:]
        half = 0.5 * (right - left)
        nodes = (0.5 * (left + right)).unsqueeze(1) + half.unsqueeze(1) * self.quadrature_nodes
        weights = half.unsqueeze(1) * self.quadrature_weights
        step = energies[1] - energies[0]
        position = torch.clamp((nodes - energies[0]) / step, 0.0, float(energies.shape[0] - 1))
        index = torch.clamp(torch.floor(position), 0.0, float(energies.shape[0] - 2)).long()
        t = position - index
        values = dos[index] * (1.0 - t) + dos[index + 1] * t
        distance = torch.abs(nodes - mu) / self.kt
        kernel = torch.log(-torch.expm1(-torch.clamp(distance, min=1e-300)))
        return self.kt * (weights * kernel * values).sum()

    def _xc_energy_points(
        self, density: torch.Tensor, cell: torch.Tensor, core: torch.Tensor | None
    ) -> torch.Tensor:
        """Each grid point's share of E_xc[n + n_core] (eV), shaped like ``density``."""
        voxel = torch.abs(torch.linalg.det(cell)) / float(density.numel())
        total = density if core is None else density + core
        gradient_sq = torch.zeros_like(density)
        if self.xc == "pbe":
            gradient_sq = (_fft_gradient(total, cell) ** 2).sum(-1) * self.bohr**8
        per_electron = xc_energy_density(total * self.bohr**3, gradient_sq, self.xc) * self.hartree
        return total * per_electron * voxel

    def _xc_energy(
        self, density: torch.Tensor, cell: torch.Tensor, core: torch.Tensor | None
    ) -> torch.Tensor:
        """E_xc[n + n_core] (eV) on the grid."""
        return self._xc_energy_points(density, cell, core).sum()

    @torch.jit.export
    def potentials(
        self, density: torch.Tensor, cell: torch.Tensor, core: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hartree and exchange-correlation potentials v_H(r), v_xc(r) in eV on the grid."""
        voxel = torch.abs(torch.linalg.det(cell)) / float(density.numel())
        n = density.detach().clone().requires_grad_(True)
        v_xc = torch.autograd.grad([self._xc_energy(n, cell, core)], [n])[0]
        v_xc = v_xc if v_xc is not None else torch.zeros_like(n)
        return hartree_potential(density, cell, self.coulomb), v_xc / voxel

    @torch.jit.export
    def potential_terms(
        self, density: torch.Tensor, cell: torch.Tensor, core: torch.Tensor | None = None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """E_H, E_xc, integral v_xc n; phi = dPhi/dn(r) and dPhi/d(strain) at fixed n(r),
        for Phi = -E_H + E_xc - int v_xc n.

        ``density`` is the full valence grid [nx, ny, nz] (1/A^3); phi has its shape
        (eV A^3). The strain derivative (3 x 3, eV) is for x -> (1 + eps) x of the cell
        with the density values at the grid points kept. ``core`` is the core density of
        nonlinear-core-corrected pseudopotentials: E_xc and v_xc see n + n_core, the
        double counting only n.
        """
        if density.dim() != 3:
            raise ValueError("density must be a full [nx, ny, nz] grid")
        if core is not None and core.shape != density.shape:
            raise ValueError("the core density grid differs from the density grid")
        n = density.detach().clone().requires_grad_(True)
        strain = torch.zeros(3, 3, dtype=cell.dtype, device=cell.device).requires_grad_(True)
        identity = torch.eye(3, dtype=cell.dtype, device=cell.device)
        deformed = cell @ (identity + strain).transpose(0, 1)
        e_hartree = hartree_energy(n, deformed, self.coulomb)
        e_xc = self._xc_energy(n, deformed, core)
        v_xc = torch.autograd.grad([e_xc], [n], create_graph=True)[0]  # = v_xc(r) dV
        v_xc = v_xc.reshape(n.shape) if v_xc is not None else torch.zeros_like(n)
        double_counting = (v_xc * n).sum()
        phi_objective = -e_hartree + e_xc - double_counting
        phi, phi_strain = torch.autograd.grad([phi_objective], [n, strain])
        phi = phi if phi is not None else torch.zeros_like(n)
        phi_strain = phi_strain if phi_strain is not None else torch.zeros_like(cell)
        terms = {
            "hartree": e_hartree.detach(),
            "xc": e_xc.detach(),
            "vxc_n": double_counting.detach(),
        }
        return terms, phi.detach(), phi_strain.detach()

    @torch.jit.export
    def global_terms(
        self,
        dos: torch.Tensor,
        density: torch.Tensor,
        cell: torch.Tensor,
        mu: torch.Tensor,
        core: torch.Tensor | None = None,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Every energy term (eV per cell) but E_ii, phi on the full grid, and dPhi/dstrain.

        ``terms`` also holds D(mu) and (e D)(mu) (interpolants at mu) for the virial.
        """
        terms, phi, phi_strain = self.potential_terms(density, cell, core)
        weights, slope, _, band_slope = self.rule_weights(mu)
        terms["dos_at_mu"] = (slope * dos).sum()
        terms["edos_at_mu"] = (band_slope * dos).sum()
        band_free = self.band_free_energy(dos, mu)
        entropy = self.entropy_term(dos, mu)
        terms["band_free"] = band_free
        terms["entropy"] = entropy
        terms["band"] = band_free - entropy
        terms["fermi_level"] = mu
        terms["electrons"] = (weights * dos).sum()
        terms["one_electron"] = terms["band"] - 2.0 * terms["hartree"] - terms["vxc_n"]
        terms["electronic"] = band_free - terms["hartree"] + terms["xc"] - terms["vxc_n"]
        return terms, phi, phi_strain

    # ------------------------------------------- per-point shares (per-atom energies)
    @torch.jit.export
    def band_free_points(
        self, ldos: torch.Tensor, mu: torch.Tensor, voxel_volume: float
    ) -> torch.Tensor:
        """Each given point's share of E_band - TS: dV sum_j G_j(mu) d_j(r) (eV)."""
        _, _, band_free, _ = self.rule_weights(mu)
        return (ldos @ band_free) * voxel_volume

    @torch.jit.export
    def potential_points(
        self, density: torch.Tensor, cell: torch.Tensor, core: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Each grid point's share of Phi = -E_H + E_xc - integral v_xc n (eV) on the full
        grid: dV (-n v_H / 2 - v_xc n) + the point's E_xc term."""
        voxel = torch.abs(torch.linalg.det(cell)) / float(density.numel())
        v_hartree, v_xc = self.potentials(density, cell, core)
        return (-0.5 * v_hartree - v_xc) * density * voxel + self._xc_energy_points(
            density, cell, core
        )

    # ------------------------------------------------------------------ step 3, local
    @torch.jit.export
    def fermi_shift_part(
        self, ldos: torch.Tensor, mu: torch.Tensor, phi: torch.Tensor
    ) -> torch.Tensor:
        """sum_r phi(r) sum_j W'_j(mu) d_j(r) over the given points (phi flattened like
        ldos rows); for the exact rule W' interpolates d at mu."""
        _, slope, _, _ = self.rule_weights(mu)
        return (phi * (ldos @ slope)).sum()

    @torch.jit.export
    def ldos_gradient(
        self,
        mu: torch.Tensor,
        phi: torch.Tensor,
        dos: torch.Tensor,
        fermi_shift: torch.Tensor,
        voxel_volume: float,
    ) -> torch.Tensor:
        """dA/dd_j(r) at fixed N for the given points: G_j dV + W_j (phi(r) - dV c / N'),

        N' = W' . D, c = G' . D + sum_r phi(r) W' . d(r) (``fermi_shift`` is the second
        part, summed over all points); for the exact rule G = W e, N' = D(mu) and
        c = (e D)(mu) + ... (docs/energy-functional.md, section 5). Shape [points, energies].
        """
        offset, weights, shift = self.gradient_factors(mu, dos, fermi_shift, voxel_volume)
        return offset.unsqueeze(0) + weights.unsqueeze(0) * (phi.unsqueeze(1) - shift)

    @torch.jit.export
    def gradient_factors(
        self, mu: torch.Tensor, dos: torch.Tensor, fermi_shift: torch.Tensor, voxel_volume: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(G dV, W, dV c / N') of ``ldos_gradient`` = G_j dV + W_j (phi(r) - dV c / N'):
        with them, sum_r,j dA/dd_j(r) x_j(r) takes two passes over x and no [points,
        energies] gradient (the stress term of training)."""
        weights, slope, band_free, band_slope = self.rule_weights(mu)
        c = (band_slope * dos).sum() + fermi_shift
        shift = voxel_volume * c / (slope * dos).sum()
        return band_free * voxel_volume, weights, shift

    # ------------------------------------------------------------------ one process
    def forward(
        self,
        ldos: torch.Tensor,
        cell: torch.Tensor,
        n_electrons: float,
        core: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """All terms for an LDOS on a full grid [nx, ny, nz, nE] (no E_ii)."""
        terms, _ = self.evaluate(ldos, cell, n_electrons, False, core)
        return terms

    @torch.jit.export
    def solve(
        self,
        rows: torch.Tensor,
        shape: tuple[int, int, int],
        voxel_volume: float,
        cell: torch.Tensor,
        n_electrons: float,
        core: torch.Tensor | None = None,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """Steps 1-3 on one process for LDOS rows [points, nE] of a grid ``shape``:
        (terms, phi on the grid, mu, D)."""
        dos = self.dos(rows, voxel_volume)
        mu = self.fermi_level(dos, n_electrons)
        density = self.density(rows, mu).reshape(shape)
        terms, phi, _ = self.global_terms(dos, density, cell, mu, core)
        return terms, phi, mu, dos

    @torch.jit.export
    def evaluate(
        self,
        ldos: torch.Tensor,
        cell: torch.Tensor,
        n_electrons: float,
        with_gradient: bool,
        core: torch.Tensor | None = None,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Terms and (optionally) dA/dd [nx, ny, nz, nE], through the distributed steps."""
        if ldos.dim() != 4 or ldos.shape[3] != self.energies.shape[0]:
            raise ValueError("ldos must be [nx, ny, nz, energies] on the model's energy grid")
        if cell.dim() != 2 or cell.shape[0] != 3 or cell.shape[1] != 3:
            raise ValueError("cell must be 3x3 (rows = lattice vectors)")
        if not bool(torch.abs(torch.linalg.det(cell)) > 0):
            raise ValueError("cell is singular")
        shape = (ldos.shape[0], ldos.shape[1], ldos.shape[2])
        voxel = float(torch.abs(torch.linalg.det(cell))) / float(shape[0] * shape[1] * shape[2])
        rows = ldos.reshape(-1, ldos.shape[3])
        terms, phi, mu, dos = self.solve(rows, shape, voxel, cell, n_electrons, core)
        gradient = torch.zeros(0, dtype=ldos.dtype, device=ldos.device)
        if with_gradient:
            phi_rows = phi.reshape(-1)
            shift = self.fermi_shift_part(rows, mu, phi_rows)
            gradient = self.ldos_gradient(mu, phi_rows, dos, shift, voxel).reshape(ldos.shape)
        return terms, gradient
