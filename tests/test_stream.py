"""Evaluation streamed block by block from a random-access source.

A stream must give the numbers of the same data held in memory, read every
example exactly once, keep only a bounded number of blocks read ahead, and
name what is wrong with a source or its examples.
"""

from __future__ import annotations

import math
import textwrap

import jax
import numpy as np
import pytest

from recovjax import evaluate_stream, stream_dataset, sweep
from recovjax.checkpoints import save_checkpoint
from recovjax.config import ConfigError, load_config
from recovjax.data import BatchStream, batch_split, normalize
from recovjax.evaluate import evaluate
from recovjax.experiment import run_experiment
from recovjax.pretrain import zoo_path
from recovjax.validation import check_config


def _rows_equal(a, b) -> bool:
    """Rows equal, a NaN value equal to a NaN value."""
    def same(x, y):
        if {**x, "value": 0} != {**y, "value": 0}:
            return False
        u, v = x["value"], y["value"]
        return u == v or (math.isnan(u) and math.isnan(v))
    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


class CountingSource:
    """A random-access source that records which examples were read."""

    def __init__(self, images, labels):
        self.images, self.labels, self.read = images, labels, []

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        self.read.append(int(index))
        return {"image": self.images[index], "label": self.labels[index]}


def test_blocks_have_one_shape_and_mask_only_the_padding(small_mnist):
    test = small_mnist.test
    stream = BatchStream.from_arrays(test.images[:130], test.labels[:130],
                                     10, batch_size=16, block_batches=3)
    blocks = list(stream)
    assert stream.num_blocks == len(blocks) == 3  # 130 = 48 + 48 + 34
    assert {b.images.shape for b in blocks} == {(3, 16, 28, 28, 1)}
    mask = np.concatenate([b.mask.ravel() for b in blocks])
    assert mask.sum() == 130 and mask[:130].all() and not mask[130:].any()
    images = np.concatenate([b.images.reshape(-1, 28, 28, 1)
                             for b in blocks])[:130]
    labels = np.concatenate([b.labels.ravel() for b in blocks])[:130]
    np.testing.assert_array_equal(images, test.images[:130])
    np.testing.assert_array_equal(labels, test.labels[:130])
    assert labels.dtype == np.int32


def test_uint8_images_are_normalised_and_grey_images_get_a_channel():
    pixels = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    (block,) = BatchStream.from_arrays(pixels, np.array([0, 1]), 2,
                                       batch_size=2, block_batches=1)
    np.testing.assert_array_equal(block.images[0], normalize(pixels)[..., None])
    assert block.images.dtype == np.float32


def test_every_example_is_read_once_and_reading_stays_close_ahead(small_mnist):
    test = small_mnist.test
    source = CountingSource(test.images, test.labels)
    stream = BatchStream(source, 10, batch_size=10, block_batches=2,
                         prefetch=1)
    blocks = iter(stream)
    next(blocks)
    # The block in hand, one prefetched, and one being read at most.
    assert max(source.read) < 3 * stream.block_examples
    for _ in blocks:
        pass
    assert sorted(source.read) == list(range(len(test.labels)))


def test_stream_evaluation_equals_evaluation_in_memory(lenet, trained_lenet,
                                                       small_mnist):
    test = small_mnist.test
    in_memory = jax.jit(lambda p: evaluate(
        lenet.forward, p, batch_split(test, 25), 10))(trained_lenet)
    stream = BatchStream.from_arrays(test.images, test.labels, 10,
                                     batch_size=25, block_batches=3)
    streamed = evaluate_stream(lenet.forward, trained_lenet, stream, 10)
    assert int(streamed.correct) == int(in_memory.correct)
    np.testing.assert_array_equal(streamed.class_count, in_memory.class_count)
    # The same float32 additions in the same order: the same sum.
    assert float(streamed.loss_sum) == float(in_memory.loss_sum)
    assert int(streamed.count) == len(test.labels)


def test_streamed_sweep_gives_the_in_memory_table(lenet, trained_lenet,
                                                  small_mnist):
    test = small_mnist.test
    common = dict(damages=["zero", "bit_flip"], ratios=[0.1, 0.5], seeds=3,
                  root_key=7, vmap_size=2, chunk_size=4)
    in_memory = sweep(lenet, trained_lenet, data=test, batch_size=30,
                      **common)
    stream = BatchStream.from_arrays(test.images, test.labels, 10,
                                     batch_size=30, block_batches=2)
    streamed = sweep(lenet, trained_lenet, data=stream, **common)
    assert _rows_equal(streamed.table.rows, in_memory.table.rows)
    assert streamed.table.config["num_examples"] == len(test.labels)


