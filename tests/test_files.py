"""Output paths are checked before work starts, and failed writes leave nothing behind."""

from __future__ import annotations

import errno
import os

import pytest

from mlsurrogate.files import OutputError, atomic_output, check_output_path


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(OutputError, match="does not exist; create it first"):
        check_output_path(tmp_path / "missing" / "out.h5")


def test_directory_given_as_file_name(tmp_path):
    with pytest.raises(OutputError, match="is a directory"):
        check_output_path(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_unwritable_directory_is_named(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(OutputError, match="permission denied"):
        check_output_path(locked / "out.h5")


def test_full_disk_leaves_no_part_file(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(OutputError, match="No space left on device; nothing was written"):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert list(tmp_path.iterdir()) == []


def test_success_renames_into_place(tmp_path):
    target = tmp_path / "out.bin"
    with atomic_output(target) as tmp:
        tmp.write_bytes(b"done")
    assert target.read_bytes() == b"done"
    assert list(tmp_path.iterdir()) == [target]
