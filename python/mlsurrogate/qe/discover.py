"""Find the files of one QE run in a directory by their content, whatever their names.

What identifies each file (docs/qe-ingest.md lists the same):

* pw.x output: the text ``Program PWSCF`` in its first 4 kB, and not a non-self-consistent
  run (``End of band structure calculation``: the LDOS k-grid's run of ``run_qe``);
* pw.x XML: ``data-file-schema.xml`` inside any ``<prefix>.save`` directory;
* pp.x LDOS input: a namelist ``&inputpp`` with ``plot_num = 3``;
* LDOS from wavefunctions: an HDF5 file with the attribute ``format =
  mlsurrogate-ldos-1`` (``ldos.h5`` of :func:`mlsurrogate.qe.run_qe`); it holds the energy
  grid, the width and the k-set itself;
* LDOS cubes: cube files whose comment line states the energy (pp.x 6.7 writes
  ``Energy =  -8.0000 eV, broadening =   0.3000 eV``); the energy of a cube is that
  header value, not its file name; a cube without one gets the energy of the number in
  its name (pp.x's 1-based index). The pp.x input gives the exact grid and width; without
  one they come from the cube headers;
* density cube: the ``fileout`` of a pp.x input with ``plot_num = 0``; without one, the
  other cube whose values integrate to the run's electron count.

Each may be named explicitly instead (the ``ingest`` overrides); two candidates for one
role are an error that lists them and names the override.
"""

from __future__ import annotations

import glob
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlsurrogate.qe.errors import QEError
from mlsurrogate.qe.ldos import is_ldos_file
from mlsurrogate.qe.readers import LdosEnergyGrid, read_cube, read_ldos_energy_grid, read_pw_xml

_HEAD_BYTES = 4096
_CUBE_ENERGY = re.compile(r"Energy\s*=\s*([-+0-9.eEdD]+)\s*eV")
_FILEOUT = r"\bfileout\s*=\s*['\"]([^'\"]+)['\"]"
_CUBE_BROADENING = re.compile(r"broadening\s*=\s*([-+0-9.eEdD]+)\s*eV")
# Header energies are printed with a few decimals; anything closer than this to a grid
# energy is that energy.
_ENERGY_TOLERANCE_EV = 1e-3
# Relative tolerance on the electron count of a density cube.
_DENSITY_COUNT_TOLERANCE = 1e-3


@dataclass(frozen=True)
class RunFiles:
    """The files of one run, each with its role; cubes in energy order."""

    pw_output: Path
    xml: Path
    ldos_input: Path | None  # None: energy grid and width from the cube headers
    energy_grid: LdosEnergyGrid
    ldos_cubes: list[Path]
    density: Path | None


def _head(path: Path) -> str:
    try:
        with open(path, "rb") as handle:
            return handle.read(_HEAD_BYTES).decode("utf-8", errors="replace")
    except OSError:
        return ""


def _in_save_directory(path: Path, directory: Path) -> bool:
    return any(part.endswith(".save") for part in path.relative_to(directory).parts[:-1])


def _cube_header(head: str) -> str | None:
    """The two comment lines of a cube file, or None when ``head`` is not a cube's start."""
    lines = head.splitlines()
    try:
        natoms = int(lines[2].split()[0])
        [float(x) for x in lines[2].split()[1:4]]
        for axis in lines[3:6]:
            fields = axis.split()
            int(fields[0])
            [float(x) for x in fields[1:4]]
    except (IndexError, ValueError):
        return None
    return None if natoms < 0 else lines[0] + "\n" + lines[1]


def _is_pp_input(head: str, plot_num: int) -> bool:
    """A pp.x input (namelist &inputpp) with this plot_num."""
    match = re.search(r"\bplot_num\s*=\s*(\d+)", head, re.I)
    return (
        re.search(r"&inputpp", head, re.I) is not None
        and match is not None
        and int(match.group(1)) == plot_num
    )


def _resolve(directory: Path, name: str | os.PathLike[str]) -> Path:
    """An override path: absolute, or relative to the run directory."""
    path = Path(name)
    path = path if path.is_absolute() else directory / path
    if not path.is_file():
        raise QEError(f"{path}: no such file")
    return path


def _one(candidates: list[Path], role: str, override: str, directory: Path) -> Path:
    if not candidates:
        raise QEError(f"{directory}: no {role} found; name it with {override}")
    if len(candidates) > 1:
        listed = ", ".join(str(p) for p in candidates)
        raise QEError(f"{directory}: several {role} files ({listed}); choose one with {override}")
    return candidates[0]


def _number(text: str) -> float:
    return float(text.replace("d", "e").replace("D", "e"))


