"""Tests of the zoo: damaged entries moved aside and rebuilt; verify/repair."""

from __future__ import annotations

import importlib
import json
import logging
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from recovjax import checkpoints, zoo
from recovjax._types import Dataset, Split
from recovjax.models import get_model
from recovjax.pretrain import Recipe, load_pretrained, zoo_path

from conftest import tree_equal

pretraining = importlib.import_module("recovjax.pretrain")

TINY = Recipe(epochs=1, batch_size=50, learning_rate=2e-3)
SAMPLE = jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32)


@pytest.fixture(scope="module")
def tiny(mnist):
    return Dataset("mnist5k", Split(mnist.train.images[:200],
                                    mnist.train.labels[:200]),
                   Split(mnist.test.images[:100], mnist.test.labels[:100]), 10)


@pytest.fixture
def calls(monkeypatch, tiny):
    """Pretraining in the zoo uses the tiny data and recipe; counts calls."""
    made = []
    real = pretraining.pretrain

    def counted(model, dataset, **kwargs):
        made.append((model.name, kwargs["seed"]))
        return real(model, tiny, **dict(kwargs, recipe=TINY))

    monkeypatch.setattr(pretraining, "pretrain", counted)
    return made


def _largest_array_file(path: pathlib.Path) -> pathlib.Path:
    files = [p for p in path.rglob("*")
             if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


def _truncate(path: pathlib.Path) -> pathlib.Path:
    target = _largest_array_file(path)
    target.write_bytes(target.read_bytes()[:100])
    return target


def _aside(path: pathlib.Path) -> list[pathlib.Path]:
    return sorted(path.parent.glob(path.name + ".corrupt-*"))


def test_truncated_entry_is_moved_aside_and_rebuilt(tmp_path, calls, caplog):
    first = load_pretrained("mlp", seed=1, zoo_dir=tmp_path, progress=False)
    broken = _truncate(first.path)
    with caplog.at_level(logging.WARNING, logger="recovjax.pretrain"):
        second = load_pretrained("mlp", seed=1, zoo_dir=tmp_path,
                                 progress=False)
    assert calls == [("mlp", 1), ("mlp", 1)]
    assert tree_equal(first.params, second.params)  # same seed, same bits
    (moved,) = _aside(first.path)
    assert moved.name.startswith("mlp-mnist5k-seed1-r")
    # Kept, not deleted: the damaged file is still there to inspect.
    assert (moved / broken.relative_to(first.path)).stat().st_size == 100
    (record,) = [r for r in caplog.records if r.name == "recovjax.pretrain"]
    message = record.getMessage()
    assert "\n" not in message
    assert str(first.path) in message and str(moved) in message
    assert "truncated" in message and "pretraining it again" in message
    assert zoo.verify_zoo(tmp_path) == []


def test_bit_rot_is_caught_before_orbax_reads(tmp_path, calls, caplog,
                                             monkeypatch):
    first = load_pretrained("mlp", seed=4, zoo_dir=tmp_path, progress=False)
    target = _largest_array_file(first.path)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    damaged = bytes(data)
    real = checkpoints._manager

    opened_damaged = []

    def manager(directory, **kwargs):
        if target.is_file() and target.read_bytes() == damaged:
            opened_damaged.append(directory)
        return real(directory, **kwargs)

    monkeypatch.setattr(checkpoints, "_manager", manager)
    with caplog.at_level(logging.WARNING, logger="recovjax.pretrain"):
        second = load_pretrained("mlp", seed=4, zoo_dir=tmp_path,
                                 progress=False)
    assert tree_equal(first.params, second.params)
    assert "contents differ from the recorded SHA-256" in caplog.text
    assert len(_aside(first.path)) == 1
    assert opened_damaged == [], "Orbax opened the damaged checkpoint"


def test_entry_with_tampered_leaves_is_rebuilt(tmp_path, calls, caplog):
    first = load_pretrained("mlp", seed=2, zoo_dir=tmp_path, progress=False)
    # A consistent rewrite through Orbax (file list removed with it, as in
    # a checkpoint saved before file lists): only the leaf digests see it.
    (first.path / checkpoints.FILES_MANIFEST).unlink()
    tampered = jax.tree.map(lambda x: x + 1.0, first.params)
    import orbax.checkpoint as ocp
    writer = ocp.StandardCheckpointer()
    (step,) = [p for p in first.path.iterdir() if p.name.isdigit()]
    writer.save(step / "params", tampered, force=True)
    writer.wait_until_finished()
    writer.close()
    with caplog.at_level(logging.WARNING, logger="recovjax.pretrain"):
        second = load_pretrained("mlp", seed=2, zoo_dir=tmp_path,
                                 progress=False)
    assert tree_equal(first.params, second.params)
    assert len(_aside(first.path)) == 1
    assert "fc1/kernel" in caplog.text and str(first.path) in caplog.text


def test_entry_without_file_list_gets_one_once_verified(tmp_path, calls):
    first = load_pretrained("mlp", seed=3, zoo_dir=tmp_path, progress=False)
    manifest = first.path / checkpoints.FILES_MANIFEST
    manifest.unlink()
    load_pretrained("mlp", seed=3, zoo_dir=tmp_path, progress=False)
    assert manifest.is_file() and calls == [("mlp", 3)]
    assert checkpoints.file_problems(first.path) == []


def _entry(zoo_dir: pathlib.Path, seed: int, metadata=None) -> pathlib.Path:
    model = get_model("mlp")
    params = model.init(jax.random.key(seed), jnp.zeros(SAMPLE.shape))
    path = zoo_path("mlp", "mnist5k", seed, zoo_dir)
    record = {"model": "mlp", "dataset": "mnist5k", "seed": seed,
              "recipe_version": pretraining.RECIPE_VERSION}
    record.update(metadata or {})
    return checkpoints.save_checkpoint(path, params, record)


def test_verify_zoo_lists_each_damaged_entry(tmp_path):
    assert zoo.verify_zoo(tmp_path / "absent") == []
    good = _entry(tmp_path, 0)
    truncated = _entry(tmp_path, 1)
    broken = _truncate(truncated)
    misnamed = _entry(tmp_path, 2, {"seed": 7})
    (tmp_path / (good.name + ".corrupt-20260101T000000Z")).mkdir()
    (tmp_path / ".staging.tmp").mkdir()
    problems = zoo.verify_zoo(tmp_path)
    assert [p.path for p in problems] == [truncated, misnamed]
    relative = broken.relative_to(truncated).as_posix()
    assert f"{relative}: 100 of" in problems[0].problem
    assert "(truncated)" in problems[0].problem
    assert problems[1].problem == "metadata says seed 7, the name says 2"
    assert zoo.check_entry(good) is None


def test_repair_zoo_moves_aside_and_rebuilds(tmp_path, calls, caplog):
    good = _entry(tmp_path, 0)
    truncated = _entry(tmp_path, 1)
    _truncate(truncated)
    stale = tmp_path / "mlp-mnist5k-seed4-r1"
    _entry(tmp_path, 4).rename(stale)
    (good / checkpoints.FILES_MANIFEST).unlink()  # an older entry
    with caplog.at_level(logging.WARNING, logger="recovjax.zoo"):
        repairs = zoo.repair_zoo(tmp_path)
    assert [(r.path, r.rebuilt) for r in repairs] == [(truncated, True),
                                                      (stale, False)]
    assert "recipe_version" in repairs[1].problem
    for repair in repairs:
        assert repair.moved_to.is_dir() and repair.moved_to.parent == tmp_path
        assert repair.moved_to.name.startswith(repair.path.name + ".corrupt-")
    assert calls == [("mlp", 1)]
    assert not stale.exists() and truncated.is_dir()
    assert (good / checkpoints.FILES_MANIFEST).is_file()
    lines = [r.getMessage() for r in caplog.records
             if r.name == "recovjax.zoo"]
    assert len(lines) == 2
    assert str(truncated) in lines[0] and str(repairs[0].moved_to) in lines[0]
    assert lines[0].endswith("pretraining it again")
    assert zoo.verify_zoo(tmp_path) == []
    assert zoo.repair_zoo(tmp_path) == []


def test_move_aside_never_overwrites(tmp_path):
    from recovjax._io import move_aside
    names = []
    for text in ("one", "two"):
        target = tmp_path / "entry"
        target.write_text(text)
        names.append(move_aside(target))
    assert names[0] != names[1] and not (tmp_path / "entry").exists()
    assert sorted(p.read_text() for p in names) == ["one", "two"]
    with pytest.raises(FileNotFoundError):
        move_aside(tmp_path / "entry")


def test_file_list_is_plain_json_next_to_the_step(tmp_path):
    path = _entry(tmp_path, 0)
    document = json.loads((path / checkpoints.FILES_MANIFEST).read_text())
    assert document["format"] == "recovjax-checkpoint-files"
    assert "0/params/manifest.ocdbt" in document["files"]
    assert checkpoints.FILES_MANIFEST not in document["files"]


def _zoo_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "recovjax", "zoo", *args],
                          capture_output=True, text=True, timeout=300)


def test_zoo_verify_command_prints_one_line_per_damaged_entry(tmp_path):
    _entry(tmp_path, 0)
    truncated = _entry(tmp_path, 1)
    broken = _truncate(truncated)
    misnamed = _entry(tmp_path, 2, {"seed": 7})
    done = _zoo_command("verify", "--zoo-dir", str(tmp_path))
    assert done.returncode == 2, done.stderr
    relative = broken.relative_to(truncated).as_posix()
    lines = done.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{truncated}: files differ from those saved: "
                               f"{relative}: 100 of ")
    assert lines[1] == f"{misnamed}: metadata says seed 7, the name says 2"
    assert "Traceback" not in done.stderr
    assert "Event loop is closed" not in done.stderr
    empty = _zoo_command("verify", "--zoo-dir", str(tmp_path / "empty"))
    assert empty.returncode == 0, empty.stderr
    assert empty.stdout.strip() == (f"zoo {tmp_path / 'empty'}: 0 entries, "
                                    "all intact")
