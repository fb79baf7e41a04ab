"""LAMMPS with ``pair_style mlsurrogate`` from Python: energy and forces of one structure
in-process (tests, benchmarks), and the environment's ``lmp`` executable and its thermo
output (examples and benchmarks that run input scripts)."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import numpy as np

from mlsurrogate.units import LAMMPS_METAL_BAR_A3_PER_EV


def lmp_command(args: list[str], ranks: int = 1) -> list[str]:
    """``lmp args`` of this environment, under its ``mpiexec -n ranks`` when ranks > 1
    (the MPICH of the LAMMPS wheel, which the plugin is built for)."""
    bin_dir = Path(sys.executable).parent
    command = [str(bin_dir / "lmp"), *args]
    return [str(bin_dir / "mpiexec"), "-n", str(ranks), *command] if ranks > 1 else command


def read_thermo(log: str) -> np.ndarray:
    """The thermo rows [steps, columns] of the first run in the text of a LAMMPS log."""
    rows, reading = [], False
    for line in log.splitlines():
        fields = line.split()
        if fields[:1] == ["Step"]:
            reading = True
        elif reading and fields and fields[0].isdigit():
            rows.append([float(v) for v in fields])
        elif reading and fields[:1] == ["Loop"]:
            break
    return np.array(rows)


def read_stage_timing(log: str) -> dict[str, tuple[float, float]]:
    """The pair style's stage timing block of a LAMMPS log (printed at the end of a run):
    {stage: (seconds on the slowest rank, percent)}."""
    if "pair_style mlsurrogate timing" not in log:
        raise ValueError("the log has no 'pair_style mlsurrogate timing' block")
    stages = {}
    block = log[log.index("pair_style mlsurrogate timing") :]
    for line in block.splitlines()[1:]:
        match = re.match(r"\s+(.+?)\s+([0-9.]+)\s+([0-9.]+)%$", line)
        if not match:
            break
        stages[match.group(1)] = (float(match.group(2)), float(match.group(3)))
    return stages


def _pair_style_session(
    model: str,
    cell: list[list[float]],
    positions: list[list[float]],
    grid: list[int],
    ionion: bool,
    commands: tuple[str, ...],
    options: str,
    mass: float = 26.98,
):
    """LAMMPS after ``run 0`` of the structure with the pair style, then ``commands``.

    Any right-handed cell: a lower-triangular one (orthogonal or LAMMPS's triclinic form)
    is used as it is, any other is turned into that form (positions rotated alike; see
    :func:`lab_rotation` to turn vectors back)."""
    from lammps import lammps

    lmp = lammps(cmdargs=["-screen", "none", "-log", "none", "-nocite"])
    rotation = lab_rotation(cell)
    box = np.asarray(cell, dtype=float) @ rotation
    style = f"mlsurrogate {model} grid {grid[0]} {grid[1]} {grid[2]} {options}".strip()
    if ionion:
        pair = [
            # the Ewald settings of mlsurrogate.ion_ion, for identical E_ii
            f"pair_style hybrid/overlay {style} coul/long 10.0",
            "pair_coeff * * mlsurrogate Al",
            "pair_coeff * * coul/long",
            "pair_modify table 0",
            "kspace_style ewald 1e-10",
            f"kspace_modify gewald {math.sqrt(-math.log(1e-10)) / 10.0!r}",
            "set type 1 charge 3.0",
        ]
    else:
        pair = [f"pair_style {style} ionion off", "pair_coeff * * Al"]
    lengths = f"0 {float(box[0, 0])!r} 0 {float(box[1, 1])!r} 0 {float(box[2, 2])!r}"
    tilts = [float(box[1, 0]), float(box[2, 0]), float(box[2, 1])]
    region = (
        f"region box prism {lengths} {tilts[0]!r} {tilts[1]!r} {tilts[2]!r}"
        if any(tilts)
        else f"region box block {lengths}"
    )
    setup = [
        "units metal",
        f"atom_style {'charge' if ionion else 'atomic'}",
        "atom_modify map array",
        "boundary p p p",
        region,
        "create_box 1 box",
        f"mass 1 {mass!r}",
    ]
    try:
        for command in setup:
            lmp.command(command)
        n = len(positions)
        lab = np.asarray(positions, dtype=float) @ rotation
        lmp.create_atoms(n, list(range(1, n + 1)), [1] * n, lab.ravel().tolist())
        for command in (*pair, *commands, "run 0 post no"):
            lmp.command(command)
    except Exception:
        lmp.close()
        raise
    return lmp


def lab_rotation(cell: list[list[float]] | np.ndarray) -> np.ndarray:
    """Rotation R with ``cell @ R`` in LAMMPS's lower-triangular form (the identity for a
    cell already in it); vectors v of the structure's frame are ``v @ R`` in LAMMPS's."""
    from mlsurrogate.lammps_reference import lammps_box

    cell = np.asarray(cell, dtype=float)
    return np.linalg.solve(cell, lammps_box(cell))


def _gather_per_atom(lmp, values: np.ndarray, natoms: int) -> np.ndarray:
    """Per-atom rows of this rank's local atoms -> all atoms in id order, on every rank."""
    nlocal = lmp.extract_global("nlocal")
    ids = np.asarray(lmp.numpy.extract_atom("id")[:nlocal]).astype(int)
    out = np.zeros((natoms, *values.shape[1:]))
    out[ids - 1] = values[:nlocal]
    try:
        from mpi4py import MPI

        return MPI.COMM_WORLD.allreduce(out)
    except ImportError:
        return out


