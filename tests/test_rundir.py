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
