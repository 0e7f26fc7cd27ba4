"""Tests of recovjax.checkpoints: bit-exact round trips and clear errors."""

from __future__ import annotations

import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recovjax import checkpoints
from recovjax.checkpoints import (CheckpointCorruptedError,
                                  CheckpointMismatchError,
                                  CheckpointNotFoundError, restore_checkpoint,
                                  save_checkpoint)
from recovjax.models import get_model

from conftest import tree_equal

SAMPLE = jnp.zeros((1, 28, 28, 1))


@pytest.fixture
def lenet_checkpoint(tmp_path):
    model = get_model("lenet5")
    params = model.init(jax.random.key(1), SAMPLE)
    path = save_checkpoint(tmp_path / "ckpt", params, {"model": "lenet5"})
    return model, params, path


def _array_files(path: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in (path / "0" / "params").rglob("*")
                  if p.is_file() and p.parent.name == "d")


def test_round_trip_is_bit_exact(lenet_checkpoint):
    model, params, path = lenet_checkpoint
    restored, metadata = restore_checkpoint(path,
                                            model.abstract_params(SAMPLE))
    assert tree_equal(restored, params)
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(restored))
    assert metadata["model"] == "lenet5"
    assert metadata["digests"] == checkpoints.leaf_digests(params)


def test_round_trip_bfloat16_and_odd_values(tmp_path):
    params = {"a": {"kernel": jnp.asarray([1.5, -0.0, np.inf, np.nan],
                                          jnp.bfloat16)},
              "b": {"bias": jnp.asarray([[1e-30, -3.25]], jnp.float32)}}
    path = save_checkpoint(tmp_path / "odd", params, {})
    restored, _ = restore_checkpoint(path, params)
    assert tree_equal(restored, params)
    assert restored["a"]["kernel"].dtype == jnp.bfloat16


def test_checkpoint_of_another_model_names_the_leaves(tmp_path):
    mlp = get_model("mlp")
    path = save_checkpoint(tmp_path / "mlp",
                           mlp.init(jax.random.key(0), SAMPLE), {"model": "mlp"})
    with pytest.raises(CheckpointMismatchError) as error:
        restore_checkpoint(path, get_model("lenet5").abstract_params(SAMPLE))
    message = str(error.value)
    assert str(path) in message and "'mlp'" in message
    assert "missing leaf conv1/kernel (5, 5, 1, 6)" in message
    assert "leaf fc1/kernel: expected shape (256, 120)" in message
    assert "found (784, 300)" in message


def test_shape_mismatch_is_reported(lenet_checkpoint):
    _, _, path = lenet_checkpoint
    expected = get_model("lenet5", num_classes=7).abstract_params(SAMPLE)
    with pytest.raises(CheckpointMismatchError, match=r"fc3/bias: expected "
                       r"shape \(7,\) float32, found \(10,\) float32"):
        restore_checkpoint(path, expected)


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointNotFoundError) as error:
        restore_checkpoint(missing, {"w": jnp.zeros(2)})
    assert str(missing) in str(error.value)
    assert isinstance(error.value, FileNotFoundError)


def test_empty_directory_is_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="no finished checkpoint"):
        restore_checkpoint(tmp_path / "empty", {"w": jnp.zeros(2)})


def test_truncated_checkpoint_is_reported(lenet_checkpoint):
    model, _, path = lenet_checkpoint
    for data_file in _array_files(path):
        data_file.write_bytes(data_file.read_bytes()[:10])
    with pytest.raises(CheckpointCorruptedError) as error:
        restore_checkpoint(path, model.abstract_params(SAMPLE))
    assert str(path) in str(error.value)


def test_truncated_array_file_is_named_before_orbax_reads(lenet_checkpoint,
                                                          monkeypatch):
    model, _, path = lenet_checkpoint
    target = max(_array_files(path), key=lambda p: p.stat().st_size)
    size = target.stat().st_size
    target.write_bytes(target.read_bytes()[:100])

    def no_orbax(*args, **kwargs):
        # Orbax's reader threads, failing on a truncated array file, print
        # "RuntimeError: Event loop is closed" after the restore returns.
        raise AssertionError("Orbax opened a checkpoint with a bad file")

    monkeypatch.setattr(checkpoints, "_manager", no_orbax)
    with pytest.raises(CheckpointCorruptedError) as error:
        restore_checkpoint(path, model.abstract_params(SAMPLE))
    relative = target.relative_to(path).as_posix()
    assert str(error.value) == (
        f"{path}: files differ from those saved: {relative}: 100 of {size} "
        "bytes (truncated)")


