"""Quantum ESPRESSO: settings and inputs, running pw.x/pp.x, reading their files, and
ingesting a finished run into a snapshot file.

One concept per module: :mod:`.settings` (QESettings, input writers), :mod:`.run`
(pw.x/pp.x processes), :mod:`.readers` (printout, XML, UPF, cubes, clock),
:mod:`.wavefunctions` (pw.x's wfc files), :mod:`.ldos` (the LDOS from them),
:mod:`.ingest` (a run directory, recognised by content, -> snapshot). Every failure
raises :class:`QEError` naming the file and the problem.
"""

from mlsurrogate.qe.discover import RunDirectory, RunFiles, find_run_files
from mlsurrogate.qe.errors import EnergyWindowError, QEError
from mlsurrogate.qe.ingest import (
    ApproximateIntegrationWarning,
    NonSelfConsistentLdosWarning,
    ingest,
)
from mlsurrogate.qe.ldos import LdosFile, compute_ldos, read_ldos_file, write_ldos_file
from mlsurrogate.qe.readers import (
    Cube,
    LdosEnergyGrid,
    PwResult,
    UpfInfo,
    electronic_temperature_k,
    read_cube,
    read_ldos_energy_grid,
    read_mala_ldos,
    read_pw_clock,
    read_pw_output,
    read_pw_xml,
    read_upf,
    read_upf_core_density,
)
from mlsurrogate.qe.run import mpi_commands, run_ldos, run_pp_ldos, run_pw, run_qe
from mlsurrogate.qe.settings import (
    BROADENING_KERNELS,
    DEFAULT_PSEUDO_DIR,
    QESettings,
    kpoint_grid,
    ldos_kpoint_grid,
    valence_electrons,
    write_pp_inputs,
    write_pw_input,
)

__all__ = [
    "BROADENING_KERNELS",
    "ApproximateIntegrationWarning",
    "NonSelfConsistentLdosWarning",
    "RunDirectory",
    "RunFiles",
    "find_run_files",
    "DEFAULT_PSEUDO_DIR",
    "Cube",
    "PwResult",
    "EnergyWindowError",
    "QEError",
    "QESettings",
    "UpfInfo",
    "electronic_temperature_k",
    "ingest",
    "kpoint_grid",
    "ldos_kpoint_grid",
    "LdosFile",
    "compute_ldos",
    "read_ldos_file",
    "write_ldos_file",
    "run_ldos",
    "mpi_commands",
    "read_cube",
    "LdosEnergyGrid",
    "read_ldos_energy_grid",
    "read_mala_ldos",
    "read_pw_clock",
    "read_pw_output",
    "read_pw_xml",
    "read_upf",
    "read_upf_core_density",
    "run_pp_ldos",
    "run_pw",
    "run_qe",
    "valence_electrons",
    "write_pp_inputs",
    "write_pw_input",
]
