"""Physical constants and unit conversions (CODATA 2018, the values QE 6.7 uses).

Inside mlsurrogate everything is in eV, Angstrom and fs (LAMMPS ``metal``). Quantum
ESPRESSO's Rydberg/Hartree atomic units are converted once, where its files are read.
"""

from __future__ import annotations

HARTREE_EV = 27.211386245988
RYDBERG_EV = HARTREE_EV / 2.0
BOHR_ANGSTROM = 0.529177210903
BOLTZMANN_EV_PER_K = 8.617333262e-5
# e^2 / (4 pi eps0) in eV * Angstrom: Coulomb energy of two unit charges 1 A apart.
COULOMB_EV_ANGSTROM = HARTREE_EV * BOHR_ANGSTROM
GPA_PER_EV_PER_CUBIC_ANGSTROM = 160.2176634  # 1 eV/A^3 in GPa (e * 1e30 / 1e9)
# LAMMPS metal units' pressure conversion (force->nktv2p): bar * A^3 per eV. LAMMPS's own
# value, not CODATA's 1.602176634e6, so that its pressures convert back exactly.
LAMMPS_METAL_BAR_A3_PER_EV = 1.6021765e6
