"""The build: pybind11 module, LAMMPS plugin, its automatic registration, MPI."""

from __future__ import annotations

import os
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

import mlsurrogate
from conftest import run_clean, venv_tool
from mlsurrogate._lammps_entry import plugin_dir

PLUGIN_NAME = "mlsurrogateplugin.so"
LMP_ARGS = ["-screen", "none", "-log", "none", "-nocite"]


CONTRACT = {
    "format": "mlsurrogate-model",
    "format_version": 3,
    "elements": ["Al"],
    "valence_charges": [3.0],
    "masses": [26.98],
    "grid_spacing": 0.2,
    "cutoff": 4.67637,
    "rcutfac": 4.67637,
    "rfac0": 0.99363,
    "twojmax": 4,
    "radius": [0.5],
    "weight": [1.0],
    "rmin0": 0.0,
    "switchflag": True,
    "bzeroflag": False,
    "quadraticflag": False,
    "chemflag": False,
    "bnormflag": False,
    "wselfallflag": False,
    "dropout_probability": 0.0,
    "metadata_json": "{}",
}


def tiny_model(path: Path, drop: str = "", **changes) -> Path:
    """A TorchScript module with the contract attributes of an exported model (without
    ``drop``, with ``changes``) but no network or functional submodule."""
    torch = pytest.importorskip("torch")

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, value in {**CONTRACT, **changes}.items():
                if name != drop:
                    setattr(self, name, value)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2.0 * x

    torch.jit.script(Tiny()).save(str(path))
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("model") / "tiny.pt")


NO_NETWORK = "has no 'network' submodule: it is not an mlsurrogate model"


@pytest.fixture
def lmp():
    from lammps import lammps

    instance = lammps(cmdargs=LMP_ARGS)
    yield instance
    instance.close()


def fcc_box(lmp_instance) -> None:
    for line in (
        "units metal",
        "lattice fcc 4.05",
        "region box block 0 1 0 1 0 1",
        "create_box 1 box",
        "create_atoms 1 box",
        "mass 1 26.98",
    ):
        lmp_instance.command(line)


def input_script(model: Path) -> str:
    return textwrap.dedent(
        f"""\
        units metal
        lattice fcc 4.05
        region box block 0 2 0 2 0 2
        create_box 1 box
        create_atoms 1 box
        mass 1 26.98
        pair_style mlsurrogate {model} grid 8 8 8
        pair_coeff * * Al
        run 0
        """
    )


# ---------------------------------------------------------------- packaging


def test_core_module_imports():
    from mlsurrogate import _core

    assert _core.core_version() == mlsurrogate.__version__
    assert metadata.version("mlsurrogate") == mlsurrogate.__version__


def test_plugin_is_installed():
    directory = plugin_dir()
    assert isinstance(directory, str)
    assert os.path.isfile(os.path.join(directory, PLUGIN_NAME))


def test_entry_point_returns_plugin_dir():
    eps = metadata.entry_points(group="lammps.plugins")
    ours = [ep for ep in eps if ep.name == "mlsurrogate"]
    assert len(ours) == 1
    assert ours[0].load()() == plugin_dir()


def test_entry_point_never_raises(monkeypatch):
    import mlsurrogate._preload as preload

    def broken() -> bool:
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(preload, "preload_libmpi", broken)
    assert plugin_dir().endswith("lammps_plugin")


def test_import_lammps_sets_plugin_path():
    import lammps  # noqa: F401  (runs the entry points)

    assert plugin_dir() in os.environ.get("LAMMPS_PLUGIN_PATH", "").split(":")


def test_cli_info(capsys):
    from mlsurrogate.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert mlsurrogate.__version__ in out
    assert "present" in out


# ------------------------------------------------------ in-process LAMMPS


def test_pair_style_is_registered(lmp):
    assert lmp.has_style("pair", "mlsurrogate")
    assert ["pair", "mlsurrogate"] in lmp.available_plugins()


def test_pair_style_without_arguments(lmp):
    with pytest.raises(Exception, match="missing model file name"):
        lmp.command("pair_style mlsurrogate")


def test_pair_style_missing_model_file(lmp):
    with pytest.raises(Exception, match=r"cannot open model file 'missing\.pt'"):
        lmp.command("pair_style mlsurrogate missing.pt")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("bogus 3", "unknown keyword 'bogus'"),
        ("grid 8 0 8", "grid needs three positive integers"),
        ("grid 8 8", "keyword 'grid' needs 3 values"),
        ("grid 8 8 x", "grid needs three positive integers"),
        ("spacing -0.2", "spacing needs a positive length"),
        ("grid 8 8 8 spacing 0.2", "either 'grid nx ny nz' or 'spacing h', not both"),
        ("grid 8 8 8 grid 4 4 4", "keyword 'grid' is given twice"),
        ("device gpu", "device must be cpu, cuda or cuda:N, got 'gpu'"),
        ("threads 0", "threads needs a positive integer"),
        ("batch 1.5", "batch needs a positive integer"),
        ("ionion maybe", "Expected boolean parameter instead of 'maybe'"),
        ("uncertainty 10 dropout 1", "dropout needs at least 2 passes .*, got '1'"),
        ("uncertainty 10 dropout 0", "dropout needs a number of passes >= 2"),
        ("uncertainty 10 dropout 4 seed -1", "seed needs an integer 0 ... 2147483647, got '-1'"),
        ("dropout 4", "keyword 'dropout' belongs to uncertainty: add 'uncertainty N'"),
        ("uncertainty 10 seed 3", "keyword 'seed' belongs to dropout: add 'dropout T'"),
    ],
)
def test_pair_style_bad_arguments(lmp, model_file, args, message):
    with pytest.raises(Exception, match=message):
        lmp.command(f"pair_style mlsurrogate {model_file} {args}")


