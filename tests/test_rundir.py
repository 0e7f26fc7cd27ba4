"""Tests of recovjax.rundir: atomic writes, resume, conflicting configs."""

from __future__ import annotations

import os

import pytest

from recovjax.rundir import RunConflictError, RunDirectory, atomic_write


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "a" / "file.txt"
    atomic_write(target, "one")
    atomic_write(target, b"two")
    assert target.read_text() == "two"
    assert sorted(os.listdir(target.parent)) == ["file.txt"]


def test_failed_atomic_write_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "file.txt"
    atomic_write(target, "old")

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, "new")
    assert target.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["file.txt"]


def test_parts_persist_and_resume(tmp_path):
    run = RunDirectory(tmp_path / "run", "a: 1\n")
    assert not run.has_part("sweep-zero-0")
    run.write_part("sweep-zero-0", {"rows": [1.5, float("nan")]})
    again = RunDirectory(tmp_path / "run", "a: 1\n")
    assert again.has_part("sweep-zero-0")
    value = again.read_part("sweep-zero-0")
    assert value["rows"][0] == 1.5 and value["rows"][1] != value["rows"][1]


def test_changed_config_is_refused_then_forced(tmp_path):
    run = RunDirectory(tmp_path / "run", "a: 1\n")
    run.write_part("p", {"x": 1})
    with pytest.raises(RunConflictError, match="different config"):
        RunDirectory(tmp_path / "run", "a: 2\n")
    assert run.has_part("p")
    fresh = RunDirectory(tmp_path / "run", "a: 2\n", force=True)
    assert not fresh.has_part("p")
    assert (tmp_path / "run" / "config.yaml").read_text() == "a: 2\n"


def test_foreign_non_empty_directory_is_refused(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(RunConflictError, match="not a recovjax run"):
        RunDirectory(tmp_path, "a: 1\n")
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_check_writes_nothing(tmp_path):
    from recovjax.rundir import check_run_directory
    check_run_directory(tmp_path / "new" / "run", "a: 1\n")
    assert listing(tmp_path) == []
    RunDirectory(tmp_path / "run", "a: 1\n")
    before = listing(tmp_path)
    check_run_directory(tmp_path / "run", "a: 1\n")
    with pytest.raises(RunConflictError, match="different config"):
        check_run_directory(tmp_path / "run", "a: 2\n")
    check_run_directory(tmp_path / "run", "a: 2\n", force=True)
    assert listing(tmp_path) == before


@pytest.mark.parametrize("make, pattern", [
    (lambda root: root / "file", "file: exists and is not a directory"),
    (lambda root: root / "file" / "run",
     r"file/run: cannot be created, .*file is a file, not a directory"),
    (lambda root: root / "file" / "deeper" / "run",
     r"cannot be created, .*file is a file"),
])
def test_unusable_paths_are_refused_before_anything_is_written(
        tmp_path, make, pattern):
    from recovjax.rundir import RunDirectoryError, check_run_directory
    (tmp_path / "file").write_text("not a directory")
    path = make(tmp_path)
    with pytest.raises(RunDirectoryError, match=pattern):
        check_run_directory(path, "a: 1\n")
    with pytest.raises(RunDirectoryError, match=pattern):
        RunDirectory(path, "a: 1\n")
    assert listing(tmp_path) == ["file"]
    assert (tmp_path / "file").read_text() == "not a directory"


def test_name_too_long_for_the_filesystem(tmp_path):
    from recovjax.rundir import RunDirectoryError, check_run_directory
    with pytest.raises(RunDirectoryError, match="File name too long"):
        check_run_directory(tmp_path / ("x" * 300), "a: 1\n")
    assert listing(tmp_path) == []


def test_read_only_filesystem_is_found_by_a_probe(tmp_path, monkeypatch):
    """A read-only mount refuses even root; simulate it at the probe."""
    import errno
    import tempfile

    from recovjax.rundir import RunDirectoryError, check_run_directory

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(RunDirectoryError,
                       match=r"run: not writable \(cannot be created in .*\)"
                             r": Read-only file system"):
        check_run_directory(tmp_path / "run", "a: 1\n")
    (tmp_path / "existing").mkdir()
    with pytest.raises(RunDirectoryError,
                       match=r"existing: not writable: Read-only"):
        RunDirectory(tmp_path / "existing", "a: 1\n")
    assert listing(tmp_path) == ["existing"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through "
                    "permission bits; tests/test_cli.py checks a real "
                    "read-only mount instead")
def test_directory_without_write_permission(tmp_path):
    from recovjax.rundir import RunDirectoryError, check_run_directory
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(RunDirectoryError, match="Permission denied"):
            check_run_directory(locked / "run", "a: 1\n")
    finally:
        locked.chmod(0o755)


def test_run_that_cannot_start_leaves_no_run_directory(tmp_path,
                                                       monkeypatch):
    """Setup (data, pretraining) fails after every check passed: the run
    directory is claimed only after setup, so nothing is left behind."""
    from recovjax import experiment
    from recovjax.config import load_config

    class Unavailable(Exception):
        pass

    def broken_setup(*args, **kwargs):
        raise Unavailable("checkpoint store offline")

    monkeypatch.setattr(experiment, "Experiment", broken_setup)
    with pytest.raises(Unavailable):
        experiment.run_experiment(load_config(), tmp_path / "run")
    assert not (tmp_path / "run").exists()
