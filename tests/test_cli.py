"""`mlsurrogate <verb>`: every verb's help, and user errors as one line
(`mlsurrogate <verb>: <problem>`, exit 2), never a Python traceback."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from ase.build import bulk

from conftest import DATA, run_with_file_size_limit, venv_tool
from mlsurrogate import cli

SNAPSHOT = str(DATA / "snapshot_00.h5")
# every verb and sub-verb the parser has (so a new verb cannot be left out)
VERBS = [command.split()[1:] for command, _ in cli._verbs(cli._build_parser(), ["mlsurrogate"])]
VERBS = [verb for verb in VERBS if verb]


def test_the_verb_list_is_complete():
    names = {" ".join(verb) for verb in VERBS}
    assert {"qe ingest", "data descriptors", "train", "export", "select", "explore"} <= names


@pytest.mark.parametrize("verb", VERBS, ids=" ".join)
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main([*verb, "--help"])
    assert done.value.code == 0
    assert f"usage: mlsurrogate {' '.join(verb)}" in capsys.readouterr().out


def test_descriptor_options_are_the_keyword_list(capsys):
    from mlsurrogate.descriptors import DESCRIPTOR_KEYWORDS

    with pytest.raises(SystemExit):
        cli.main(["descriptors", "--help"])
    text = capsys.readouterr().out
    assert all(f"--{name}" in text for name in DESCRIPTOR_KEYWORDS)


def user_errors(tmp_path: Path) -> list[tuple[list[str], str]]:
    """(arguments, text the one-line error must hold)."""
    structure = tmp_path / "al.xyz"
    structure.write_text(
        '1\nLattice="4 0 0 0 4 0 0 0 4" Properties=species:S:1:pos:R:3 pbc="T T T"\nAl 0 0 0\n'
    )
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    toml = tmp_path / "bad.toml"
    toml.write_text("[training]\nmax_epochs = 'many'\n")
    missing_dir = str(tmp_path / "no" / "out")
    return [
        (["descriptors", str(tmp_path / "none.xyz"), "--grid", "2", "2", "2",
          "-o", str(tmp_path / "d.npy")], "none.xyz"),
        (["descriptors", str(structure), "--grid", "2", "2", "2", "-o", missing_dir + ".npy"],
         "does not exist"),
        (["qe", "run", str(structure), "-o", str(tmp_path / "run"), "--pseudo", "Al"],
         "ELEMENT=FILE"),
        (["qe", "ingest", str(tmp_path / "nowhere"), "-o", str(tmp_path / "s.h5")], "nowhere"),
        (["data", "info", str(junk)], "not an HDF5 file"),
        (["data", "descriptors", SNAPSHOT, "-o", missing_dir + ".h5"], "does not exist"),
        (["evaluate-dft", str(junk)], "not an HDF5 file"),
        (["train", str(toml), "-o", str(tmp_path / "ck.pt")], "max_epochs (section [training])"),
        (["export", str(tmp_path / "none.ckpt"), "-o", str(tmp_path / "m.pt")], "no such"),
        (["evaluate", str(tmp_path / "none.pt"), SNAPSHOT], "no such model file"),
        (["evaluate", str(junk), SNAPSHOT], "not a TorchScript model file"),
    ]  # fmt: skip


def test_user_errors_are_one_line_with_exit_2(tmp_path, capsys):
    for arguments, text in user_errors(tmp_path):
        assert cli.main(arguments) == 2, arguments
        err = capsys.readouterr().err
        name = " ".join(arguments[:2] if arguments[0] in ("qe", "data") else arguments[:1])
        assert err.startswith(f"mlsurrogate {name}: "), (arguments, err)
        assert text in err, (arguments, err)
        assert "Traceback" not in err
    assert not list(tmp_path.glob("*.part*"))


def test_the_installed_command_prints_no_traceback(tmp_path):
    """The console script, not just main(): stderr is the one line."""
    for arguments, text in user_errors(tmp_path)[-3:]:
        proc = subprocess.run(
            [venv_tool("mlsurrogate"), *arguments], capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith(f"mlsurrogate {arguments[0]}: ") and text in proc.stderr
        assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_reference_page_is_current():
    """docs/cli.md is generated from the parser (run cli_reference())."""
    from mlsurrogate.cli import cli_reference

    page = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
    assert page.read_text() == cli_reference()


@pytest.mark.parametrize("verb", ["descriptors", "export"])
def test_a_full_disk_leaves_nothing_half_written(verb, smooth_checkpoint, tmp_path):
    """Writes that fail as on a full disk (a 20 kB file size limit) end with one line,
    exit 2, and no output or temporary file (torch's writer used to abort the process and
    leave a .part file)."""
    structure = tmp_path / "al.xyz"
    atoms = bulk("Al", "fcc", a=4.05, cubic=True)
    atoms.rattle(0.05, seed=1)
    atoms.write(structure)
    arguments = {
        "descriptors": [str(structure), "--grid", "8", "8", "8", "--twojmax", "4", "-q"],
        "export": [str(smooth_checkpoint)],
    }[verb]
    output = tmp_path / "out.bin"
    command = [venv_tool("mlsurrogate"), verb, *arguments, "-o", str(output)]
    proc = run_with_file_size_limit(command, tmp_path, 20_000)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"mlsurrogate {verb}: cannot write {output}")
    assert "nothing was written" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["al.xyz"]
