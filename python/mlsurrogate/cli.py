"""mlsurrogate: Quantum ESPRESSO data in, LDOS models for pair_style mlsurrogate out.

Every verb has --help; docs/cli.md lists them all."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlsurrogate

if TYPE_CHECKING:
    import ase

    from mlsurrogate.descriptors import BispectrumParams


class UsageError(Exception):
    """Bad command-line input; printed without a traceback."""


def _info() -> int:
    from mlsurrogate._lammps_entry import plugin_dir
    from mlsurrogate._preload import find_libmpi

    plugin = os.path.join(plugin_dir(), "mlsurrogateplugin.so")
    try:
        from mlsurrogate import _core

        core = _core.core_version()
    except ImportError as exc:
        core = f"not importable ({exc})"
    print(f"mlsurrogate {mlsurrogate.__version__}")
    print(f"C++ core:      {core}")
    print(f"LAMMPS plugin: {plugin} ({'present' if os.path.isfile(plugin) else 'missing'})")
    print(f"libmpi:        {find_libmpi() or 'not found'}")
    return 0


def _add_descriptor_options(parser: argparse.ArgumentParser) -> None:
    """One option per BispectrumParams keyword (the one keyword list), same names."""
    from mlsurrogate.descriptors import (
        DESCRIPTOR_KEYWORDS,
        PER_ELEMENT_KEYWORDS,
        BispectrumParams,
        keyword_type,
    )

    group = parser.add_argument_group("descriptor parameters (LAMMPS sna/grid; MALA's Al defaults)")
    defaults = BispectrumParams()
    for name in DESCRIPTOR_KEYWORDS:
        kind = keyword_type(name)
        default = getattr(defaults, name)
        if kind is bool:
            group.add_argument(
                f"--{name}", type=int, choices=(0, 1), default=int(default), help="0 or 1"
            )
        else:
            every = " of every element" if name in PER_ELEMENT_KEYWORDS else ""
            group.add_argument(f"--{name}", type=kind, default=default, help=f"{name}{every}")
    group.add_argument("--threads", type=int, default=None, help="default: all usable cores")


def _descriptor_params(args: argparse.Namespace) -> BispectrumParams:
    from mlsurrogate.descriptors import DESCRIPTOR_KEYWORDS, BispectrumParams, keyword_type

    return BispectrumParams(
        **{name: keyword_type(name)(getattr(args, name)) for name in DESCRIPTOR_KEYWORDS}
    )


def _read_structure(path: str) -> ase.Atoms:
    import ase.io

    try:
        return ase.io.read(path)
    except Exception as exc:  # ase raises many types for unreadable files
        raise UsageError(f"cannot read {path}: {exc}") from exc


def _descriptors(args: argparse.Namespace) -> int:
    import numpy as np

    from mlsurrogate.descriptors import compute_grid_descriptors
    from mlsurrogate.files import atomic_output, check_output_path

    check_output_path(args.output)
    atoms = _read_structure(args.structure)
    if min(args.grid) <= 0:
        raise UsageError(f"--grid must be positive, got {args.grid}")
    result = compute_grid_descriptors(
        atoms, args.grid, _descriptor_params(args), threads=args.threads, progress=not args.quiet
    )
    with atomic_output(args.output) as tmp, open(tmp, "wb") as handle:
        np.save(handle, result)
    print(f"wrote {args.output}: descriptors {result.shape} [ix, iy, iz, k], float64")
    return 0


def _qe_run(args: argparse.Namespace) -> int:
    from mlsurrogate.qe import QESettings, run_qe

    atoms = _read_structure(args.structure)
    pseudopotentials = {}
    for item in args.pseudo:
        element, sep, filename = item.partition("=")
        if not sep or not element or not filename:
            raise UsageError(f"--pseudo expects ELEMENT=FILE, got {item!r}")
        pseudopotentials[element] = filename
    settings = QESettings(
        pseudopotentials=pseudopotentials or {"Al": "Al.pz-vbc.UPF"},
        pseudo_dir=args.pseudo_dir,
        ecutwfc_ry=args.ecutwfc,
        kspacing=args.kspacing,
        kpts=tuple(args.kpts) if args.kpts else None,
        electronic_temperature_k=args.temperature,
        smearing=args.smearing,
        conv_thr_ry=args.conv_thr,
        nbnd=args.nbnd,
        ldos_emin_ev=args.emin,
        ldos_emax_ev=args.emax,
        ldos_spacing_ev=args.de,
        ldos_broadening_ev=args.broadening,
        ldos_kpts=tuple(args.ldos_kpts) if args.ldos_kpts else None,
        ldos_kspacing=args.ldos_kspacing,
        ldos_program=args.ldos_program,
        pw_command=args.pw_command,
        pp_command=args.pp_command,
    )
    run_qe(atoms, settings, args.output, progress=not args.quiet)
    print(f"QE run in {args.output}; next: mlsurrogate qe ingest {args.output} -o snapshot.h5")
    return 0


def _qe_ingest(args: argparse.Namespace) -> int:
    import warnings

    from mlsurrogate.qe import ApproximateIntegrationWarning, NonSelfConsistentLdosWarning, ingest

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ApproximateIntegrationWarning)
        warnings.simplefilter("always", NonSelfConsistentLdosWarning)
        path = ingest(
            args.directory,
            args.output,
            pw_out=args.pw_out,
            xml=args.xml,
            ldos=args.ldos,
            ldos_input=args.ldos_input,
            density=args.density,
            mala_ldos=args.mala_ldos,
            descriptor_params=None if args.no_descriptors else _descriptor_params(args),
            ldos_mantissa_bits=args.ldos_mantissa_bits,
            threads=args.threads,
            progress=not args.quiet,
        )
    for warning in caught:
        print(f"mlsurrogate qe ingest: warning: {warning.message}", file=sys.stderr)
    print(f"wrote {path}")
    return 0


def _data_info(args: argparse.Namespace) -> int:
    from mlsurrogate.data import summary

    print("\n\n".join(summary(path) for path in args.snapshots))
    return 0


def _data_compact(args: argparse.Namespace) -> int:
    from mlsurrogate.data import compact_snapshot

    directory = Path(args.output)
    if not directory.is_dir():
        raise UsageError(f"-o {directory}: not a directory; create it first")
    for index, path in enumerate(args.snapshots):
        target = directory / Path(path).name
        if target.resolve() == Path(path).resolve():
            raise UsageError(f"{path}: -o is its own directory; choose another")
        compact_snapshot(path, target, args.points, seed=args.seed + index)
        print(f"wrote {target}: the LDOS at {args.points} points")
    return 0


def _data_replicate(args: argparse.Namespace) -> int:
    from mlsurrogate.data import Snapshot, replicate_snapshot

    target = replicate_snapshot(args.snapshot, args.output, tuple(args.repeat), seed=args.seed)
    with Snapshot(target) as snap:
        natoms, grid = len(snap.atoms), snap.grid_shape
    print(f"wrote {target}: {natoms} atoms on a {' x '.join(map(str, grid))} grid")
    return 0


def _data_descriptors(args: argparse.Namespace) -> int:
    from mlsurrogate.data import add_descriptors
    from mlsurrogate.files import check_output_path

    check_output_path(args.output if args.output is not None else args.snapshot)
    path = add_descriptors(
        args.snapshot,
        _descriptor_params(args),
        output=args.output,
        threads=args.threads,
        progress=not args.quiet,
    )
    print(f"wrote descriptors to {path}")
    return 0


def _evaluate_dft(args: argparse.Namespace) -> int:
    from mlsurrogate.evaluate import format_comparison

    print("\n\n".join(format_comparison(path) for path in args.snapshots))
    return 0


def _train(args: argparse.Namespace) -> int:
    from mlsurrogate.training import TrainingConfig, train

    config = TrainingConfig.from_toml(args.config) if args.config else TrainingConfig()
    overrides = {
        "train": args.train,
        "validation": args.validation,
        "max_epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "hidden": args.hidden,
        "activation": args.activation,
        "seed": args.seed,
        "device": args.device,
        "threads": args.threads,
    }
    for key, value in overrides.items():
        if value is not None:
            setattr(config, key, value)
    history = train(config, args.output, resume=args.resume, progress=not args.quiet)
    best = min(history, key=lambda record: record["validation_objective"])
    print(
        f"wrote {args.output}: {len(history)} epochs, best validation loss "
        f"{best['validation_objective']:.3e} at epoch {best['epoch']}; next: mlsurrogate export "
        f"{args.output} -o model.pt"
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    import torch

    from mlsurrogate.export import export_model

    dtype = {"float64": torch.float64, "float32": torch.float32}[args.dtype]
    path = export_model(args.checkpoints, args.output, dtype)
    print(f"wrote {path}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from mlsurrogate.evaluate import evaluate_model, format_model_errors, plot_model_errors

    errors, dos = evaluate_model(args.model, args.snapshots)
    print(format_model_errors(errors))
    if args.plots:
        for path in plot_model_errors(errors, dos, args.plots):
            print(f"wrote {path}")
    return 0


def _explore(args: argparse.Namespace) -> int:
    import ase.io

    from mlsurrogate.candidates import (
        classical_md_frames,
        entropy_maximized_frames,
        model_md_frames,
    )
    from mlsurrogate.files import atomic_output, check_output_path

    check_output_path(args.output)
    atoms = _read_structure(args.structure)
    if args.method == "entropy":
        found = entropy_maximized_frames(
            atoms, args.k, steps=args.steps, every=args.every, step_size=args.step_size,
            r_min=args.r_min, seed=args.seed,
        )  # fmt: skip
        frames = [frame for _, frame in found]
    elif args.method == "model":
        if not args.model:
            raise UsageError("--method model needs --model ENSEMBLE.pt")
        runs = model_md_frames(
            args.model, atoms, args.temperatures, args.scales, steps=args.steps,
            every=args.every, timestep_fs=args.timestep, halt_deviation=args.halt,
            spacing=args.spacing, seed=max(args.seed, 1), ranks=args.ranks,
            check_every=args.check_every,
        )  # fmt: skip
        for run in runs:
            ending = run.error or ("stopped by fix halt" if run.halted else "all steps")
            print(f"{run.name}: {len(run.frames)} frames, {run.steps_done} steps ({ending})")
        frames = [frame for run in runs for frame in run.frames]
    else:
        found = classical_md_frames(
            atoms, args.temperatures, args.scales, steps=args.steps, every=args.every,
            timestep_fs=args.timestep, seed=args.seed,
        )  # fmt: skip
        frames = [frame for _, frame in found]
    if not frames:
        raise UsageError("no frames: every run stopped before its first frame; check less "
                         "often (--every) or explore with another method")  # fmt: skip
    with atomic_output(args.output) as tmp:
        ase.io.write(tmp, frames, format="extxyz")
    print(
        f"wrote {len(frames)} frames to {args.output}; next: mlsurrogate select "
        f"{args.output} --train SNAPSHOTS... -k K"
    )
    return 0


def _select(args: argparse.Namespace) -> int:
    import ase.io
    import numpy as np

    from mlsurrogate.data import Snapshot
    from mlsurrogate.files import atomic_output, check_output_path
    from mlsurrogate.selection import format_scores, pick, score_candidates

    if args.output:
        check_output_path(args.output)
    candidates = []
    for path in args.candidates:
        try:
            frames = ase.io.read(path, index=":")
        except Exception as exc:  # ase raises many types for unreadable files
            raise UsageError(f"cannot read {path}: {exc}") from exc
        for index, atoms in enumerate(frames):
            if args.elements:  # LAMMPS dumps: ase reads atom type t as atomic number t
                types = atoms.get_atomic_numbers()
                if types.max() > len(args.elements):
                    raise UsageError(
                        f"{path}: atom type {types.max()} but --elements names "
                        f"{len(args.elements)} types"
                    )
                atoms.set_chemical_symbols([args.elements[t - 1] for t in types])
            candidates.append((f"{path}:{index}", atoms))
    model = None
    if args.model:
        from mlsurrogate.model import Model

        model = Model.load(args.model)
    params = model.params if model is not None else _descriptor_params(args)
    spacing = args.spacing
    if spacing is None:  # the training grid's spacing: candidates sampled alike
        with Snapshot(args.train[0]) as snap:
            lengths = np.linalg.norm(np.asarray(snap.atoms.cell), axis=1)
            spacing = float((lengths / np.array(snap.grid_shape)).max())
    scores = score_candidates(
        candidates, args.train, params, spacing, model, tuple(args.trust), threads=args.threads
    )
    picks = pick(scores, args.k)
    print(format_scores(scores, picks))
    if args.output:
        with atomic_output(args.output) as tmp:
            ase.io.write(tmp, [candidates[i][1] for i in picks], format="extxyz")
        print(f"wrote {len(picks)} structures to {args.output}")
    return 0


def _learn(args: argparse.Namespace) -> int:
    from mlsurrogate.learn import LearnConfig, run_learning

    config = LearnConfig.from_toml(args.config)
    run_learning(config, log=_progress_log(args))
    print(f"report: {config.workdir / 'report.md'}; newest model: {config.workdir / 'model.pt'}")
    return 0


def _hpo_acsd(args: argparse.Namespace) -> int:
    from mlsurrogate.files import check_output_path
    from mlsurrogate.hpo.acsd import SCANNABLE, acsd_scan, best, format_table, plot_scan

    if args.plot:
        check_output_path(args.plot)
    values = {name: getattr(args, name) for name in SCANNABLE if getattr(args, name)}
    if not values:
        raise UsageError(f"give values to scan for at least one of --{', --'.join(SCANNABLE)}")
    results = acsd_scan(
        args.snapshots, values, grid=args.grid, points=args.points, seed=args.seed,
        threads=args.threads or 1, progress=not args.quiet,
    )  # fmt: skip
    print(format_table(results))
    lowest = best(results)
    print(f"lowest ACSD: {lowest.changes} ({lowest.acsd:.4f})")
    if args.plot:
        plot_scan(results, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _hpo_naswot(args: argparse.Namespace) -> int:
    from mlsurrogate.hpo.naswot import format_naswot, naswot_scan
    from mlsurrogate.hpo.trials import HpoConfig

    config = HpoConfig.from_toml(args.config)
    rows = naswot_scan(config, train=args.train, log=_progress_log(args))
    print(format_naswot(rows, config.objective))
    return 0


def _hpo_optuna(args: argparse.Namespace) -> int:
    from mlsurrogate.hpo.study import format_study, run_study

    return _hpo_search(args, run_study, format_study, "optuna.md")


def _hpo_oat(args: argparse.Namespace) -> int:
    from mlsurrogate.hpo.orthogonal_array import format_oat, run_oat

    return _hpo_search(args, run_oat, format_oat, "oat.md")


def _hpo_search(
    args: argparse.Namespace,
    run: Callable[..., Any],
    format_result: Callable[[Any, str], str],
    table_name: str,
) -> int:
    """A search that trains networks (Optuna, OAT): run it, print its table and keep it
    in the workdir."""
    from mlsurrogate.files import write_bytes_atomically
    from mlsurrogate.hpo.trials import HpoConfig

    config = HpoConfig.from_toml(args.config)
    table = format_result(run(config, log=_progress_log(args)), config.objective)
    write_bytes_atomically(config.workdir / table_name, (table + "\n").encode())
    print(table)
    print(f"results in {config.workdir} (table: {config.workdir / table_name})")
    return 0


def _progress_log(args: argparse.Namespace) -> Callable[[str], None]:
    """Where a long workflow reports its progress: stdout, or nowhere with --quiet."""
    return (lambda line: None) if args.quiet else print


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlsurrogate", description=__doc__)
    parser.add_argument("--version", action="version", version=mlsurrogate.__version__)
    sub = parser.add_subparsers(dest="command")
    info = sub.add_parser("info", help="show versions and where the compiled parts are")
    info.set_defaults(handler=lambda args: _info())

    desc = sub.add_parser(
        "descriptors",
        help="bispectrum descriptors on a grid for one structure (equal to LAMMPS sna/grid)",
        description="Compute SNAP bispectrum descriptors at every point of an nx x ny x nz "
        "grid of a periodic structure (any file ase.io.read understands) and save them as "
        ".npy, shape (nx, ny, nz, K). Defaults are MALA's aluminium parameters.",
    )
    desc.add_argument("structure", help="structure file (e.g. .xyz, .cif, QE .pwi/.pwo)")
    desc.add_argument("--grid", type=int, nargs=3, required=True, metavar=("NX", "NY", "NZ"))
    desc.add_argument("-o", "--output", default="descriptors.npy", help="output .npy file")
    _add_descriptor_options(desc)
    desc.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    desc.set_defaults(handler=_descriptors)

    qe = sub.add_parser("qe", help="run Quantum ESPRESSO and ingest its output")
    qe_sub = qe.add_subparsers(dest="qe_command", required=True)
    run = qe_sub.add_parser(
        "run",
        help="pw.x SCF, the LDOS and the density cube for one structure",
        description="Write pw.x/pp.x inputs for a structure, run the SCF, then the "
        "LDOS on an energy grid (ldos.h5, every energy in one pass over the wavefunctions, "
        "on a denser k-grid with --ldos-kpts; or pp.x's cubes) and the valence density. "
        "Defaults are "
        "the settings of the bundled Al dataset. Debian's QE uses Open MPI: for 2 ranks pass "
        "--pw-command '/usr/bin/mpirun -n 2 pw.x -nk 2' --pp-command '/usr/bin/mpirun -n 2 pp.x'.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run.add_argument("structure", help="structure file ase.io.read understands")
    run.add_argument("-o", "--output", required=True, help="run directory (created)")
    run.add_argument(
        "--pseudo",
        action="append",
        default=[],
        metavar="EL=FILE",
        help="pseudopotential per element (default Al=Al.pz-vbc.UPF)",
    )
    run.add_argument("--pseudo-dir", default="/usr/share/espresso/pseudo")
    run.add_argument("--ecutwfc", type=float, default=20.0, help="wavefunction cutoff (Ry)")
    run.add_argument(
        "--kspacing", type=float, default=0.2, help="k-point spacing (1/A, 2 pi incl.)"
    )
    run.add_argument(
        "--kpts", type=int, nargs=3, metavar=("K1", "K2", "K3"), help="explicit k-grid"
    )
    run.add_argument("--temperature", type=float, default=933.0, help="electronic temperature (K)")
    run.add_argument("--smearing", default="fd", help="pw.x smearing (fd or gaussian)")
    run.add_argument("--conv-thr", type=float, default=1e-10, help="SCF threshold (Ry)")
    run.add_argument(
        "--nbnd", type=int, default=None, help="bands (default: enough for the window)"
    )
    run.add_argument("--emin", type=float, default=-5.0, help="LDOS window start (eV, absolute)")
    run.add_argument("--emax", type=float, default=11.0, help="LDOS window end (eV, absolute)")
    run.add_argument("--de", type=float, default=0.1, help="LDOS energy spacing (eV)")
    run.add_argument(
        "--broadening", type=float, default=None, help="LDOS width (eV; default k_B T)"
    )
    run.add_argument(
        "--ldos-kpts",
        type=int,
        nargs=3,
        metavar=("K1", "K2", "K3"),
        help="k-grid of the LDOS (a pw.x nscf on the SCF density; default: the SCF's)",
    )
    run.add_argument(
        "--ldos-kspacing", type=float, default=None, help="k-spacing of the LDOS grid (1/A)"
    )
    run.add_argument(
        "--ldos-program",
        choices=("wavefunctions", "pp.x"),
        default="wavefunctions",
        help="LDOS from the wavefunctions in one pass (norm-conserving) or by pp.x per energy",
    )
    run.add_argument("--pw-command", default="pw.x", help="pw.x command line (launcher, flags)")
    run.add_argument("--pp-command", default="pp.x", help="pp.x command line (launcher, flags)")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    run.set_defaults(handler=_qe_run)

    ing = qe_sub.add_parser(
        "ingest",
        help="turn a QE run directory into one snapshot file (.h5)",
        description="Read the pw.x output, the pw.x XML, the pp.x LDOS input, the LDOS cubes "
        "and the density cube of a run directory, recognised by content whatever their names "
        "(docs/qe-ingest.md), convert to eV and Angstrom, compute descriptors with "
        "mlsurrogate's kernel, and write one HDF5 snapshot. File options are relative to the "
        "run directory unless absolute.",
    )
    ing.add_argument("directory", help="QE run directory")
    ing.add_argument("--pw-out", help="the pw.x output (default: found by content)")
    ing.add_argument("--xml", help="the pw.x XML, <prefix>.save/data-file-schema.xml")
    ing.add_argument("--ldos", metavar="GLOB", help="the LDOS cubes (a glob pattern)")
    ing.add_argument("--ldos-input", help="the pp.x LDOS input (plot_num = 3)")
    ing.add_argument("--density", help="the valence density cube")
    ing.add_argument(
        "--mala-ldos",
        metavar="FILE.npy",
        help="LDOS in MALA's layout ([nx, ny, nz, nE], 1/(eV A^3)) instead of cubes",
    )
    ing.add_argument("-o", "--output", required=True, help="snapshot file to write (.h5)")
    ing.add_argument("--no-descriptors", action="store_true", help="store no descriptors")
    ing.add_argument(
        "--ldos-mantissa-bits",
        type=int,
        default=23,
        help="round the stored LDOS to this many mantissa bits (23: exact float32)",
    )
    _add_descriptor_options(ing)
    ing.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    ing.set_defaults(handler=_qe_ingest)

    data = sub.add_parser("data", help="inspect and extend snapshot files")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    dinfo = data_sub.add_parser(
        "info",
        help="readable summary of snapshot files",
        description="Print structure, DFT settings, energy grid, QE energies and datasets.",
    )
    dinfo.add_argument("snapshots", nargs="+", help="snapshot files (.h5)")
    dinfo.set_defaults(handler=_data_info)
    dcompact = data_sub.add_parser(
        "compact",
        help="copies of snapshots with the LDOS at random grid points only (for the repository)",
        description="Write each snapshot into DIR with the LDOS at --points random grid points "
        "(seed + file index), its DOS, and all attributes and QE references; no descriptors "
        "and no density. Training accepts such files; what needs the full LDOS refuses them "
        "(docs/snapshot-format.md).",
    )
    dcompact.add_argument("snapshots", nargs="+", help="snapshot files (.h5)")
    dcompact.add_argument("-o", "--output", required=True, help="directory (it must exist)")
    dcompact.add_argument("--points", type=int, default=2000, help="grid points kept")
    dcompact.add_argument("--seed", type=int, default=0, help="seed of the first file's draw")
    dcompact.set_defaults(handler=_data_compact)
    drep = data_sub.add_parser(
        "replicate",
        help="the snapshot of a supercell of a snapshot's cell (exact, from the cell's data)",
        description="Write the snapshot of the N1 x N2 x N3 supercell: grid arrays tiled, atoms "
        "repeated in ASE's order, QE's energies and electron count scaled, k-grids divided "
        "(they must divide). A compact snapshot keeps its point count, each point moved to "
        "an image drawn with --seed (docs/snapshot-format.md).",
    )
    drep.add_argument("snapshot", help="snapshot file (.h5)")
    drep.add_argument("repeat", nargs=3, type=int, metavar="N", help="images along a, b, c")
    drep.add_argument("-o", "--output", required=True, help="snapshot file to write (.h5)")
    drep.add_argument("--seed", type=int, default=0, help="seed of a compact file's images")
    drep.set_defaults(handler=_data_replicate)
    ddesc = data_sub.add_parser(
        "descriptors",
        help="compute descriptors on a snapshot's grid and store them",
        description="Compute descriptors with mlsurrogate's kernel on the snapshot's own grid "
        "and store them in it (replacing any), or in a copy given by -o.",
    )
    ddesc.add_argument("snapshot", help="snapshot file (.h5)")
    ddesc.add_argument("-o", "--output", default=None, help="write a copy instead")
    _add_descriptor_options(ddesc)
    ddesc.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    ddesc.set_defaults(handler=_data_descriptors)
    edft = sub.add_parser(
        "evaluate-dft",
        help="energy terms from a snapshot's own DFT LDOS next to QE's printout",
        description="Evaluate the free-energy functional (Fermi level, band energy, -TS, "
        "Hartree, XC, ion-ion by LAMMPS Ewald, total) on the snapshot's QE LDOS, and "
        "Hartree/XC also on QE's density, next to the values QE printed; differences in "
        "meV/atom.",
    )
    edft.add_argument("snapshots", nargs="+", help="snapshot files (.h5)")
    edft.set_defaults(handler=_evaluate_dft)

    tr = sub.add_parser(
        "train",
        help="train an LDOS network on snapshot files",
        description="Train a descriptor -> LDOS network (config file and/or flags; flags win). "
        "Writes a checkpoint after every epoch; --resume continues it exactly.",
    )
    tr.add_argument("config", nargs="?", help="TOML file with TrainingConfig keys")
    tr.add_argument("-o", "--output", required=True, help="checkpoint file (.pt)")
    tr.add_argument("--train", nargs="+", help="training snapshots (.h5)")
    tr.add_argument("--validation", nargs="+", help="validation snapshots (.h5)")
    tr.add_argument("--epochs", type=int, dest="epochs", help="maximum epochs")
    tr.add_argument("--batch-size", type=int)
    tr.add_argument("--learning-rate", type=float)
    tr.add_argument("--hidden", type=int, nargs="+", help="hidden layer widths")
    tr.add_argument("--activation", help="leaky_relu (default), relu, tanh, silu or gelu")
    tr.add_argument("--seed", type=int)
    tr.add_argument("--device", help="cpu, cuda or cuda:N")
    tr.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    tr.add_argument("--resume", action="store_true", help="continue the checkpoint")
    tr.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(handler=_train)

    ex = sub.add_parser(
        "export",
        help="write the TorchScript model file the pair style loads",
        description="Export the best network of a checkpoint with its scalers, descriptor "
        "parameters, energy grid, temperature, elements, valence charges, masses, XC "
        "functional and energy functional as one TorchScript file (metadata.json inside). "
        "Several checkpoints (same data and descriptors, e.g. different seeds) are exported "
        "as an ensemble that predicts their mean LDOS.",
    )
    ex.add_argument("checkpoints", nargs="+", help="checkpoint(s) written by mlsurrogate train")
    ex.add_argument("-o", "--output", required=True, help="model file (.pt)")
    ex.add_argument(
        "--dtype",
        choices=["float64", "float32"],
        default="float64",
        help="network precision (float64: smooth forces for MD)",
    )
    ex.set_defaults(handler=_export)

    ev = sub.add_parser(
        "evaluate",
        help="errors of a model against QE snapshots, with plots",
        description="LDOS RMSE, density error, band energy, Hartree energy, total free "
        "energy, Fermi level and force errors of an exported model against each snapshot's "
        "DFT data; of a compact snapshot the LDOS and density errors over its stored points.",
    )
    ev.add_argument("model", help="exported model (.pt)")
    ev.add_argument("snapshots", nargs="+", help="snapshot files (.h5)")
    ev.add_argument("--plots", default=None, help="directory for PNG plots")
    ev.set_defaults(handler=_evaluate)

    explore = sub.add_parser(
        "explore",
        help="candidate structures: EMT MD, the model's own MD with fix halt, or entropy "
        "maximization",
        description="Candidates for the next DFT snapshots, a frame every --every steps "
        "(docs/active-learning.md#candidates). emt: Langevin MD with ASE's EMT (Al, Cu, "
        "Ag, Au, Ni, Pd, Pt) at each temperature and lattice scaling. model: Langevin MD "
        "in LAMMPS with an ensemble model, stopped by fix halt once its max force deviation "
        "exceeds --halt. entropy: moves that raise (K > 0) or lower (K < 0) the entropy of "
        "the atoms' descriptors against a repulsive core (Montes de Oca Zapiain et al. "
        "2022). The frames go to `mlsurrogate select`.",
    )
    explore.add_argument("structure", help="start structure (any ase.io format)")
    explore.add_argument(
        "--method",
        choices=("emt", "model", "entropy"),
        default="emt",
        help="how to explore (default emt)",
    )
    explore.add_argument(
        "--temperatures",
        nargs="+",
        type=float,
        default=[933.0],
        help="temperatures, K (emt, model; default 933)",
    )
    explore.add_argument(
        "--scales",
        nargs="+",
        type=float,
        default=[1.0],
        help="lattice scalings of the cell (emt, model; default 1)",
    )
    explore.add_argument(
        "--steps", type=int, default=1000, help="MD steps per run, or entropy moves per K (1000)"
    )
    explore.add_argument(
        "--every", type=int, default=100, help="steps (moves) between frames (100)"
    )
    explore.add_argument("--timestep", type=float, default=2.0, help="fs (default 2)")
    explore.add_argument("--seed", type=int, default=0, help="velocities, noise, moves (0)")
    explore.add_argument("--model", help="model: the ensemble (.pt)")
    explore.add_argument(
        "--halt",
        type=float,
        default=0.15,
        help="model: stop a run above this max force deviation, eV/A (0.15)",
    )
    explore.add_argument(
        "--check-every",
        type=int,
        default=None,
        help="model: steps between deviation checks (default --every)",
    )
    explore.add_argument(
        "--spacing", type=float, default=0.5, help="model: MD grid spacing, A (0.5)"
    )
    explore.add_argument("--ranks", type=int, default=1, help="model: MPI ranks (1)")
    explore.add_argument(
        "-k",
        nargs="+",
        type=float,
        default=[1.0, -1.0],
        help="entropy: weights K of the entropy, one run each (1 -1)",
    )
    explore.add_argument(
        "--step-size",
        type=float,
        default=0.1,
        help="entropy: standard deviation of a move, A (0.1)",
    )
    explore.add_argument(
        "--r-min",
        type=float,
        default=2.2,
        help="entropy: repulsive core below this distance, A (2.2)",
    )
    explore.add_argument("-o", "--output", required=True, help="frames file (extxyz)")
    explore.set_defaults(handler=_explore)

    select = sub.add_parser(
        "select",
        help="pick the next structures to label with DFT",
        description="Score candidate structures by descriptor-space dissimilarity to the "
        "training snapshots (PCA: PC1 mean distance, PC1 Wasserstein distance, "
        "reconstruction error) and, with an ensemble model, by its force deviation and "
        "dpgen's trust levels; pick K diverse ones (farthest-point order).",
    )
    select.add_argument(
        "candidates",
        nargs="+",
        help="structure files (any ase.io format; "
        "every frame of a trajectory or LAMMPS dump is a candidate)",
    )
    select.add_argument("--train", nargs="+", required=True, help="training snapshots (.h5)")
    select.add_argument("-k", type=int, default=1, help="structures to pick (default 1)")
    select.add_argument("--model", help="ensemble model (.pt): uncertainty and trust levels")
    select.add_argument(
        "--trust",
        nargs=2,
        type=float,
        default=[0.05, 0.15],
        metavar=("LOW", "HIGH"),
        help="trust levels on the max force deviation, eV/A (default 0.05 0.15)",
    )
    select.add_argument(
        "--spacing",
        type=float,
        default=None,
        help="grid spacing of the candidates' descriptors, A (default: "
        "that of the first training snapshot)",
    )
    select.add_argument(
        "--elements",
        nargs="+",
        default=None,
        help="element of LAMMPS atom types 1, 2, ... (for dumps)",
    )
    select.add_argument("-o", "--output", default=None, help="write the picks (extxyz)")
    _add_descriptor_options(select)
    select.set_defaults(handler=_select)

    learn = sub.add_parser(
        "learn",
        help="active learning: explore, select, label with QE, retrain, evaluate, repeat",
        description="Run (or resume after a kill) the active-learning loop a TOML file "
        "describes (docs/active-learning.md): each iteration trains an ensemble, evaluates "
        "it on the held-out references, explores candidates (EMT or the model's own MD "
        "with fix halt), picks by trust level and descriptor-space diversity, and labels "
        "the picks with pw.x + pp.x. Writes WORKDIR/report.md, plots and WORKDIR/model.pt.",
    )
    learn.add_argument("config", help="learn TOML file")
    learn.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    learn.set_defaults(handler=_learn)

    hpo = sub.add_parser("hpo", help="descriptor and network search: ACSD, NASWOT, Optuna, OAT")
    hpo_sub = hpo.add_subparsers(dest="hpo_command", required=True)
    acsd = hpo_sub.add_parser(
        "acsd",
        help="score descriptor settings from data alone (ACSD; lower is better)",
        description="Average cosine similarity distance (Fiedler et al. 2022, Eqs. 8-9) of "
        "descriptor settings on grid points of snapshots: per snapshot, POINTS points and "
        "all pairs among them; |S_C(LDOS) - S_C(descriptors)| averaged. Unscanned keywords "
        "keep MALA's aluminium values. One keyword at a time, or every combination (--grid).",
    )
    acsd.add_argument("snapshots", nargs="+", help="snapshot files (.h5) with LDOS")
    for name, kind in (
        ("rcutfac", float),
        ("rfac0", float),
        ("twojmax", int),
        ("radius", float),
        ("weight", float),
        ("rmin0", float),
    ):
        acsd.add_argument(
            f"--{name}", nargs="+", type=kind, default=None, help=f"values of {name} to score"
        )
    acsd.add_argument(
        "--grid",
        action="store_true",
        help="every combination of the scanned values, not one at a time",
    )
    acsd.add_argument("--points", type=int, default=200, help="points per snapshot (200)")
    acsd.add_argument("--seed", type=int, default=0, help="of the point sample (0)")
    acsd.add_argument("--threads", type=int, default=None, help="kernel threads (1)")
    acsd.add_argument("--plot", default=None, help="write the ACSD curves (PNG)")
    acsd.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    acsd.set_defaults(handler=_hpo_acsd)
    search_help = (
        "search TOML: [hpo] training = base recipe, workdir, objective, trials, "
        "naswot_threshold ...; [space] the settings and their levels "
        "(docs/hyperparameter-search.md)"
    )
    naswot = hpo_sub.add_parser(
        "naswot",
        help="score network architectures at initialisation (NASWOT; higher is better)",
        description="NASWOT score S' = mean + std over initialisations of -sum_i "
        "[log(sigma_i + k) + 1/(sigma_i + k)], sigma_i the eigenvalues of the correlation "
        "matrix of the per-sample input Jacobians on one mini-batch of the training data "
        "(Fiedler et al. 2022, Eqs. 5-6), for every layers x width x activation of [space]. "
        "With --train, also trains each one and prints Kendall's tau.",
    )
    naswot.add_argument("config", help=search_help)
    naswot.add_argument(
        "--train", action="store_true", help="train every architecture too (resumable) and compare"
    )
    naswot.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    naswot.set_defaults(handler=_hpo_naswot)
    optuna_parser = hpo_sub.add_parser(
        "optuna",
        help="Optuna TPE study over [space] with a NASWOT pruner (resumable)",
        description="Draw [space] values with Optuna's TPE sampler, prune trials whose "
        "NASWOT score is below naswot_threshold, train the rest with the base recipe and "
        "minimise the objective. The study is kept in WORKDIR/study.db: run again to resume "
        "after a kill (the interrupted trial resumes from its checkpoint).",
    )
    optuna_parser.add_argument("config", help=search_help)
    optuna_parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    optuna_parser.set_defaults(handler=_hpo_optuna)
    oat = hpo_sub.add_parser(
        "oat",
        help="orthogonal-array tuning over the [space] levels, with range analysis",
        description="Train one network per row of a strength-2 orthogonal array over the "
        "[space] levels, print the mean objective per level and each factor's importance "
        "(max - min), then train the best level of every factor. Resumable.",
    )
    oat.add_argument("config", help=search_help)
    oat.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    oat.set_defaults(handler=_hpo_oat)
    return parser


def _verbs(parser: argparse.ArgumentParser, words: list[str]) -> Iterator[tuple[str, str]]:
    """(command line, help text) of ``parser`` and of every verb below it, depth first."""
    yield " ".join(words), parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                yield from _verbs(subparser, [*words, name])


def cli_reference() -> str:
    """docs/cli.md: every verb's ``--help`` (argparse is the one source of the options)."""
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps at the terminal width
    try:
        pages = list(_verbs(_build_parser(), ["mlsurrogate"]))
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns
    lines = [
        "# Command line: `mlsurrogate <verb>`",
        "",
        "This page is generated by `mlsurrogate.cli.cli_reference()`, and a test checks that",
        "it is current. A user error ends with `mlsurrogate <verb>: <problem>` on stderr and",
        "exit code 2, without a traceback. Long work shows a progress bar (`-q` silences it);",
        "outputs are written under a temporary name and renamed when complete, and their",
        "directory is checked before the work starts.",
    ]
    for command, text in pages:
        lines += ["", f"## `{command}`", "", "```", text.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from mlsurrogate.data import SnapshotError
    from mlsurrogate.files import OutputError
    from mlsurrogate.qe import QEError

    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    name = " ".join(
        filter(
            None,
            [args.command, *(getattr(args, f"{v}_command", None) for v in ("qe", "data", "hpo"))],
        )
    )
    try:
        return args.handler(args)
    except (UsageError, QEError, SnapshotError, OutputError, ValueError) as exc:
        print(f"mlsurrogate {name}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file the user named cannot be read or written
        print(f"mlsurrogate {name}: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
