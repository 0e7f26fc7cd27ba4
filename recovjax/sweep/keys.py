"""The sweep's keys: one typed key per point, derived from names, not order.

Point ``(kind, ratio index, seed)`` gets ``fold_in(fold_in(fold_in(root,
damage_id(kind)), ratio_index), seed)``. The keys of a chunk are derived on
the host (:func:`point_keys`, in NumPy for the default ``threefry2x32``
keys), so the compiled programs contain no threefry.
"""

from __future__ import annotations

import zlib
from typing import Sequence

import jax
import numpy as np

from recovjax import _checks
from recovjax._types import PRNGKey


def damage_id(name: str) -> int:
    """Stable integer identity of a damage kind: CRC-32 of its name (31 bits).

    Args:
        name: the kind's name.

    Returns:
        An ``int`` in ``[0, 2**31)``; the same name always gives the same
        number, whatever other kinds are swept.
    """
    return zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF


def point_key(root_key: PRNGKey, damage: str, ratio_index: int, seed: int
              ) -> PRNGKey:
    """The key of one sweep point.

    Args:
        root_key: the sweep's root key (typed).
        damage: the damage kind's name.
        ratio_index: position of the ratio in the sweep's ``ratios``.
        seed: the seed value (an entry of the sweep's seeds).

    Returns:
        ``fold_in(fold_in(fold_in(root_key, damage_id(damage)), ratio_index),
        seed)``.
    """
    key = jax.random.fold_in(root_key, damage_id(damage))
    key = jax.random.fold_in(key, ratio_index)
    return jax.random.fold_in(key, seed)


_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry_fold_in(key_data: np.ndarray, data: np.ndarray) -> np.ndarray:
    # jax.random.fold_in for threefry2x32 keys, in NumPy, for many keys at
    # once: the Threefry-2x32 hash (20 rounds) of the counter pair
    # (0, data) under the key, as JAX computes it (threefry_2x32 of
    # threefry_seed(data)). Bit-equality with JAX is tested.
    k0, k1 = key_data[:, 0], key_data[:, 1]
    schedule = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
    x = [np.zeros_like(data) + k0, data + k1]
    with np.errstate(over="ignore"):
        for block in range(5):
            for rotation in _THREEFRY_ROTATIONS[block % 2]:
                x[0] = x[0] + x[1]
                x[1] = (x[1] << np.uint32(rotation)) | (
                    x[1] >> np.uint32(32 - rotation))
                x[1] = x[0] ^ x[1]
            x[0] = x[0] + schedule[(block + 1) % 3]
            x[1] = x[1] + schedule[(block + 2) % 3] + np.uint32(block + 1)
    return np.stack(x, axis=1)


def _fold_on_host(root_key: PRNGKey, kind_id: int, ratio_indices: np.ndarray,
                  seeds: np.ndarray) -> PRNGKey | None:
    # point_key for many points without a device round trip per key, when
    # the key is JAX's default threefry2x32 and every datum is a uint32.
    if (str(jax.random.key_impl(root_key)) != "threefry2x32"
            or min(ratio_indices.min(initial=0), seeds.min(initial=0)) < 0
            or max(ratio_indices.max(initial=0), seeds.max(initial=0))
            > 0xFFFFFFFF):
        return None
    root = np.asarray(jax.random.key_data(root_key), np.uint32).reshape(1, 2)
    kind = _threefry_fold_in(root, np.asarray([kind_id], np.uint32))
    count = ratio_indices.shape[0]
    ratio = _threefry_fold_in(np.broadcast_to(kind, (count, 2)),
                              ratio_indices.astype(np.uint32))
    point = _threefry_fold_in(ratio, seeds.astype(np.uint32))
    return jax.random.wrap_key_data(point, impl="threefry2x32")


def point_keys(root_key: PRNGKey, damage: str, ratio_indices: Sequence[int],
               seeds: Sequence[int]) -> PRNGKey:
    """:func:`point_key` for many points of one damage kind, in one call.

    The keys are derived on the host, before the sweep's programs run, so
    that the damage-and-evaluate programs take keys as inputs and contain
    no threefry (XLA:CPU compiles threefry under ``vmap`` into dozens of
    small kernels, about half a second per derivation). For JAX's default
    ``threefry2x32`` keys the three ``fold_in`` steps are computed in NumPy
    for all points at once (bit-equal to ``jax.random.fold_in``, tested);
    other key implementations take one scalar ``jax.random.fold_in`` per
    step.

    Args:
        root_key: the sweep's root key (typed).
        damage: the damage kind's name.
        ratio_indices: each point's ratio position.
        seeds: each point's seed value (as many as ``ratio_indices``).

    Returns:
        A key array of shape ``[len(ratio_indices)]``; entry ``i`` equals
        ``point_key(root_key, damage, ratio_indices[i], seeds[i])``.
    """
    ratio_indices = np.asarray(ratio_indices, np.int64)
    seeds = np.asarray(seeds, np.int64)
    if ratio_indices.shape != seeds.shape or ratio_indices.ndim != 1:
        raise ValueError(f"ratio_indices and seeds must be flat and of one "
                         f"length, got shapes {ratio_indices.shape} and "
                         f"{seeds.shape}")
    on_host = _fold_on_host(root_key, damage_id(damage), ratio_indices, seeds)
    if on_host is not None:
        return on_host
    kind_key = jax.random.fold_in(root_key, damage_id(damage))
    ratio_keys: dict[int, PRNGKey] = {}
    data = []
    for ratio_index, seed in zip(ratio_indices.tolist(), seeds.tolist()):
        if ratio_index not in ratio_keys:
            ratio_keys[ratio_index] = jax.random.fold_in(kind_key,
                                                         ratio_index)
        data.append(np.asarray(jax.random.key_data(
            jax.random.fold_in(ratio_keys[ratio_index], seed))))
    return jax.random.wrap_key_data(np.stack(data),
                                    impl=jax.random.key_impl(root_key))


def _seed_key(seed: int) -> PRNGKey:
    # jax.random.key(seed) without compiling a program for it: a
    # threefry2x32 key of a seed in [0, 2**31) holds the words (0, seed).
    if (jax.config.jax_default_prng_impl == "threefry2x32"
            and 0 <= seed < 2**31):
        return jax.random.wrap_key_data(np.asarray([0, seed], np.uint32),
                                        impl="threefry2x32")
    return jax.random.key(seed)


def _root(root_key: PRNGKey | int) -> tuple[PRNGKey, int | None]:
    if isinstance(root_key, bool):
        raise TypeError("root_key must be a typed key or an int seed, got "
                        f"{root_key!r}")
    if isinstance(root_key, (int, np.integer)):
        return _seed_key(int(root_key)), int(root_key)
    _checks.check_key(root_key, "root_key")
    return root_key, None


def key_indices(op, ratio_indices: Sequence[int]) -> list[int]:
    """The ratio indices a kind's point keys are derived from.

    An operator whose amount is a budget along one trajectory (the bit
    search: ``op.amount_is_budget``) gets the same key at every amount of a
    seed, so that a larger budget continues the flips of a smaller one;
    every other operator gets a key per (amount, seed).
    """
    if getattr(op, "amount_is_budget", False):
        return [0] * len(ratio_indices)
    return list(ratio_indices)

