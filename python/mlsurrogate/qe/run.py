"""Running pw.x and pp.x: a run directory made by :func:`run_qe` holds::

    pw.in  pw.out  out/pwscf.save/data-file-schema.xml       (SCF)
    ldos.h5                                                   (LDOS from the wavefunctions)
    ldos_nscf/pw.in  ldos_nscf/pw.out    (the LDOS k-grid's non-self-consistent run, when
                                          its k-grid differs from the SCF's or the SCF
                                          used symmetry; its wavefunctions are removed)
    pp_density.in  pp_density.out  density.cube                (valence density, plot_num=0)

or, with ``ldos_program = "pp.x"``, ``pp_ldos.in  pp_ldos.out  ldos_001.cube ...`` (pp.x
plot_num=3) instead of ``ldos.h5``.

:func:`mlsurrogate.qe.ingest` does not need these names: it recognises files by content.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import ase

from mlsurrogate.qe.errors import QEError
from mlsurrogate.qe.ldos import (
    LDOS_FILE,
    check_supported,
    compute_ldos,
    require_norm_conserving,
    write_ldos_file,
)
from mlsurrogate.qe.readers import read_pw_xml
from mlsurrogate.qe.settings import (
    BROADENING_KERNELS,
    LDOS_NSCF_DIR,
    LDOS_STEM,
    OUTDIR,
    PREFIX,
    QESettings,
    kpoint_grid,
    ldos_kpoint_grid,
    write_pp_inputs,
    write_pw_input,
)

_XML = f"{OUTDIR}/{PREFIX}.save/data-file-schema.xml"


def _qe_error_message(text: str) -> str:
    """The message inside QE's %%%% error block, if any."""
    match = re.search(r"%{10,}\n(.*?)\n\s*%{10,}", text, re.S)
    return " ".join(match.group(1).split()) if match else ""


def _run_program(
    command: str,
    input_name: str,
    directory: Path,
    count: Callable[[], int],
    report: Callable[[int], None],
    diagnose: Callable[[str], str | None] = lambda text: None,
) -> str:
    """Run ``command -in input_name`` in ``directory``; output to <input stem>.out.

    ``count`` measures progress (e.g. cube files written) and ``report`` receives it
    while the program runs. ``diagnose`` turns a known failure in the output into a
    specific message, checked before the generic exit-code error.
    """
    argv = shlex.split(command) + ["-in", input_name]
    if shutil.which(argv[0]) is None:
        raise QEError(
            f"{argv[0]!r} not found on PATH (command {command!r}). Install Quantum ESPRESSO "
            "(Debian: apt-get install quantum-espresso quantum-espresso-data) or pass the "
            "full path of pw.x/pp.x."
        )
    output_path = directory / (Path(input_name).stem + ".out")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    if os.geteuid() == 0:  # Open MPI's mpirun refuses root unless told (containers, CI)
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    with open(output_path, "w") as output:
        process = subprocess.Popen(
            argv, cwd=directory, stdout=output, stderr=subprocess.STDOUT, env=env
        )
        while process.poll() is None:
            time.sleep(0.25)
            report(count())
    report(count())
    text = output_path.read_text(errors="replace")
    problem = diagnose(text)
    if problem:
        raise QEError(f"{output_path}: {problem}")
    if process.returncode != 0 or "JOB DONE" not in text:
        detail = _qe_error_message(text) or " | ".join(text.strip().splitlines()[-5:])
        raise QEError(
            f"{command!r} failed on {directory / input_name} (exit code {process.returncode}); "
            f"see {output_path}: {detail}"
        )
    return text


def mpi_commands(ranks: int) -> dict[str, str]:
    """``pw_command`` and ``pp_command`` of QESettings for ``ranks`` MPI ranks with
    Debian's QE: it is linked to Debian's Open MPI, so its ``/usr/bin/mpirun`` (not the
    launcher of another MPI on PATH), and k-point pools for pw.x. Serial without it."""
    if ranks > 1 and Path("/usr/bin/mpirun").exists():
        launcher = f"/usr/bin/mpirun -n {ranks}"
        return {"pw_command": f"{launcher} pw.x -nk {ranks}", "pp_command": f"{launcher} pp.x"}
    return {"pw_command": "pw.x", "pp_command": "pp.x"}


def run_pw(
    atoms: ase.Atoms,
    settings: QESettings,
    directory: str | os.PathLike[str],
    *,
    ldos_nscf: bool = False,
    progress: bool = True,
) -> Path:
    """Run pw.x in ``directory`` (pw.in, pw.out, out/); return the directory. The SCF, or
    with ``ldos_nscf`` the non-self-consistent run of the LDOS k-grid, which needs the
    SCF's density in ``directory/out`` (:func:`run_ldos` puts it there)."""
    from tqdm import tqdm

    settings.validate()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pw.in").write_text(write_pw_input(atoms, settings, ldos_nscf=ldos_nscf))
    marker = "Computing kpt #" if ldos_nscf else "total energy  "

    def steps() -> int:
        out = directory / "pw.out"
        return out.read_text(errors="replace").count(marker) if out.exists() else 0

    unit = "k" if ldos_nscf else "it"
    desc = "pw.x nscf k-points" if ldos_nscf else "pw.x scf iterations"
    with tqdm(desc=desc, unit=unit, disable=not progress) as bar:
        _run_program(
            settings.pw_command,
            "pw.in",
            directory,
            steps,
            lambda n: bar.update(n - bar.n),
            diagnose=lambda text: (
                None
                if "convergence NOT achieved" not in text
                else f"the SCF did not converge in {settings.electron_maxstep} iterations "
                f"(conv_thr {settings.conv_thr_ry} Ry); raise electron_maxstep"
            ),
        )
    return directory


