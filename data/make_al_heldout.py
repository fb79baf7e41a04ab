"""Held-out QE references of 32-atom Al of the kinds MD visits, for evaluating models and
calibrating their uncertainty (issues 17 and 19): energies, forces and stress only (SCF,
no LDOS), one small JSON file per structure.

    python data/make_al_heldout.py [--output data/al_heldout_933K] [--ranks 2] [--only NAME ...]
                                   [--kspacing 0.2]

Held out means held out: the structures come from seeded EMT Langevin MD
(:func:`mlsurrogate.candidates.classical_md_frames`, seed 2026), a generator no training
set here uses (those are Gaussian displacements from ``data/make_al_dataset.py``), and
they must never be used to choose a recipe, a hyperparameter or a stopping point.

Kinds: solid at 300, 600, 933 and 1100 K (a = 4.05 A); 933 K at a = 3.95 and 4.15 A; a
31-atom vacancy cell at 933 K; a liquid at 1200 K at the liquid's density (a = 4.23 A: the
volume of liquid Al at the melting point, 2.375 g/cm^3, is 13.7 % above the solid's),
melted first at 2500 K. The DFT settings are the bundled data's (``QESettings()``:
Al.pz-vbc, ecutwfc 20 Ry, Fermi-Dirac smearing at 933 K, 4x4x4 k-points) with QE's
default band count for a metal (``--kspacing 0.13``: 6x6x6). The melt (6 ps of chaotic
MD) is not bit-reproducible across machines: the liquid of data/al_heldout_933K_k6 is
another configuration than that of data/al_heldout_933K (positions differ by up to 4 A);
each JSON stores its structure, which is what evaluations use. Resumable: each finished
structure is kept as NAME.json and skipped on a rerun; pw.x runs in ``--workdir``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

from ase.build import bulk

from mlsurrogate.candidates import classical_md_frames
from mlsurrogate.files import atomic_output
from mlsurrogate.qe import QESettings, mpi_commands, read_pw_xml, run_pw, valence_electrons

ROOT = Path(__file__).resolve().parents[1]
SEED = 2026
LIQUID_LATTICE = 4.23

# name: (lattice constant A, temperature K, vacancy, melt first)
KINDS = {
    "solid_300K": (4.05, 300.0, False, False),
    "solid_600K": (4.05, 600.0, False, False),
    "solid_933K": (4.05, 933.0, False, False),
    "solid_1100K": (4.05, 1100.0, False, False),
    "a395_933K": (3.95, 933.0, False, False),
    "a415_933K": (4.15, 933.0, False, False),
    "vacancy_933K": (4.05, 933.0, True, False),
    "liquid_1200K": (LIQUID_LATTICE, 1200.0, False, True),
}


def structure(name: str):
    """The seeded EMT MD frame of one kind (2 ps at its temperature, 2 fs steps)."""
    lattice, temperature, vacancy, melt = KINDS[name]
    atoms = bulk("Al", "fcc", a=lattice, cubic=True).repeat(2)
    if vacancy:
        del atoms[0]
    if melt:  # 4 ps at 2500 K, then 2 ps at the temperature
        (_, atoms), *_ = classical_md_frames(atoms, [2500.0], steps=2000, every=2000, seed=SEED)
    frames = classical_md_frames(atoms, [temperature], steps=1000, every=1000, seed=SEED)
    return frames[-1][1]


def reference(name: str, workdir: Path, ranks: int, kspacing: float) -> dict:
    atoms = structure(name)
    electrons = valence_electrons(atoms, QESettings())
    bands = math.ceil(max(0.6 * electrons, electrons / 2 + 4))  # QE's default for metals
    settings = replace(QESettings(nbnd=bands, kspacing=kspacing), **mpi_commands(ranks))
    run = workdir / name
    shutil.rmtree(run, ignore_errors=True)  # an unfinished earlier attempt
    run_pw(atoms, settings, run, progress=False)
    (xml,) = run.glob("*/*.save/data-file-schema.xml")
    result = read_pw_xml(xml)
    _, temperature, vacancy, melt = KINDS[name]
    return {
        "name": name,
        "generator": f"EMT Langevin MD, seed {SEED} (data/make_al_heldout.py)",
        "kind": {"temperature_K": temperature, "vacancy": vacancy, "liquid": melt},
        "cell_A": atoms.cell.tolist(),
        "positions_A": atoms.positions.tolist(),
        "symbols": atoms.get_chemical_symbols(),
        "qe_free_energy_eV": result.energies["total"],
        "qe_forces_eV_A": result.forces.tolist(),
        "qe_stress_eV_A3": result.stress.tolist(),  # QE's sign
        "qe_fermi_energy_eV": result.fermi_energy,
        "qe_settings": {
            "pseudopotentials": dict(settings.pseudopotentials),
            "ecutwfc_Ry": settings.ecutwfc_ry,
            "electronic_temperature_K": settings.electronic_temperature_k,
            "smearing": settings.smearing,
            "kpoint_grid": list(result.kpoint_grid),
            "nbnd": bands,
            "qe_version": result.qe_version,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=str(ROOT / "data" / "al_heldout_933K"))
    parser.add_argument("--workdir", default=str(ROOT / "build" / "al_heldout"))
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--only", nargs="+", choices=sorted(KINDS), default=sorted(KINDS))
    parser.add_argument(
        "--kspacing", type=float, default=0.2, help="k-spacing (1/A): 0.2 gives 4x4x4, 0.13 "
        "the k-converged 6x6x6 of issue 19's data (data/al_heldout_933K_k6)"
    )  # fmt: skip
    args = parser.parse_args()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    for name in args.only:
        target = output / f"{name}.json"
        if target.exists():
            print(f"{name}: kept")
            continue
        data = reference(name, Path(args.workdir), args.ranks, args.kspacing)
        with atomic_output(target) as tmp:
            tmp.write_text(json.dumps(data, indent=1) + "\n")
        print(f"{name}: A = {data['qe_free_energy_eV']:.6f} eV, wrote {target}")


if __name__ == "__main__":
    main()
