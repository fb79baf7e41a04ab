"""Ion-ion energy E_ii: point valence charges in a neutralizing background, by LAMMPS.

The same LAMMPS solvers the pair style runs beside it (``coul/long`` + ``kspace_style
ewald`` or ``pppm``), called through the lammps Python module, so Python evaluation and
MD use one implementation. For a cell of ions only (net charge sum Z), LAMMPS adds the
neutralizing-background term, which makes the result QE's "ewald contribution".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import ase
import numpy as np

from mlsurrogate.lammps_reference import lammps_box
from mlsurrogate.units import LAMMPS_METAL_BAR_A3_PER_EV


@dataclass(frozen=True)
class IonIon:
    energy: float  # eV
    forces: np.ndarray  # (natoms, 3) eV/A, in the frame of ``atoms``
    virial: np.ndarray  # (3, 3) eV, sum of r (x) f in the frame of ``atoms``
    atom_energies: np.ndarray  # (natoms,) eV, LAMMPS's per-atom split; sums to ``energy``


def ion_ion_energy(
    atoms: ase.Atoms,
    valence_charges: Mapping[str, float],
    *,
    kspace: str = "ewald",
    accuracy: float = 1e-10,
    cutoff: float = 10.0,
) -> IonIon:
    """E_ii with LAMMPS ``coul/long`` (``pair_modify table 0``) + ``kspace_style``."""
    if kspace not in ("ewald", "pppm"):
        raise ValueError(f"kspace must be ewald or pppm, got {kspace!r}")
    missing = sorted(set(atoms.get_chemical_symbols()) - set(valence_charges))
    if missing:
        raise ValueError(f"no valence charge for element(s) {missing}")
    if not all(atoms.pbc):
        raise ValueError("E_ii needs a cell periodic in all three directions")
    from lammps import LMP_STYLE_ATOM, LMP_TYPE_VECTOR, lammps

    cell = np.asarray(atoms.cell, dtype=float)
    volume = abs(float(np.linalg.det(cell)))
    box = lammps_box(cell)
    # rotation taking the atoms' frame to LAMMPS's lower-triangular frame
    rotation = np.linalg.solve(cell, box)
    positions = atoms.positions @ rotation
    charges = [float(valence_charges[s]) for s in atoms.get_chemical_symbols()]
    # Ewald splitting parameter: real-space terms erfc(g r)/r fall to ~accuracy at cutoff
    splitting = math.sqrt(-math.log(accuracy)) / cutoff
    lmp = lammps(cmdargs=["-log", "none", "-screen", "none", "-nocite"])
    try:
        for command in (
            "units metal",
            "atom_style charge",
            "atom_modify map array",
            "boundary p p p",
            "region cell prism 0 {} 0 {} 0 {} {} {} {} units box".format(
                *(
                    repr(float(box[i, j]))
                    for i, j in ((0, 0), (1, 1), (2, 2), (1, 0), (2, 0), (2, 1))
                )
            ),
            "create_box 1 cell",
            "mass 1 1.0",
            f"pair_style coul/long {cutoff!r}",
            "pair_coeff * *",
            "pair_modify table 0",
            f"kspace_style {kspace} {accuracy!r}",
            f"kspace_modify gewald {splitting!r}",
            "compute atom_energy all pe/atom",
            # thermo invokes pe/atom, so the per-atom energy is tallied at run 0
            "compute atom_energy_sum all reduce sum c_atom_energy",
            "thermo_style custom step pe c_atom_energy_sum",
        ):
            lmp.command(command)
        n = len(atoms)
        lmp.create_atoms(n, list(range(1, n + 1)), [1] * n, positions.ravel().tolist())
        for index, charge in enumerate(charges, start=1):
            lmp.command(f"set atom {index} charge {charge!r}")
        lmp.command("compute virial all pressure NULL virial")
        lmp.command("run 0 post no")
        energy = float(lmp.get_thermo("pe"))
        ids = np.asarray(lmp.numpy.extract_atom("id")[:n]).astype(int)
        forces = np.empty((n, 3))
        forces[ids - 1] = np.asarray(lmp.numpy.extract_atom("f")[:n])
        atom_energies = np.empty(n)
        atom_energies[ids - 1] = np.asarray(
            lmp.numpy.extract_compute("atom_energy", LMP_STYLE_ATOM, LMP_TYPE_VECTOR)[:n]
        )
        # pressure tensor of the virial alone (bar): P_ab = W_ab / V
        coulomb = float(lmp.extract_global("qqrd2e"))  # LAMMPS's e^2 (its energy uses it)
        pxx, pyy, pzz, pxy, pxz, pyz = (
            float(v) for v in lmp.numpy.extract_compute("virial", 0, 1)[:6]
        )
    finally:
        lmp.close()
    pressure = np.array([[pxx, pxy, pxz], [pxy, pyy, pyz], [pxz, pyz, pzz]])
    virial_lammps = pressure * volume / LAMMPS_METAL_BAR_A3_PER_EV
    # LAMMPS adds the neutralizing-background energy -pi Q^2 e^2 / (2 g^2 V) of a charged
    # cell to the energy but not to the virial; it scales as 1/V, so W_aa gains it.
    background = -math.pi * sum(charges) ** 2 * coulomb / (2 * splitting**2 * volume)
    virial_lammps += background * np.eye(3)
    return IonIon(
        energy=energy,
        forces=forces @ rotation.T,
        virial=rotation @ virial_lammps @ rotation.T,
        atom_energies=atom_energies,
    )
