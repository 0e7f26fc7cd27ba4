"""Tests of recovjax.data.text: the stdlib source corpus and its batches."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil

import jax
import numpy as np
import pytest

from _tolerance import assert_sums_close
from recovjax.data import text
from recovjax.data.text import (MODULES, PAD_ID, VOCAB_SIZE, Pysource,
                                batch_tokens, load_text, make_config,
                                shuffled_token_batches, stdlib_dir, windows)

SMALL = dict(sequence_length=32, max_file_bytes=2048)
"""Fast options: 2 KiB of each of the 40 default files."""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return load_text(**SMALL, data_dir=tmp_path_factory.mktemp("text"))


def _file_bytes(corpus, index):
    record = corpus.files[index]
    data = (stdlib_dir() / record.name).read_bytes()
    return data[:record.bytes_used]


def test_windows_cut_a_file_with_one_byte_of_overlap():
    tokens, lengths, offsets = windows(b"abcdefgh", 3)
    assert offsets.tolist() == [0, 3, 6]
    assert lengths.tolist() == [4, 4, 2]
    assert tokens.dtype == np.int32
    assert tokens.tolist() == [[97, 98, 99, 100], [100, 101, 102, 103],
                               [103, 104, PAD_ID, PAD_ID]]
    # 7 bytes: the window at offset 6 would hold no target, so none.
    assert windows(b"abcdefg", 3)[2].tolist() == [0, 3]


def test_tokens_are_bytes_then_padding(corpus):
    assert corpus.vocab_size == VOCAB_SIZE == 257 and corpus.pad_id == 256
    for split in (corpus.train, corpus.test):
        assert split.tokens.dtype == np.int32 and split.mask.dtype == bool
        assert split.tokens.shape[1:] == (33,) == split.mask.shape[1:]
        assert np.all((split.tokens >= 0) & (split.tokens < 256)
                      | ~split.mask)
        assert np.all(split.tokens[~split.mask] == PAD_ID)
        # The mask is a prefix: real bytes, then padding.
        assert np.all(np.diff(split.mask.astype(int), axis=1) <= 0)


def test_windows_are_the_bytes_of_the_source_files(corpus):
    for split in (corpus.train, corpus.test):
        for row in range(len(split)):
            data = _file_bytes(corpus, int(split.file[row]))
            start = int(split.offset[row])
            window = bytes(split.tokens[row][split.mask[row]].astype(
                np.uint8))
            assert window == data[start:start + 33]
    # And it reads as Python source: a decoded window occurs in its file.
    first = corpus.test
    decoded = bytes(first.tokens[0][first.mask[0]].astype(np.uint8)).decode(
        "utf-8", errors="ignore")
    name = corpus.files[int(first.file[0])].name
    assert decoded in (stdlib_dir() / name).read_text(encoding="utf-8")


def test_every_byte_but_a_files_first_is_one_target(corpus):
    for split_name in ("train", "test"):
        split = getattr(corpus, split_name)
        for index, record in enumerate(corpus.files):
            rows = split.file == index
            if record.split != split_name:
                assert not rows.any()
                continue
            # The windows in order rebuild the file: first byte, then the
            # targets of each window.
            parts = [bytes(split.tokens[rows][0][:1].astype(np.uint8))] + [
                bytes(t[1:][m[1:]].astype(np.uint8))
                for t, m in zip(split.tokens[rows], split.mask[rows])]
            assert b"".join(parts) == _file_bytes(corpus, index)
            assert np.all(np.diff(split.offset[rows]) == 32)


def test_split_is_by_file_and_deterministic(corpus):
    names = [record.name for record in corpus.files]
    assert names == [f"{m}.py" for m in sorted(MODULES)]
    test_files = [r.name for r in corpus.files if r.split == "test"]
    assert test_files == [names[i] for i in range(2, 40, 5)]
    assert len(test_files) == 8
    train_ids = set(corpus.train.file.tolist())
    test_ids = set(corpus.test.file.tolist())
    assert not train_ids & test_ids
    assert train_ids | test_ids == set(range(40))


def test_metadata_records_the_files(corpus, tmp_path):
    for record in corpus.files:
        data = (stdlib_dir() / record.name).read_bytes()
        assert record.size == len(data)
        assert record.sha256 == hashlib.sha256(data).hexdigest()
        assert record.bytes_used == min(len(data), 2048)
    config = make_config(**SMALL)
    builder = Pysource(config=config, data_dir=str(tmp_path),
                       file_format="array_record")
    builder.download_and_prepare()
    metadata = json.loads((builder.data_path / "metadata.json").read_text())
    assert metadata["files"] == [r._asdict() for r in corpus.files]
    assert metadata["digest"] == config.digest
    assert config.name == f"seq32_max2048_{config.digest[:16]}"


def test_building_twice_gives_identical_arrays(corpus, tmp_path):
    again = load_text(**SMALL, data_dir=tmp_path)
    for split in ("train", "test"):
        for a, b in zip(getattr(corpus, split), getattr(again, split)):
            np.testing.assert_array_equal(a, b)
    assert again.files == corpus.files


def test_second_load_does_not_rebuild(tmp_path, monkeypatch):
    first = load_text(**SMALL, data_dir=tmp_path)

    def fail(*args, **kwargs):
        raise AssertionError("the corpus was rebuilt on a second load")

    monkeypatch.setattr(Pysource, "download_and_prepare", fail)
    second = load_text(**SMALL, data_dir=tmp_path)
    np.testing.assert_array_equal(first.test.tokens, second.test.tokens)


def test_default_data_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RECOVJAX_DATA_DIR", str(tmp_path / "from-env"))
    load_text(**SMALL)
    assert len(list((tmp_path / "from-env" / "pysource").glob(
        "seq32_max2048_*/1.0.0/dataset_info.json"))) == 1


def _copy_sources(directory, modules):
    directory.mkdir()
    for module in modules:
        shutil.copy(stdlib_dir() / f"{module}.py", directory)
    return directory


def test_a_changed_source_file_is_detected(tmp_path):
    modules = ("abc", "bisect", "colorsys", "copy", "glob")
    source = _copy_sources(tmp_path / "stdlib", modules)
    options = dict(sequence_length=16, max_file_bytes=None, modules=modules,
                   source_dir=source, data_dir=tmp_path / "data")
    before = load_text(**options)
    assert [r.split for r in before.files] == ["train", "train", "test",
                                               "train", "train"]
    with open(source / "copy.py", "ab") as handle:
        handle.write(b"\n# changed\n")
    after = load_text(**options)
    assert after.files[3].sha256 != before.files[3].sha256
    assert after.files[3].size == before.files[3].size + 11
    # Prepared side by side, each named after its files.
    assert len(list((tmp_path / "data" / "pysource").iterdir())) == 2
    # Exactly the 11 new bytes are new targets.
    targets = lambda split: int(split.mask[:, 1:].sum())
    assert targets(after.train) == targets(before.train) + 11


def test_damaged_metadata_is_moved_aside_and_rebuilt(tmp_path, caplog):
    modules = ("abc", "bisect", "colorsys")
    source = _copy_sources(tmp_path / "stdlib", modules)
    options = dict(sequence_length=16, modules=modules, source_dir=source,
                   data_dir=tmp_path / "data")
    good = load_text(**options)
    config = make_config(sequence_length=16, modules=modules,
                         source_dir=source)
    prepared = tmp_path / "data" / "pysource" / config.name / "1.0.0"
    metadata = json.loads((prepared / "metadata.json").read_text())
    metadata["files"][0]["sha256"] = "0" * 64
    (prepared / "metadata.json").write_text(json.dumps(metadata))
    with caplog.at_level(logging.WARNING, logger="recovjax.data.text"):
        again = load_text(**options)
    assert "moved it to" in caplog.text
    np.testing.assert_array_equal(again.train.tokens, good.train.tokens)
    assert len(list((tmp_path / "data" / "pysource").glob(
        f"{config.name}.corrupt-*"))) == 1


@pytest.mark.parametrize("options, error, match", [
    (dict(name="wikitext"), ValueError,
     "unknown text dataset 'wikitext'; valid names: pysource"),
    (dict(sequence_length=0), ValueError, "sequence_length: must be a "
     "positive int"),
    (dict(max_file_bytes=1), ValueError, "max_file_bytes: must be an int of "
     "at least 2"),
    (dict(modules="abc"), TypeError, "modules: must be a sequence"),
    (dict(modules=("abc", "copy")), ValueError, "modules: 2 module.*leave a "
     "split empty"),
    (dict(modules=("abc", "copy", "no_such_module")), FileNotFoundError,
     "modules: the source of 'no_such_module' is not at"),
])
def test_bad_options_name_the_argument(tmp_path, options, error, match):
    with pytest.raises(error, match=match):
        load_text(data_dir=tmp_path, **options)


def test_batch_tokens_pads_with_masked_windows(corpus):
    batches = batch_tokens(corpus.test, 24)
    n = len(corpus.test)
    count = -(-n // 24)
    assert batches["tokens"].shape == (count, 24, 33)
    assert batches["mask"].shape == (count, 24, 33)
    tokens = np.asarray(batches["tokens"]).reshape(-1, 33)
    mask = np.asarray(batches["mask"]).reshape(-1, 33)
    np.testing.assert_array_equal(tokens[:n], corpus.test.tokens)
    np.testing.assert_array_equal(mask[:n], corpus.test.mask)
    assert count * 24 > n  # there is padding, and it counts for nothing
    assert np.all(tokens[n:] == PAD_ID) and not mask[n:].any()
    with pytest.raises(ValueError, match="batch_size must be positive"):
        batch_tokens(corpus.test, 0)


def test_shuffled_token_batches_use_every_window_once(corpus):
    tokens, mask = corpus.train.tokens, corpus.train.mask
    shuffle = jax.jit(shuffled_token_batches, static_argnums=3)
    a = shuffle(jax.random.key(0), tokens, mask, 50)
    b = shuffle(jax.random.key(0), tokens, mask, 50)
    c = shuffle(jax.random.key(1), tokens, mask, 50)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert not np.array_equal(a["tokens"], c["tokens"])
    rows = np.asarray(a["tokens"]).reshape(-1, 33)
    real = np.asarray(a["mask"]).reshape(-1, 33).any(axis=1)
    assert real.sum() == len(tokens)
    expected = sorted(map(bytes, tokens.astype(np.uint16)))
    assert sorted(map(bytes, rows[real].astype(np.uint16))) == expected
    with pytest.raises(ValueError, match="batch_size"):
        shuffled_token_batches(jax.random.key(0), tokens, mask,
                               len(tokens) + 1)


def test_language_model_task_reads_these_batches(corpus):
    from recovjax.tasks import evaluate_task, language_model
    batches = batch_tokens(corpus.test, 64)
    uniform = lambda params, inputs: np.zeros(inputs.shape + (VOCAB_SIZE,),
                                              np.float32)
    got = evaluate_task(language_model(VOCAB_SIZE), uniform, None, batches)
    expected = sum(r.bytes_used - 1 for r in corpus.files
                   if r.split == "test")
    assert int(got["count"]) == expected
    # Uniform logits: log(257) nats per token, summed over every target.
    assert_sums_close(got["loss"], math.log(VOCAB_SIZE),
                      terms=expected + VOCAB_SIZE,
                      magnitude=math.log(VOCAB_SIZE))


def test_module_exposes_what_a_registry_needs():
    assert text.text_names() == ("pysource",) and text.NAME == "pysource"
    # TFDS names the builder after the class: the directory is its name.
    assert text.Pysource.name == text.NAME