def pair_style_energy_forces(
    model: str,
    cell: list[list[float]],
    positions: list[list[float]],
    grid: list[int],
    ionion: bool = False,
    extra_commands: tuple[str, ...] = (),
    options: str = "",
) -> tuple[float, np.ndarray]:
    """Orthogonal cell at the origin; returns (pe in eV, forces [natoms, 3] in eV/A).

    ``ionion`` adds E_ii as users do: hybrid/overlay with coul/long + kspace ewald and the
    valence charge 3 (Al) on every atom; otherwise ``ionion off``. ``options`` are more
    pair_style mlsurrogate keywords (e.g. ``"batch 1000 threads 2"``).
    """
    commands = ("thermo_style custom step pe", *extra_commands)
    lmp = _pair_style_session(model, cell, positions, grid, ionion, commands, options)
    try:
        energy = float(lmp.get_thermo("pe"))
        forces = _gather_per_atom(lmp, np.asarray(lmp.numpy.extract_atom("f")), len(positions))
        return energy, forces
    finally:
        lmp.close()


def pair_style_per_atom(
    model: str,
    cell: list[list[float]],
    positions: list[list[float]],
    grid: list[int],
    ionion: bool = False,
    options: str = "",
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Like :func:`pair_style_energy_forces`, with LAMMPS's per-atom computes: (pe,
    virial [6], per-atom energies [natoms], per-atom virials [natoms, 6]), eV, in LAMMPS's
    order xx, yy, zz, xy, xz, yz; virials are sum r f (stress times volume, negated)."""
    import ase

    atoms = ase.Atoms(["Al"] * len(positions), positions=positions, cell=cell, pbc=True)
    result = pair_style_calculation(model, atoms, grid, ionion, options)
    rows, columns = [0, 1, 2, 0, 0, 1], [0, 1, 2, 1, 2, 2]  # LAMMPS's order
    return (
        result["energy"],
        result["virial"][rows, columns],
        result["energies"],
        result["atom_virials"][:, rows, columns],
    )


def pair_style_deviations(
    model: str,
    cell: list[list[float]],
    positions: list[list[float]],
    grid: list[int],
    table: str,
    ionion: bool = False,
    options: str = "",
) -> dict[str, np.ndarray | float]:
    """The ensemble deviations of ``pair_style mlsurrogate ... uncertainty 1 file table``
    after ``run 0``: max_devi_f (eV/A) and devi_e (eV/atom) from ``compute pair``, and each
    atom's force deviation (eV/A, id order) from ``fix pair ... devi_f``."""
    from lammps import LMP_STYLE_ATOM, LMP_STYLE_GLOBAL, LMP_TYPE_VECTOR

    commands = (
        "compute extras all pair mlsurrogate",
        "fix deviation all pair 1 mlsurrogate devi_f 0",
        "thermo_style custom step pe c_extras[8] c_extras[9]",
    )
    options = f"uncertainty 1 file {table} {options}"
    lmp = _pair_style_session(model, cell, positions, grid, ionion, commands, options)
    try:
        extras = np.array(lmp.numpy.extract_compute("extras", LMP_STYLE_GLOBAL, LMP_TYPE_VECTOR))
        atom_deviation = np.asarray(
            lmp.numpy.extract_fix("deviation", LMP_STYLE_ATOM, LMP_TYPE_VECTOR)
        )
        return {
            "max_devi_f": float(extras[7]),
            "devi_e": float(extras[8]),
            "atom_devi_f": _gather_per_atom(lmp, atom_deviation, len(positions)),
        }
    finally:
        lmp.close()