def _grid_from_headers(cubes: dict[Path, str]) -> LdosEnergyGrid:
    """The energy grid and width stated in the headers of pp.x's LDOS cubes."""
    stated = [m.group(1) for c in cubes.values() if (m := _CUBE_ENERGY.search(c))]
    energies = np.array(sorted(_number(e) for e in stated))
    widths = {_number(m.group(1)) for c in cubes.values() if (m := _CUBE_BROADENING.search(c))}
    if len(widths) != 1 or len(stated) != len(cubes) or len(stated) < 2:
        raise QEError(
            f"no pp.x LDOS input (plot_num = 3) found, and the cube headers do not state one "
            f"broadening width and an energy grid (widths {sorted(widths)}); name the pp.x "
            "input with --ldos-input FILE"
        )
    spacing = float(np.min(np.diff(energies)))
    return LdosEnergyGrid(
        emin=float(energies[0]),
        emax=float(energies[-1]),
        spacing=spacing,
        width=widths.pop(),
        filplot="",
        fileout="",
    )


def _cube_energy(path: Path, comment: str, grid: LdosEnergyGrid) -> float:
    """The energy a cube holds: its header's, else pp.x's file-name index."""
    stated = _CUBE_ENERGY.search(comment)
    if stated is not None:
        return _number(stated.group(1))
    numbers = re.findall(r"\d+", path.name)
    if not numbers:
        raise QEError(
            f"{path}: an LDOS cube without 'Energy = ... eV' in its header and without an "
            "index in its name: its energy is unknown"
        )
    return grid.emin + (int(numbers[-1]) - 1) * grid.spacing


def _order_ldos_cubes(cubes: dict[Path, str], grid: LdosEnergyGrid, source: str) -> list[Path]:
    """The cubes in energy order; every energy of the pp.x grid must have exactly one."""
    by_index: dict[int, Path] = {}
    for path, comment in sorted(cubes.items()):
        energy = _cube_energy(path, comment, grid)
        index = round((energy - grid.emin) / grid.spacing)
        if abs(grid.emin + index * grid.spacing - energy) > _ENERGY_TOLERANCE_EV:
            raise QEError(
                f"{path}: energy {energy} eV is not on the energy grid of {source} "
                f"({grid.emin} + i * {grid.spacing} eV)"
            )
        if index in by_index:
            raise QEError(
                f"{by_index[index]} and {path} are both LDOS cubes at {energy:.4f} eV; "
                "remove one or select the cubes with --ldos GLOB"
            )
        by_index[index] = path
    count = grid.count
    if grid.count_is_ambiguous and count - 1 not in by_index:
        count -= 1
    missing = [i for i in range(count) if i not in by_index]
    extra = sorted(i for i in by_index if not 0 <= i < count)
    if missing or extra:
        names = [f"{grid.pp_name(i)} ({grid.emin + i * grid.spacing:.4f} eV)" for i in missing]
        outside = [f"{by_index[i].name} ({grid.emin + i * grid.spacing:.4f} eV)" for i in extra]
        raise QEError(
            f"the energy grid of {source} has {count} energies, but "
            + (f"LDOS files are missing: {', '.join(names[:5])}" if missing else "")
            + (" and " if missing and extra else "")
            + (f"there are extra LDOS files outside it: {', '.join(outside[:5])}" if extra else "")
        )
    return [by_index[i] for i in range(count)]


def _density_candidates(cubes: list[Path], electrons: float) -> list[Path]:
    """Cubes whose values integrate to ``electrons`` (1/bohr^3 over the cell)."""
    found = []
    for path in cubes:
        cube = read_cube(path)
        volume = abs(float(np.linalg.det(cube.cell)))
        count = float(cube.data.sum()) * volume / cube.data.size
        if math.isclose(count, electrons, rel_tol=_DENSITY_COUNT_TOLERANCE):
            found.append(path)
    return found


