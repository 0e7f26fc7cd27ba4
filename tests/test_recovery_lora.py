"""LoRA recovery: frozen damaged kernels, low-rank adapters merged after."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recovjax._types import Split
from recovjax.checkpoints import save_checkpoint
from recovjax.damage import get_damage
from recovjax.data import batch_split
from recovjax.models import LeafInfo, from_equinox
from recovjax.models.info import paths_of
from recovjax.recovery import get_strategy, make_task
from recovjax.recovery.lora import make_lora


def _flat(tree):
    return dict(zip(paths_of(tree), jax.tree.leaves(tree)))


@pytest.fixture(scope="module")
def setting(lenet, trained_lenet, small_mnist, tmp_path_factory):
    directory = tmp_path_factory.mktemp("lora") / "ckpt"
    save_checkpoint(directory, trained_lenet, {"model": "lenet5"})
    task = make_task(lenet, Split(small_mnist.train.images[:200],
                                  small_mnist.train.labels[:200]),
                     checkpoint=directory,
                     eval_batches=batch_split(small_mnist.test, 100))
    keys = jax.random.split(jax.random.key(3), 2)
    op = get_damage("zero")
    damage = jax.vmap(lambda k: op(k, trained_lenet, 0.5))(keys)
    return lenet, trained_lenet, task, keys, damage


def test_auto_layers_skip_kernels_an_adapter_would_not_shrink(lenet):
    adapter = make_lora(lenet.abstract_params(), lenet.info, rank=8)
    # conv1's kernel is 5*5*1 x 6 = 150 values; a rank-8 adapter has 248.
    assert adapter.layers == ("conv2/kernel", "fc1/kernel", "fc2/kernel",
                              "fc3/kernel")
    rows_cols = {"conv2/kernel": (150, 16), "fc1/kernel": (256, 120),
                 "fc2/kernel": (120, 84), "fc3/kernel": (84, 10)}
    assert adapter.trainable == sum(8 * (r + c) for r, c in
                                    rows_cols.values())
    named = make_lora(lenet.abstract_params(), lenet.info, rank=2,
                      layers=["conv1", "fc3/kernel"])
    assert named.layers == ("conv1/kernel", "fc3/kernel")
    assert make_lora(lenet.abstract_params(), lenet.info, rank=2,
                     layers="fc[12]").layers == ("fc1/kernel", "fc2/kernel")


def test_merge_adds_the_scaled_product_along_the_output_axis():
    model = from_equinox(eqx.nn.Linear(6, 4, key=jax.random.key(0)),
                         sample=jnp.zeros((2, 6)))
    adapter = make_lora(model.params, model.info, rank=2, alpha=3.0,
                        layers=["weight"])
    adapters = adapter.init(jax.random.key(1), model.params)
    a = adapters["weight"]["a"]
    b = jax.random.normal(jax.random.key(2), (2, 4))
    merged = adapter.merge(model.params, {"weight": {"a": a, "b": b}})
    # equinox keeps [out, in]: the rows of A are the inputs.
    expected = model.params["weight"] + 1.5 * (a @ b).T
    np.testing.assert_allclose(merged["weight"], expected, rtol=1e-6)
    np.testing.assert_array_equal(merged["bias"], model.params["bias"])
    # B starts at zero: the merged model is the damaged one, bit for bit.
    start = adapter.merge(model.params, adapters)
    np.testing.assert_array_equal(start["weight"], model.params["weight"])


def test_lora_changes_only_adapted_kernels_by_at_most_the_rank(setting):
    model, params, task, keys, damage = setting
    strategy = get_strategy("lora", rank=4, steps=30, optimizer="adam",
                            learning_rate=0.01,
                            eval_every=30)
    outcome = strategy(keys, damage, task)
    adapter = make_lora(params, model.info, rank=4)
    assert outcome.trainable == adapter.trainable
    assert outcome.trainable < 0.1 * sum(
        x.size for x in jax.tree.leaves(params))
    before, after = _flat(damage.params), _flat(outcome.params)
    for path in before:
        difference = np.asarray(after[path] - before[path])
        if path not in adapter.layers:
            np.testing.assert_array_equal(difference, 0)
            continue
        for model_difference in difference:
            matrix = model_difference.reshape(-1, model_difference.shape[-1])
            assert np.linalg.matrix_rank(matrix, tol=1e-6) <= 4
            assert np.any(matrix != 0)
    accuracy = np.asarray(outcome.curve.accuracy)
    assert np.all(accuracy[:, -1] > accuracy[:, 0] + 0.1)


def test_lora_keeps_removed_units_removed(setting):
    model, params, task, keys, _ = setting
    op = get_damage("remove_neurons")
    damage = jax.vmap(lambda k: op(k, params, 0.3, info=model.info))(keys)
    outcome = get_strategy("lora", rank=2, steps=5, learning_rate=0.05,
                           structural=True)(keys, damage, task)
    for path, mask in _flat(damage.mask).items():
        kept = np.asarray(_flat(outcome.params)[path])[np.asarray(mask)]
        np.testing.assert_array_equal(kept, 0)


def test_lora_errors_name_the_option(setting, lenet):
    with pytest.raises(ValueError, match="rank must be a positive int"):
        get_strategy("lora", rank=0)
    with pytest.raises(ValueError, match="layers: 'dense9' is not a kernel"):
        make_lora(lenet.abstract_params(), lenet.info, layers=["dense9"])
    with pytest.raises(ValueError, match="matches no kernel"):
        make_lora(lenet.abstract_params(), lenet.info, layers="nothing.*")
    with pytest.raises(ValueError, match="no kernel is large enough"):
        make_lora(lenet.abstract_params(), lenet.info, rank=100)
    plain = from_equinox(eqx.nn.Linear(6, 4, key=jax.random.key(0)),
                         sample=jnp.zeros((2, 6))).with_info(
        {"weight": LeafInfo(), "bias": LeafInfo()})
    with pytest.raises(ValueError, match="declares no kernel leaf"):
        make_lora(plain.params, plain.info)
    with pytest.raises(ValueError, match="alpha must be a positive"):
        make_lora(lenet.abstract_params(), lenet.info, alpha=-1.0)
