"""Free-energy error of the energy integrals for LDOS broadenings other than -f' of k_B T.

    python benchmarks/ldos_broadenings.py [--workdir DIR] [--width 0.1] [--supercell 1]

One pw.x SCF of fcc Al (Fermi-Dirac smearing at 933 K, the bundled dataset's settings),
then three pp.x LDOS runs on the same wavefunctions: -f' of width k_B T (exact rule),
-f' of width ``--width`` and a Gaussian of width ``--width`` (both the Fermi-weighted
rule). pp.x 6.7 broadens with the kernel of the smearing named in the XML, so the
Gaussian LDOS comes from a copy of the run whose XML names 'gaussian' (the SCF itself
stays Fermi-Dirac; ingest tells the kernel apart by content). Prints the free energy
from each snapshot's own LDOS minus QE's total energy (meV/atom); docs/qe-ingest.md
quotes the result.
"""

from __future__ import annotations

import argparse
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

from ase.build import bulk

from mlsurrogate.evaluate import evaluate_dft
from mlsurrogate.qe import QESettings, ingest, run_pp_ldos, run_pw


def free_energy_error(snapshot: Path) -> tuple[float, float]:
    """(A from the LDOS - QE total, E_F from the LDOS - QE's), meV/atom and meV."""
    rows, natoms = evaluate_dft(snapshot)
    by_name = {row.name: row for row in rows}
    total, fermi = by_name["total free energy A"], by_name["Fermi level"]
    return 1000.0 * (total.ours - total.qe) / natoms, 1000.0 * (fermi.ours - fermi.qe)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="broadening_runs", help="run directories")
    parser.add_argument("--width", type=float, default=0.1, help="LDOS width (eV)")
    parser.add_argument("--supercell", type=int, default=1, help="cubic cells per axis")
    args = parser.parse_args()
    work = Path(args.workdir)
    atoms = bulk("Al", "fcc", a=4.05, cubic=True).repeat(args.supercell)
    atoms.rattle(0.05, seed=1)
    base = QESettings()
    scf = run_pw(atoms, base, work / "scf", progress=False)
    cases = {
        "fermi-dirac-derivative, k_B T": (base, False),
        f"fermi-dirac-derivative, {args.width} eV": (
            replace(base, ldos_broadening_ev=args.width),
            False,
        ),
        f"gaussian, {args.width} eV": (replace(base, ldos_broadening_ev=args.width), True),
    }
    print("| LDOS kernel, width | rule | A - A_QE (meV/atom) | E_F - E_F,QE (meV) |")
    print("|---|---|---:|---:|")
    for index, (name, (settings, gaussian)) in enumerate(cases.items()):
        directory = work / f"case{index}"
        shutil.rmtree(directory, ignore_errors=True)
        shutil.copytree(scf, directory)
        if gaussian:
            for xml in directory.glob("out/*.save/data-file-schema.xml"):
                xml.write_text(xml.read_text().replace(">fd</smearing>", ">gaussian</smearing>"))
        run_pp_ldos(settings, directory, progress=False)
        if gaussian:  # ingest compares with the SCF's own XML: restore it
            for xml in directory.glob("out/*.save/data-file-schema.xml"):
                shutil.copy(scf / xml.relative_to(directory), xml)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            snapshot = ingest(directory, work / f"case{index}.h5", progress=False)
        error, fermi = free_energy_error(snapshot)
        rule = "exact" if index == 0 else "Fermi-weighted"
        print(f"| {name} | {rule} | {error:+.3f} | {fermi:+.2f} |", flush=True)


if __name__ == "__main__":
    main()
