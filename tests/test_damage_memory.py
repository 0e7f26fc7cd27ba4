"""Memory-layout faults: Rowhammer clusters, stuck regions, lost pages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recovjax.damage import (get_damage, make_lost_pages, make_rowhammer,
                             make_stuck_region)

KEY = jax.random.key(3)
# 8,192 float32 entries: exactly 32 pages of 1 KiB (256 entries a page).
PARAMS = {"a": jnp.linspace(-1.0, 1.0, 4096).reshape(64, 64),
          "b": jnp.linspace(0.5, 2.0, 4096)}


def _buffer(tree) -> np.ndarray:
    # The serialised buffer as the operators see it (little-endian words).
    return np.concatenate([np.asarray(leaf).view(np.uint32).ravel()
                           for leaf in jax.tree.leaves(tree)])


def _popcount(words: np.ndarray) -> np.ndarray:
    return np.unpackbits(words.view(np.uint8)).reshape(-1, 32).sum(1)


def test_rowhammer_flips_k_distinct_bits_in_each_hit_page():
    damage = make_rowhammer(4, page_bytes=1024)(KEY, PARAMS, 0.25)
    flipped = _buffer(damage.params) ^ _buffer(PARAMS)
    per_entry = _popcount(flipped)
    assert per_entry.sum() == 8 * 4          # 8 of 32 pages, 4 flips each
    pages = np.flatnonzero(per_entry) // 256
    counts = np.bincount(pages, weights=per_entry[per_entry > 0],
                         minlength=32)
    assert set(counts[counts > 0]) == {4} and (counts > 0).sum() == 8
    # Each flip in its own quarter of the page.
    for page in np.flatnonzero(counts):
        quarters = (np.flatnonzero(per_entry[page * 256:(page + 1) * 256])
                    // 64)
        assert sorted(quarters) == sorted(set(quarters))
    mask = np.concatenate([np.ravel(m) for m in
                           jax.tree.leaves(damage.mask)])
    np.testing.assert_array_equal(mask, per_entry > 0)


def test_byte_order_decides_which_bit_of_a_word_a_flip_hits():
    little = make_rowhammer(8, page_bytes=1024)(KEY, PARAMS, 0.5)
    big = make_rowhammer(8, page_bytes=1024, byte_order="big")(KEY, PARAMS,
                                                                 0.5)
    flips_l = _buffer(little.params) ^ _buffer(PARAMS)
    flips_b = _buffer(big.params) ^ _buffer(PARAMS)
    # Same entries, the byte within each word mirrored.
    np.testing.assert_array_equal(flips_l != 0, flips_b != 0)
    np.testing.assert_array_equal(flips_l.byteswap(), flips_b)


@pytest.mark.parametrize("order", ["little", "big"])
def test_a_stuck_region_is_one_contiguous_stretch_of_bytes(order):
    zeros = {"w": jnp.zeros((1000,), jnp.float32)}
    damage = make_stuck_region(1, byte_order=order)(KEY, zeros, 0.3)
    words = _buffer(damage.params)
    stored = words.byteswap() if order == "big" else words
    on = np.flatnonzero(stored.view(np.uint8))
    assert len(on) == 1200                          # floor(4000 * 0.3)
    assert on[-1] - on[0] == len(on) - 1            # contiguous
    assert np.all(stored.view(np.uint8)[on] == 0xFF)
    assert int(damage.mask["w"].sum()) == len(np.flatnonzero(words))


def test_lost_pages_read_back_as_zeros():
    damage = make_lost_pages(page_bytes=1024)(KEY, PARAMS, 0.25)
    zero = _buffer(damage.params) == 0
    pages = np.flatnonzero(zero.reshape(32, 256).all(axis=1))
    assert len(pages) == 8
    assert zero.sum() == 8 * 256 + np.sum(_buffer(PARAMS) == 0)
    # int8 codes: 1 byte an entry, so the same ratio loses 2 of 8 pages.
    deployed = make_lost_pages(page_bytes=1024, format="int8")(
        KEY, PARAMS, 0.25)
    assert sum(int(m.sum()) for m in jax.tree.leaves(deployed.mask)) \
        == 2 * 1024


def test_rates_are_traced_one_program_for_a_sweep():
    op = make_rowhammer(2, page_bytes=1024)
    traces = []

    def run(rates):
        traces.append(1)
        return jax.vmap(lambda r: op(KEY, PARAMS, r).params)(rates)

    compiled = jax.jit(run)
    out = compiled(jnp.array([0.0, 0.5]))
    compiled(jnp.array([0.25, 1.0]))
    assert len(traces) == 1
    np.testing.assert_array_equal(out["a"][0], PARAMS["a"])


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="flips_per_page must be"):
        make_rowhammer(0)
    with pytest.raises(ValueError, match="byte_order must be one of"):
        make_rowhammer(byte_order="middle")
    with pytest.raises(ValueError, match="page_bytes must be"):
        make_lost_pages(page_bytes=0)
    with pytest.raises(ValueError, match="leaf 'a'.*int4 codes are 4 bits"):
        make_lost_pages(format="int4")(KEY, PARAMS, 0.1)
    with pytest.raises(ValueError, match="page_bytes: 6 is not a multiple"):
        make_lost_pages(page_bytes=6)(KEY, PARAMS, 0.1)
    with pytest.raises(ValueError, match="value must be 0 or 1"):
        make_stuck_region(2)
    with pytest.raises(ValueError, match="rate"):
        make_rowhammer()(KEY, PARAMS, 1.5)
    with pytest.raises(ValueError, match="one rate for the whole buffer"):
        make_rowhammer()(KEY, PARAMS, {"a": 0.1, "b": 0.1})
    assert get_damage("rowhammer", flips_per_page=2).amount_name == "rate"
