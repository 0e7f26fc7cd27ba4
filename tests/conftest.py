"""Shared fixtures: prepared data in a session directory, tiny trained models.

Everything heavy is session-scoped and small: the embedded MNIST is built
once into a temporary data directory, and the "pretrained" LeNet-5 used by
damage/evaluation/recovery tests trains for one short epoch on a subset.
"""

from __future__ import annotations

import os

# The tests' programs are tiny and each is compiled about once, so most of
# a test's time is XLA:CPU's LLVM optimisation of code that then runs for
# milliseconds. Without it the suite compiles about a third faster; every
# result a test checks is still computed by XLA, only less optimised
# (bounds follow from float32 error, not from one compilation's rounding).
# Set before JAX starts, and inherited by the processes tests start.
os.environ["XLA_FLAGS"] = " ".join(filter(None, (
    os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0")))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from recovjax._types import Dataset, Split  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep every test away from the user's cache and data directories."""
    root = tmp_path_factory.mktemp("recovjax-cache")
    previous = {k: os.environ.get(k) for k in
                ("RECOVJAX_CACHE_DIR", "RECOVJAX_DATA_DIR", "TFDS_DATA_DIR")}
    os.environ["RECOVJAX_CACHE_DIR"] = str(root / "cache")
    os.environ["RECOVJAX_DATA_DIR"] = str(root / "data")
    os.environ["TFDS_DATA_DIR"] = str(root / "tfds")
    yield root
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def mnist(_isolated_cache) -> Dataset:
    """The embedded mnist5k dataset (4,000 train / 1,000 test)."""
    from recovjax.data import load_dataset
    return load_dataset("mnist5k")


@pytest.fixture(scope="session")
def small_mnist(mnist) -> Dataset:
    """A 500-train / 200-test subset of mnist5k, for fast tests."""
    return Dataset(name="mnist5k-small",
                   train=Split(mnist.train.images[:500],
                               mnist.train.labels[:500]),
                   test=Split(mnist.test.images[:200], mnist.test.labels[:200]),
                   num_classes=10)


@pytest.fixture(scope="session")
def lenet():
    from recovjax.models import get_model
    return get_model("lenet5")


@pytest.fixture(scope="session")
def trained_lenet(lenet, small_mnist):
    """LeNet-5 trained for 3 quick epochs on the small subset (~80 % acc)."""
    from recovjax.pretrain import Recipe, train
    params, _, _ = train(jax.random.key(0), lenet, small_mnist,
                         Recipe(epochs=3, batch_size=50, learning_rate=2e-3),
                         progress=False)
    return params


def tree_equal(a, b) -> bool:
    """Bit-exact equality of two pytrees (structure, dtypes and values)."""
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    return tree_a == tree_b and all(
        np.asarray(x).dtype == np.asarray(y).dtype and
        np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)
        for x, y in zip(leaves_a, leaves_b))