def test_changed_bytes_are_found_by_the_contents_check(lenet_checkpoint):
    _, _, path = lenet_checkpoint
    target = max(_array_files(path), key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    relative = target.relative_to(path).as_posix()
    assert checkpoints.file_problems(path) == []  # sizes only: one stat each
    assert checkpoints.file_problems(path, contents=True) == [
        f"{relative}: contents differ from the recorded SHA-256"]
    with pytest.raises(CheckpointCorruptedError, match=f"{relative}: "
                       "contents differ"):
        checkpoints.verify_files(path, contents=True)
    with pytest.raises(CheckpointNotFoundError):
        checkpoints.verify_files(path / "absent")


def test_missing_file_and_bad_file_list_are_named(lenet_checkpoint):
    model, _, path = lenet_checkpoint
    (path / "0" / "params" / "manifest.ocdbt").unlink()
    with pytest.raises(CheckpointCorruptedError,
                       match="0/params/manifest.ocdbt: missing"):
        restore_checkpoint(path, model.abstract_params(SAMPLE))
    (path / checkpoints.FILES_MANIFEST).write_text('{"files": ')
    with pytest.raises(CheckpointCorruptedError,
                       match="recovjax_files.json: unreadable file list"):
        restore_checkpoint(path, model.abstract_params(SAMPLE))


def test_flipped_bytes_fail_verification(lenet_checkpoint):
    model, params, path = lenet_checkpoint
    # Overwrite the stored kernel of conv1 through Orbax itself, keeping the
    # recorded digests: the arrays are valid but no longer what was saved.
    tampered = jax.tree.map(lambda x: x, params)
    tampered["conv1"]["kernel"] = params["conv1"]["kernel"] + 1.0
    import orbax.checkpoint as ocp
    writer = ocp.StandardCheckpointer()
    writer.save(path / "0" / "params", tampered, force=True)
    writer.wait_until_finished()
    writer.close()
    # The file list sees the rewritten files first.
    with pytest.raises(CheckpointCorruptedError,
                       match="files differ from those saved: .*missing"):
        restore_checkpoint(path, model.abstract_params(SAMPLE))
    # A tamperer who also rewrites the file list is caught by the digests.
    checkpoints.record_files(path)
    with pytest.raises(CheckpointCorruptedError, match="conv1/kernel"):
        restore_checkpoint(path, model.abstract_params(SAMPLE))
    restored, _ = restore_checkpoint(path, model.abstract_params(SAMPLE),
                                     verify=False)
    assert tree_equal(restored, tampered)


def test_restore_logs_no_read_only_notice(lenet_checkpoint, caplog):
    model, _, path = lenet_checkpoint
    with caplog.at_level(logging.INFO, logger="absl"):
        restore_checkpoint(path, model.abstract_params(SAMPLE))
        checkpoints.read_metadata(path)
    assert "read only" not in caplog.text
    # The filter lives only while a read-only manager is made; other absl
    # warnings still pass.
    assert logging.getLogger("absl").filters == []
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="absl"):
        with checkpoints._without_read_only_notice():
            logging.getLogger("absl").warning("Given directory is read only")
            logging.getLogger("absl").warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]


def test_checkpoint_files_are_world_readable(lenet_checkpoint):
    _, _, path = lenet_checkpoint
    import os
    umask = os.umask(0o022)
    os.umask(umask)
    for file in path.rglob("*"):
        if file.is_file():
            assert file.stat().st_mode & 0o777 == 0o666 & ~umask, file


def test_save_refuses_to_overwrite(lenet_checkpoint):
    model, params, path = lenet_checkpoint
    before = sorted(p.relative_to(path) for p in path.rglob("*"))
    with pytest.raises(FileExistsError, match=str(path)):
        save_checkpoint(path, jax.tree.map(jnp.zeros_like, params), {})
    assert sorted(p.relative_to(path) for p in path.rglob("*")) == before
    restored, _ = restore_checkpoint(path, model.abstract_params(SAMPLE))
    assert tree_equal(restored, params)


def test_overwrite_replaces_atomically(lenet_checkpoint):
    model, params, path = lenet_checkpoint
    zeros = jax.tree.map(jnp.zeros_like, params)
    save_checkpoint(path, zeros, {"model": "lenet5"}, overwrite=True)
    restored, _ = restore_checkpoint(path, model.abstract_params(SAMPLE))
    assert tree_equal(restored, zeros)
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_failed_save_leaves_nothing_behind(tmp_path):
    with pytest.raises(TypeError, match="JSON serialisable") as error:
        save_checkpoint(tmp_path / "bad", {"w": jnp.zeros(2)},
                        {"not json": object()})
    assert str(tmp_path / "bad") in str(error.value)
    assert list(tmp_path.iterdir()) == []