class RunDirectory:
    """The files under one run directory (searched recursively, ``*.save`` excluded),
    read once; roles are assigned by the methods, each with its overrides (paths absolute
    or relative to the directory; ``ldos`` a glob pattern, relative unless absolute)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise QEError(f"{self.directory}: not a directory")
        files = sorted(
            p
            for p in self.directory.rglob("*")
            if p.is_file() and not _in_save_directory(p, self.directory)
        )
        self.heads = {p: _head(p) for p in files}
        self.cubes = {p: c for p, h in self.heads.items() if (c := _cube_header(h)) is not None}
        self.ldos_cube_paths: set[Path] = set()  # set by ldos_files

    def scf_files(
        self,
        pw_out: str | os.PathLike[str] | None = None,
        xml: str | os.PathLike[str] | None = None,
    ) -> tuple[Path, Path]:
        """The pw.x output and the pw.x XML."""
        directory = self.directory
        pw_path = (
            _resolve(directory, pw_out)
            if pw_out is not None
            else _one(
                [
                    p
                    for p, h in self.heads.items()
                    if "Program PWSCF" in h
                    and "End of band structure calculation" not in p.read_text(errors="replace")
                ],
                "pw.x output ('Program PWSCF')",
                "--pw-out FILE",
                directory,
            )
        )
        xml_path = (
            _resolve(directory, xml)
            if xml is not None
            else _one(
                sorted(directory.rglob("*.save/data-file-schema.xml")),
                "pw.x XML (<prefix>.save/data-file-schema.xml)",
                "--xml FILE",
                directory,
            )
        )
        return pw_path, xml_path

    def ldos_file(self) -> Path | None:
        """The LDOS computed from wavefunctions (by content), None if there is none."""
        found = [p for p in self.heads if is_ldos_file(p)]
        if not found:
            return None
        if any(_CUBE_ENERGY.search(c) for c in self.cubes.values()):
            raise QEError(
                f"{self.directory}: both an LDOS file ({found[0]}) and LDOS cubes; choose the "
                "cubes with --ldos GLOB or remove one"
            )
        return _one(found, "LDOS file (format mlsurrogate-ldos-1)", "--ldos GLOB", self.directory)

    def ldos_files(
        self,
        ldos: str | None = None,
        ldos_input: str | os.PathLike[str] | None = None,
        need_cubes: bool = True,
    ) -> tuple[Path | None, LdosEnergyGrid, list[Path]]:
        """The pp.x LDOS input (None: grid from the cube headers), the energy grid and the
        LDOS cubes in energy order (none when ``need_cubes`` is False)."""
        directory = self.directory
        if ldos is not None:
            pattern = ldos if Path(ldos).is_absolute() else str(directory / ldos)
            chosen = sorted(Path(p) for p in glob.glob(pattern))
            if not chosen:
                raise QEError(f"--ldos {ldos!r}: no file matches {pattern}")
            ldos_cubes = {p: _cube_header(_head(p)) or "" for p in chosen}
        else:
            ldos_cubes = {p: c for p, c in self.cubes.items() if _CUBE_ENERGY.search(c)}
            if need_cubes and not ldos_cubes:
                raise QEError(
                    f"{directory}: no LDOS cubes (cube files with 'Energy = ... eV' in the "
                    "header) found; select them with --ldos GLOB"
                )
        self.ldos_cube_paths = set(ldos_cubes)
        if ldos_input is not None:
            input_path: Path | None = _resolve(directory, ldos_input)
        else:
            inputs = [p for p, h in self.heads.items() if _is_pp_input(h, 3)]
            input_path = (
                _one(inputs, "pp.x LDOS input (plot_num = 3)", "--ldos-input FILE", directory)
                if inputs or not need_cubes
                else None
            )
        if input_path is not None:
            grid = read_ldos_energy_grid(input_path)
            source = str(input_path)
        else:
            grid = _grid_from_headers(ldos_cubes)
            source = "the LDOS cube headers"
        ordered = _order_ldos_cubes(ldos_cubes, grid, source) if need_cubes else []
        return input_path, grid, ordered

    def density_file(
        self, electrons: float, density: str | os.PathLike[str] | None = None
    ) -> Path | None:
        """The valence density cube: the override, else the ``fileout`` of a pp.x
        plot_num = 0 input, else the one other cube holding ``electrons``; None if none."""
        if density is not None:
            return _resolve(self.directory, density)
        named = [
            self.directory / m.group(1)
            for p, h in self.heads.items()
            if _is_pp_input(h, 0) and (m := re.search(_FILEOUT, h, re.I))
        ]
        named = [p for p in named if p.is_file()]
        if named:
            return _one(named, "density cube (pp.x plot_num = 0)", "--density FILE", self.directory)
        others = [p for p in self.cubes if p not in self.ldos_cube_paths]
        found = _density_candidates(others, electrons)
        return None if not found else _one(found, "density cube", "--density", self.directory)


def find_run_files(
    directory: str | os.PathLike[str],
    *,
    pw_out: str | os.PathLike[str] | None = None,
    xml: str | os.PathLike[str] | None = None,
    ldos: str | None = None,
    ldos_input: str | os.PathLike[str] | None = None,
    density: str | os.PathLike[str] | None = None,
    need_cubes: bool = True,
) -> RunFiles:
    """Recognise every file of the run in ``directory`` (the roles of :class:`RunFiles`);
    ``need_cubes`` False (an LDOS given as an array) skips the LDOS cubes."""
    run = RunDirectory(directory)
    pw_path, xml_path = run.scf_files(pw_out, xml)
    electrons = read_pw_xml(xml_path).nelec
    input_path, grid, cubes = run.ldos_files(ldos, ldos_input, need_cubes)
    return RunFiles(
        pw_output=pw_path,
        xml=xml_path,
        ldos_input=input_path,
        energy_grid=grid,
        ldos_cubes=cubes,
        density=run.density_file(electrons, density),
    )