def test_pair_style_keyword_instead_of_model(lmp):
    with pytest.raises(Exception, match="missing model file name.*keyword 'grid'"):
        lmp.command("pair_style mlsurrogate grid 8 8 8")


def test_pair_style_rejects_non_torchscript_file(lmp, tmp_path):
    bad = tmp_path / "not_a_model.pt"
    bad.write_text("this is not a TorchScript archive\n")
    with pytest.raises(Exception, match=r"model '.*not_a_model\.pt' is not a TorchScript model"):
        lmp.command(f"pair_style mlsurrogate {bad}")


def test_cuda_device_without_cuda(lmp, model_file):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(Exception, match="CUDA is not available"):
        lmp.command(f"pair_style mlsurrogate {model_file} device cuda")


@pytest.mark.parametrize(
    ("drop", "changes", "message"),
    [
        ("format", {}, "has no 'format': it is not an mlsurrogate model, or it was exported by"),
        ("", {"format": "other"}, "has format 'other', not 'mlsurrogate-model'"),
        ("", {"format_version": 2}, "has format version 2, this build reads 3: export it again"),
        ("dropout_probability", {}, "has no 'dropout_probability': it was exported by an older"),
        ("", {"dropout_probability": 1.0}, "has dropout_probability 1.0+, not in \\[0, 1\\)"),
        (
            "rmin0",
            {},
            "has no 'rmin0': it was exported by an older mlsurrogate; export the "
            "model again with `mlsurrogate export`",
        ),
        ("cutoff", {}, "has no 'cutoff': it was exported by an older mlsurrogate"),
        ("", {"radius": [0.5, 0.5]}, "'radius' has 2 values for 1 elements"),
        ("", {"twojmax": 4.0}, "attribute 'twojmax' is not an integer"),
        ("", {"rcutfac": -1.0}, "descriptor settings: .*rcutfac"),
        ("", {}, NO_NETWORK),
    ],
)
def test_model_contract_is_checked_at_load(lmp, tmp_path, drop, changes, message):
    """Every attribute of the contract is required: an older or foreign file is refused
    when pair_style loads it, naming the file and the attribute."""
    path = tiny_model(tmp_path / "partial.pt", drop, **changes)
    with pytest.raises(Exception, match=rf"model '{path}' {message}|model '{path}': {message}"):
        lmp.command(f"pair_style mlsurrogate {path}")


# ---------------------------------------------------------- lmp executable


def test_lmp_executable_knows_pair_style(tmp_path, model_file):
    (tmp_path / "in.test").write_text(input_script(model_file))
    proc, out = run_clean([venv_tool("lmp"), "-in", "in.test", "-log", "none", "-nocite"], tmp_path)
    assert f"plugins from {plugin_dir()}" in out, out
    assert NO_NETWORK in out, out


# ----------------------------------------------------------------- MPI


@pytest.mark.mpi
def test_mpiexec_lmp(tmp_path, model_file):
    (tmp_path / "in.test").write_text(input_script(model_file))
    proc, out = run_clean(
        [venv_tool("mpiexec"), "-n", "2", venv_tool("lmp"), "-in", "in.test", "-log", "none"],
        tmp_path,
    )
    assert "2 MPI processor grid" in out, out
    assert NO_NETWORK in out, out


@pytest.mark.mpi
def test_mpiexec_python_in_process(tmp_path, model_file):
    script = tmp_path / "inproc.py"
    script.write_text(
        textwrap.dedent(
            f"""\
            from lammps import lammps

            lmp = lammps(cmdargs={LMP_ARGS!r})
            lmp.command("units metal")
            lmp.command("region box block 0 8 0 8 0 8")
            lmp.command("create_box 1 box")
            try:
                lmp.command("pair_style mlsurrogate {model_file}")
            except Exception as error:  # every rank reads the contract and refuses it
                assert {NO_NETWORK!r} in str(error)
            rank = lmp.extract_setting("world_rank")
            size = lmp.extract_setting("world_size")
            print(f"rank {{rank}} of {{size}} ok", flush=True)
            lmp.close()
            """
        )
    )
    proc, out = run_clean([venv_tool("mpiexec"), "-n", "2", sys.executable, str(script)], tmp_path)
    assert proc.returncode == 0, out
    assert "rank 0 of 2 ok" in out and "rank 1 of 2 ok" in out, out