def pair_style_calculation(
    model: str,
    atoms,
    grid: list[int] | tuple[int, int, int],
    ionion: bool = True,
    options: str = "",
) -> dict[str, np.ndarray | float]:
    """pe (eV), forces (eV/A), virial (3 x 3, eV: sum r f = -dE/deps), per-atom energies
    and per-atom virials ([natoms, 3, 3], eV) of ``atoms`` (any cell shape), in the frame
    of ``atoms``."""
    from lammps import LMP_STYLE_ATOM, LMP_STYLE_GLOBAL, LMP_TYPE_ARRAY, LMP_TYPE_VECTOR

    cell = np.asarray(atoms.cell, dtype=float)
    commands = (
        "compute energy all pe/atom",
        "compute stress all stress/atom NULL virial",
        "compute total all pressure NULL virial",
        "compute sums all reduce sum c_energy c_stress[1]",  # makes thermo invoke them
        "thermo_style custom step pe vol c_sums[1] c_sums[2] c_total",
    )
    lmp = _pair_style_session(
        model, cell.tolist(), atoms.positions.tolist(), list(grid), ionion, commands, options
    )
    try:
        rotation = lab_rotation(cell)
        energy, volume = float(lmp.get_thermo("pe")), float(lmp.get_thermo("vol"))
        pressure = np.array(lmp.numpy.extract_compute("total", LMP_STYLE_GLOBAL, LMP_TYPE_VECTOR))
        n = len(atoms)
        forces = _gather_per_atom(lmp, np.asarray(lmp.numpy.extract_atom("f")), n)
        atom_energy = np.asarray(
            lmp.numpy.extract_compute("energy", LMP_STYLE_ATOM, LMP_TYPE_VECTOR)
        )
        atom_stress = np.asarray(
            lmp.numpy.extract_compute("stress", LMP_STYLE_ATOM, LMP_TYPE_ARRAY)
        )
        # stress/atom is -(sum r f) in bar A^3; the global pressure is the virial / V
        atom_virials = _symmetric(-_gather_per_atom(lmp, atom_stress, n))
        return {
            "energy": energy,
            "forces": forces @ rotation.T,
            "virial": rotation @ _symmetric(pressure[:6] * volume) @ rotation.T,
            "energies": _gather_per_atom(lmp, atom_energy, n),
            "atom_virials": rotation @ atom_virials @ rotation.T,
        }
    finally:
        lmp.close()


def _symmetric(voigt: np.ndarray) -> np.ndarray:
    """[..., 3, 3] in eV from LAMMPS's [..., 6] (xx yy zz xy xz yz) in bar A^3."""
    xx, yy, zz, xy, xz, yz = np.moveaxis(np.asarray(voigt) / LAMMPS_METAL_BAR_A3_PER_EV, -1, 0)
    return np.stack(
        [np.stack([xx, xy, xz], -1), np.stack([xy, yy, yz], -1), np.stack([xz, yz, zz], -1)], -2
    )


def pair_style_nve(
    model: str,
    atoms,
    grid: list[int] | tuple[int, int, int],
    steps: int,
    timestep_fs: float,
) -> np.ndarray:
    """NVE (velocity Verlet) of ``atoms`` from its velocities (ASE units) with E_ii by
    Ewald: [steps + 1, 2] of (potential, kinetic) energy in eV. One element, one mass."""
    import ase.units

    masses = set(atoms.get_masses())
    if len(masses) != 1:
        raise ValueError("pair_style_nve takes structures of one mass")
    commands = (f"timestep {timestep_fs / 1000.0!r}", "thermo_style custom step pe ke")
    lmp = _pair_style_session(
        model,
        np.asarray(atoms.cell).tolist(),
        atoms.positions.tolist(),
        list(grid),
        True,
        commands,
        "",
        mass=float(masses.pop()),
    )
    try:
        rotation = lab_rotation(atoms.cell)
        # ASE velocities are in A per ASE time unit; metal units take A/ps
        velocities = atoms.get_velocities() @ rotation * ase.units.fs * 1000.0
        ids = np.asarray(lmp.numpy.extract_atom("id")[: len(atoms)]).astype(int)
        v = lmp.numpy.extract_atom("v")
        v[: len(atoms)] = velocities[ids - 1]
        lmp.command("fix nve all nve")
        energies = []
        for step in range(steps + 1):
            lmp.command("run 0 post no" if step == 0 else "run 1 pre no post no")
            energies.append((float(lmp.get_thermo("pe")), float(lmp.get_thermo("ke"))))
        return np.array(energies)
    finally:
        lmp.close()
