"""Protection as recovery: weight saturation and checksum-guarded restore.

Two defences against faults in stored weights, run as strategies over
stacks of damaged models like the others (:mod:`recovjax.recovery.points`):

* **Weight saturation** (``saturate``): every weight is clipped to the
  range of its clean leaf, and a NaN weight becomes 0. A flipped exponent
  bit turns a weight into ``1e38`` or inf; saturation takes it back to the
  leaf's extreme, which the network tolerates. Needs the clean ranges
  only (two numbers per leaf).
* **Checksum detection** (``checksum_restore``): per block of
  ``block_size`` consecutive entries, a Fletcher-style checksum of the
  stored bits (two ``uint32`` words a block) is computed from the clean
  weights once, as a deployment would keep it. Detection recomputes the
  damaged blocks' checksums and compares those: ``2 / block_size`` words
  per entry kept and compared, instead of the whole checkpoint. Only the
  flagged blocks are restored from the checkpoint. Any single changed word
  in a block changes its first sum; two changes that cancel there change
  the second, position-weighted one.

The overhead of each on clean evaluation is measured in
``benchmarks/bench_faults.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from recovjax._types import Array
from recovjax.recovery import points
from recovjax.recovery import restore as restore_lib


def block_checksums(leaf: Array, block_size: int) -> Array:
    """``uint32[blocks, 2]``: the checksums of consecutive blocks of a leaf.

    Word ``0`` is the sum of the entries' stored bits (as unsigned integers
    of their width, widened to ``uint32``), word ``1`` the sum weighted by
    the position in the block (``1 .. block_size``), both modulo ``2**32``;
    the last block is padded with zeros.

    Args:
        leaf: an array of 1, 2 or 4-byte entries.
        block_size: entries per block.
    """
    flat = jnp.ravel(leaf)
    width = flat.dtype.itemsize
    words = jax.lax.bitcast_convert_type(
        flat, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[width]
    ).astype(jnp.uint32)
    count = -(-words.size // block_size)
    padded = jnp.zeros((count * block_size,), jnp.uint32).at[
        :words.size].set(words).reshape(count, block_size)
    weights = jnp.arange(1, block_size + 1, dtype=jnp.uint32)
    return jnp.stack([jnp.sum(padded, axis=1, dtype=jnp.uint32),
                      jnp.sum(padded * weights, axis=1, dtype=jnp.uint32)],
                     axis=1)


def _blocks_to_entries(flags: Array, leaf: Array, block_size: int) -> Array:
    return jnp.repeat(flags, block_size)[:leaf.size].reshape(leaf.shape)


def checksum_fn(evaluator: points.Evaluator, block_size: int):
    """The point form of checksum-guarded restore.

    ``shared`` is ``(values, checksums, eval_batches)``: the checkpoint
    values of the leaves that may need restoring, their clean block
    checksums and the test batches.
    """

    def fn(key, params, mask, shared):
        del key, mask
        values, checksums, eval_batches = shared
        flat = restore_lib._flat(params)
        new, restored = dict(flat), {}
        for name, stored in values.items():
            leaf = flat[name]
            flagged = jnp.any(block_checksums(leaf, block_size)
                              != checksums[name], axis=1)
            blocks = _blocks_to_entries(flagged, leaf, block_size)
            new[name] = jnp.where(blocks, jnp.asarray(stored, leaf.dtype),
                                  leaf)
            restored[name] = jnp.any(flagged)
        return points.untrained(evaluator, restore_lib._unflatten_like(
            params, new), eval_batches, restored)

    return fn


def saturate_fn(evaluator: points.Evaluator):
    """The point form of weight saturation.

    ``shared`` is ``(ranges, eval_batches)``: ``{path: (low, high)}`` of the
    clean leaves that may need it, and the test batches.
    """

    def fn(key, params, mask, shared):
        del key, mask
        ranges, eval_batches = shared
        flat = restore_lib._flat(params)
        new, restored = dict(flat), {}
        for name, (low, high) in ranges.items():
            leaf = flat[name]
            low = jnp.asarray(low, leaf.dtype)
            high = jnp.asarray(high, leaf.dtype)
            clipped = jnp.where(jnp.isnan(leaf), jnp.zeros((), leaf.dtype),
                                jnp.clip(leaf, low, high))
            new[name] = clipped
            restored[name] = jnp.any(clipped != leaf)
        return points.untrained(evaluator, restore_lib._unflatten_like(
            params, new), eval_batches, restored)

    return fn


def clean_ranges(values: dict[str, np.ndarray]) -> dict[str, tuple]:
    """``{path: (low, high)}`` of clean leaves (floating ones)."""
    return {name: (np.asarray(value).min(), np.asarray(value).max())
            for name, value in values.items()
            if np.issubdtype(np.asarray(value).dtype, np.floating)}


def clean_checksums(values: dict[str, np.ndarray], block_size: int
                    ) -> dict[str, np.ndarray]:
    """The block checksums of clean leaves, computed once."""
    compute = jax.jit(block_checksums, static_argnums=1)
    return {name: np.asarray(compute(jnp.asarray(value), block_size))
            for name, value in values.items()}