def run_pp_ldos(
    settings: QESettings, directory: str | os.PathLike[str], *, progress: bool = True
) -> Path:
    """Run pp.x for the LDOS cubes of the finished SCF in ``directory`` (writes
    pp_ldos.in); cubes of an earlier LDOS run there are removed first."""
    from tqdm import tqdm

    directory = Path(directory)
    (directory / "pp_ldos.in").write_text(write_pp_inputs(settings)["pp_ldos.in"])

    def cubes() -> int:
        return len(list(directory.glob(f"{LDOS_STEM}*.cube")))

    for stale in directory.glob(f"{LDOS_STEM}*.cube"):
        stale.unlink()
    with tqdm(
        total=settings.num_ldos_energies, desc="pp.x LDOS", unit="cube", disable=not progress
    ) as bar:
        _run_program(
            settings.pp_command, "pp_ldos.in", directory, cubes, lambda n: bar.update(n - bar.n)
        )
    # pp.x also leaves its intermediate plot files; the cubes hold the same data.
    for raw in directory.glob(f"{LDOS_STEM}[0-9][0-9][0-9]"):
        raw.unlink()
    return directory


def run_ldos(
    atoms: ase.Atoms,
    settings: QESettings,
    directory: str | os.PathLike[str],
    *,
    progress: bool = True,
) -> Path:
    """The LDOS of the finished SCF in ``directory`` with ``settings.ldos_program``.

    From the wavefunctions (``ldos.h5``): of the SCF itself when its k-grid is the LDOS
    k-grid, it used no symmetry and its bands reach past the window, else of a
    non-self-consistent run in ``ldos_nscf/`` on the SCF's density (its wavefunctions are
    removed afterwards), with as many more bands as the window needs (a liquid or an
    expanded cell has more bands below the window's end than the default count). The
    window is checked against that run's bands before the LDOS is made."""
    directory = Path(directory)
    scf = read_pw_xml(directory / _XML)
    width = settings.ldos_broadening
    if settings.ldos_program == "pp.x":  # pp.x reads the SCF's bands: they must suffice
        scf.check_ldos_window(settings.ldos_emin_ev, settings.ldos_emax_ev, width)
        return run_pp_ldos(settings, directory, progress=progress)
    scf.check_ldos_window_start(settings.ldos_emin_ev, width)
    bands = scf.bands_for_window_end(settings.ldos_emax_ev, width)
    kernel = BROADENING_KERNELS[settings.smearing.lower()]
    nscf = (
        bands is not None
        or ldos_kpoint_grid(atoms, settings) != kpoint_grid(atoms, settings)
        or scf.symmetry_count > 1
    )
    check_supported(replace(scf, symmetry_count=1) if nscf else scf, kernel, directory / _XML)
    save = directory / OUTDIR / f"{PREFIX}.save"
    if nscf:
        nscf_save = directory / LDOS_NSCF_DIR / OUTDIR / f"{PREFIX}.save"
        shutil.rmtree(nscf_save, ignore_errors=True)
        nscf_save.mkdir(parents=True)
        for name in ("data-file-schema.xml", "charge-density.dat"):
            shutil.copy2(save / name, nscf_save / name)
        nscf_settings = settings if bands is None else replace(settings, nbnd=bands)
        run_pw(atoms, nscf_settings, directory / LDOS_NSCF_DIR, ldos_nscf=True, progress=progress)
        save = nscf_save
    read_pw_xml(save / "data-file-schema.xml").check_ldos_window(
        settings.ldos_emin_ev, settings.ldos_emax_ev, width
    )
    result = compute_ldos(
        save, settings.ldos_energies, settings.ldos_broadening, kernel, progress=progress
    )
    write_ldos_file(directory / LDOS_FILE, result)
    if nscf:
        shutil.rmtree(directory / LDOS_NSCF_DIR / OUTDIR)
    return directory


def run_qe(
    atoms: ase.Atoms,
    settings: QESettings,
    directory: str | os.PathLike[str],
    *,
    progress: bool = True,
) -> Path:
    """Run pw.x (SCF), the LDOS (:func:`run_ldos`) and pp.x for the valence density, in
    ``directory``."""
    if settings.ldos_program == "wavefunctions":  # before the SCF, not after
        require_norm_conserving(
            {
                s: Path(settings.pseudo_dir) / settings.pseudopotentials[s]
                for s in set(atoms.symbols)
            }
        )
    directory = run_pw(atoms, settings, directory, progress=progress)
    run_ldos(atoms, settings, directory, progress=progress)
    (directory / "pp_density.in").write_text(write_pp_inputs(settings)["pp_density.in"])
    _run_program(settings.pp_command, "pp_density.in", directory, lambda: 0, lambda n: None)
    (directory / "density_raw").unlink(missing_ok=True)
    return directory