def test_damage_point_reads_a_stream(lenet, trained_lenet, small_mnist):
    from recovjax import damage_point
    test = small_mnist.test
    stream = BatchStream.from_arrays(test.images, test.labels, 10,
                                     batch_size=50, block_batches=2)
    args = dict(damage="zero", ratio=0.3, ratio_index=0, seed=1,
                root_key=3, vmap_size=1)
    streamed = damage_point(lenet, trained_lenet, data=stream, **args)
    held = damage_point(lenet, trained_lenet, data=test, batch_size=50,
                        **args)
    assert int(streamed.correct) == int(held.correct)
    assert float(streamed.loss_sum) == float(held.loss_sum)


def test_mnist5k_streams_from_its_tfds_source(mnist):
    stream = stream_dataset("mnist5k", "test", batch_size=200,
                            block_batches=2, examples=300)
    assert stream.num_examples == 300 and stream.num_blocks == 1
    (block,) = list(stream)
    np.testing.assert_array_equal(block.images.reshape(-1, 28, 28, 1)[:300],
                                  mnist.test.images[:300])
    np.testing.assert_array_equal(block.labels.ravel()[:300],
                                  mnist.test.labels[:300])


def test_bad_sources_and_examples_are_named(small_mnist):
    test = small_mnist.test
    with pytest.raises(TypeError, match="source: needs __len__"):
        BatchStream(object(), 10)
    with pytest.raises(ValueError, match="block_batches must be a positive"):
        BatchStream.from_arrays(test.images, test.labels, 10, block_batches=0)
    with pytest.raises(ValueError, match="same number of examples"):
        BatchStream.from_arrays(test.images[:3], test.labels[:4], 10)
    labels = test.labels.copy()
    labels[150] = 12
    stream = BatchStream.from_arrays(test.images, labels, 10, batch_size=50,
                                     block_batches=2)
    with pytest.raises(ValueError, match=r"\(block 1\) labels"):
        list(stream)
    renamed = BatchStream([{"pixels": test.images[0], "label": 0}], 10,
                          name="mine")
    with pytest.raises(ValueError, match="mine: an example lacks 'image'"):
        list(renamed)
    with pytest.raises(ValueError, match="split: dataset 'mnist5k' has"):
        stream_dataset("mnist5k", "validation")
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        stream_dataset("nope")


def test_stream_of_another_class_count_is_refused(lenet, trained_lenet,
                                                  small_mnist):
    test = small_mnist.test
    stream = BatchStream.from_arrays(test.images, test.labels, 12)
    with pytest.raises(ValueError, match="data: the stream .* 12 classes"):
        sweep(lenet, trained_lenet, damages=["zero"], ratios=[0.1], seeds=1,
              data=stream, root_key=0)
    with pytest.raises(ValueError, match="stream: has 12 classes"):
        evaluate_stream(lenet.forward, trained_lenet, stream, 10)


def _config(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return load_config(path)


def test_a_streamed_experiment_writes_the_same_results(tmp_path, mnist,
                                                       trained_lenet):
    zoo = tmp_path / "zoo"
    save_checkpoint(zoo_path("lenet5", "mnist5k", 0, zoo), trained_lenet,
                    {"model": "lenet5", "dataset": "mnist5k", "seed": 0})
    text = """
        name: streamed
        model: lenet5
        dataset: mnist5k
        damage:
          - kind: zero
            ratios: [0.2, 0.6]
        sweep: {seeds: 1}
        evaluate: {batch_size: 40, test_examples: 200%s}
        """
    held = run_experiment(_config(tmp_path, text % ""), tmp_path / "held",
                          progress=False, zoo_dir=zoo)
    config = _config(tmp_path, text % ", stream: true, block_batches: 3")
    check_config(config)
    streamed = run_experiment(config, tmp_path / "streamed", progress=False,
                              zoo_dir=zoo)
    assert _rows_equal(streamed.rows, held.rows)
    assert (tmp_path / "streamed" / "results.csv").read_bytes() == (
        tmp_path / "held" / "results.csv").read_bytes()


def test_stream_config_needs_a_tfds_dataset(tmp_path):
    np.savez(tmp_path / "mine.npz", images=np.zeros((20, 8, 8, 1), np.float32),
             labels=np.arange(20) % 2)
    config = _config(tmp_path, f"""
        model: mlp
        dataset: {tmp_path / 'mine.npz'}
        evaluate: {{stream: true}}
        """)
    with pytest.raises(ConfigError, match="evaluate.stream: dataset .* is "
                                          "not built by TFDS"):
        check_config(config)
