"""Outputs follow the umask, as a plain open() and mkdir() would: the next job of a workflow may run as
another user (Apptainer on shared storage, a container started with --user) and must read them."""

from __future__ import annotations

import contextlib
import os
import stat
import tarfile

import pytest

from helpers import run_script
from utils.atomic import current_umask, write_json


@contextlib.contextmanager
def umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_current_umask_reads_the_process_umask():
    with umask(0o027):
        assert current_umask() == 0o027


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_atomic_writes_get_the_mode_open_would_give(tmp_path, mask):
    with umask(mask):
        target = write_json(tmp_path / "out.json", {"a": 1})
        with open(tmp_path / "plain.txt", "w") as plain:
            plain.write("x")
    assert mode(target) == mode(tmp_path / "plain.txt") == 0o666 & ~mask


def test_a_jobs_outputs_are_readable_by_other_users_under_umask_022(root, sample_dir, tmp_path):
    """validate_data then preprocess, as the workflow runs them: every file and folder they write,
    and every member of the set archive, is readable (and every folder enterable) by group and others."""
    out = tmp_path / "validated"
    with umask(0o022):
        assert run_script(root, "validate_data", ["--images", sample_dir / "images", "--annotations",
                                                  sample_dir / "annotations", "--output-dir", out]) == 0
        assert run_script(root, "preprocess", ["--images", sample_dir / "images", "--annotations",
                                               out / "annotations_clean", "--output-tar", tmp_path / "set.tar",
                                               "--no-progress"]) == 0
    written = [out, *out.rglob("*"), tmp_path / "set.tar"]
    unreadable = [str(p) for p in written if mode(p) & 0o044 != 0o044 or (p.is_dir() and mode(p) & 0o011 != 0o011)]
    assert not unreadable
    with tarfile.open(tmp_path / "set.tar") as archive:
        private = [m.name for m in archive.getmembers() if m.mode & 0o044 != 0o044]
    assert not private


def test_a_folder_the_job_may_not_write_in_is_named_not_the_temporary_file(tmp_path, monkeypatch):
    # It said "[Errno 13] Permission denied: '.../.predictions.x8k2l1q0.tmp.json'", a name the user never gave.
    import errno
    import tempfile

    from utils.atomic import write_text
    from utils.cli import error_message

    def refused(prefix, suffix, dir):
        raise PermissionError(errno.EACCES, "Permission denied", f"{dir}/{prefix}x8k2l1q0{suffix}")

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    with pytest.raises(PermissionError) as caught:
        write_text(tmp_path / "predictions.json", "{}")
    assert error_message(caught.value) == f"{tmp_path}: cannot write predictions.json here (Permission denied)"


def test_an_error_inside_an_atomic_write_that_is_not_about_the_target_is_left_as_it_is(tmp_path):
    # A failed read of an input or a process that could not start, raised inside the block, was relabelled
    # "cannot write TARGET (Resource temporarily unavailable)".
    import errno

    from utils.atomic import atomic_path

    for error in (OSError(errno.EAGAIN, "Resource temporarily unavailable"),
                  OSError(errno.EISDIR, "Is a directory", str(tmp_path / "an input"))):
        with pytest.raises(OSError) as caught, atomic_path(tmp_path / "graph.png"):
            raise error
        assert caught.value is error
    with pytest.raises(OSError) as caught, atomic_path(tmp_path / "graph.png"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert caught.value.filename == str(tmp_path / "graph.png") and "cannot write graph.png" in str(caught.value)
    assert list(tmp_path.iterdir()) == []
