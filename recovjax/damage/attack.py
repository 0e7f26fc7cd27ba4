"""The progressive bit search: an attacker's bit flips, chosen by gradient.

Random bit faults in a quantized network mostly do nothing; an attacker who
can flip a few chosen bits of the stored weights (Rowhammer on a deployed
model) picks them by the gradient of the loss. Rakin et al. (2019, "Bit-Flip
Attack") showed that a few dozen such flips take an 8-bit network to chance
level. :func:`make_bit_search` builds that attack as one compiled program:

1. the weights in scope are stored in a format (``int8`` by default: the
   codes and scales of :func:`~recovjax.damage.formats.encode`);
2. at each step, the gradient ``g`` of the loss on the attack batch with
   respect to the (dequantized) weights ranks every candidate bit by the
   first-order change of the loss that flipping it causes,
   ``g * (decode(code ^ bit) - decode(code))``;
3. each leaf's best candidates (``candidates``) are tried for real (the loss on the
   attack batch with that one flip), and the flip that raises the loss
   most is made (the in-layer then cross-layer search of the paper); an
   entry already flipped is not a candidate again;
4. steps 2-3 repeat ``flips`` times, in a ``lax.scan``.

``strategy="random"`` flips uniformly drawn bits instead, with the same
budget and the same bookkeeping: the baseline that shows how far an
attacker is from random faults. Accuracy on an evaluation set is recorded
after every flip. The attack is a pure function of ``(key, params,
attack_batch, eval_batches)``, so ``jax.vmap`` runs it over seeds and
attack batches in one program (:func:`run_bit_search` does).
"""

from __future__ import annotations

from typing import Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from recovjax import _checks
from recovjax._types import Array, Damage, Params, PRNGKey
from recovjax.damage import formats, select
from recovjax.damage.params import check_choice
from recovjax.damage.scope import ScopeLike, leaf_paths, parse_scope
from recovjax.evaluate import cross_entropy, evaluate
from recovjax.models.info import info_by_path

STRATEGIES = ("gradient", "random")


class BitSearch(NamedTuple):
    """What a bit search did.

    Attributes:
        params: the attacked parameters (the leaves in scope decoded from
            their damaged codes, the others as given).
        deployed: the parameters as the format stores them with no flip:
            the clean deployed model the flips are made in.
        leaf: ``int32[flips]``: which leaf in scope (an index into
            :attr:`paths`) each flip hit.
        index: ``int32[flips]``: the flat index of the entry in its leaf.
        bit: ``int32[flips]``: the bit position in the format's code.
        loss: ``float32[flips]``: the attack batch's loss after each flip.
        accuracy: ``float32[flips + 1]``: accuracy on the evaluation set
            of the deployed model and then after each flip.

    ``search.paths(params)`` names the leaves :attr:`leaf` indexes.
    """

    params: Params
    deployed: Params
    leaf: Array
    index: Array
    bit: Array
    loss: Array
    accuracy: Array


Batch = tuple
"""``(images, labels)`` of one attack batch."""


def make_bit_search(model, *, flips: int, scope: ScopeLike = "weights",
                    format: str = "int8", granularity: str = "tensor",
                    strategy: Literal["gradient", "random"] = "gradient",
                    candidates: int = 1) -> Callable[..., BitSearch]:
    """Build the progressive bit search (or its random baseline).

    Args:
        model: a classification :class:`~recovjax.models.Model`.
        flips: the budget: number of bits flipped (static, at least 1).
        scope: the leaves the attacker can reach (see
            :mod:`recovjax.damage.scope`; ``"weights"`` needs the model's
            leaf metadata, which it has).
        format: the deployed format of those leaves
            (:data:`~recovjax.damage.formats.FORMATS`).
        granularity: ``"tensor"`` or ``"channel"`` scales.
        strategy: ``"gradient"`` (the attack) or ``"random"`` (uniform
            random bits of the leaves in scope, each flip a fresh draw).
        candidates: bits per leaf, the best by the first-order estimate,
            whose flips are tried for real at each step (the paper's
            in-layer search keeps the top few; each costs a forward pass
            on the attack batch per leaf and step).

    Returns:
        ``search(key, params, attack_batch, eval_batches=None, budget=None)
        -> BitSearch``, traceable (jit and vmap it); ``attack_batch`` is
        ``(images, labels)`` and ``eval_batches`` a
        :class:`~recovjax.Batches` (``None``: no accuracy is recorded, it
        is NaN). ``budget`` (traced; default ``flips``) stops the flips
        after that many: the later steps change nothing. The key is used by
        the random strategy only (and must still be given).

    Raises:
        ValueError: for a bad budget, format or strategy (now), or a scope
            that matches no floating leaf (when called).
    """
    if isinstance(flips, bool) or not isinstance(flips, (int, np.integer)) \
            or flips < 1:
        raise ValueError(f"flips must be a positive int, got {flips!r}")
    check_choice("strategy", strategy, STRATEGIES)
    if isinstance(candidates, bool) or not isinstance(
            candidates, (int, np.integer)) or candidates < 1:
        raise ValueError(f"candidates must be a positive int, got "
                         f"{candidates!r}")
    fmt = formats.get_format(format, granularity)
    resolved = parse_scope(scope)
    forward, num_classes = model.forward, model.num_classes

    def in_scope(params: Params) -> list[int]:
        # The floating leaves in scope, by index in flattening order.
        flags = resolved.select(params, info_by_path(params, model.info))
        leaves = jax.tree.leaves(params)
        chosen = [i for i, flag in enumerate(flags) if flag and jnp.issubdtype(
            jnp.result_type(leaves[i]), jnp.floating)]
        if not chosen:
            raise ValueError(f"scope: {scope!r} matches no floating leaf of "
                             "the parameters")
        return chosen

    def search(key: PRNGKey, params: Params, attack_batch: Batch,
               eval_batches=None, budget: Array | None = None
               ) -> BitSearch:
        select.check_key(key)
        chosen = in_scope(params)
        leaves, treedef = jax.tree.flatten(params)
        width = fmt.layout.width
        encoded = [formats.encode(leaves[i], fmt) for i in chosen]
        images, labels = attack_batch

        def assemble(codes):
            out = list(leaves)
            for position, i in enumerate(chosen):
                out[i] = formats.decode(encoded[position]._replace(
                    codes=codes[position]), fmt, leaves[i].dtype)
            return jax.tree.unflatten(treedef, out)

        def loss_of(codes):
            logits = forward(assemble(codes), images)
            return jnp.mean(cross_entropy(logits, labels))

        def accuracy_of(codes):
            if eval_batches is None:
                return jnp.float32(jnp.nan)
            return evaluate(forward, assemble(codes), eval_batches,
                            num_classes).accuracy

        start = [e.codes for e in encoded]
        bits = jnp.left_shift(jnp.ones((), fmt.layout.uint),
                              jnp.arange(width, dtype=fmt.layout.uint))

        def flip(codes, leaf, index, bit):
            # codes with one bit flipped: leaf is static here.
            flat = codes[leaf].ravel()
            flat = flat.at[index].set(flat[index] ^ bits[bit])
            return [c if p != leaf else flat.reshape(c.shape)
                    for p, c in enumerate(codes)]

        def gradient_pick(codes, step_key):
            grads = jax.grad(lambda values: jnp.mean(cross_entropy(
                forward(jax.tree.unflatten(treedef, values), images),
                labels)))(jax.tree.leaves(assemble(codes)))
            leaf_ids, indices, bit_ids, losses = [], [], [], []
            for position, i in enumerate(chosen):
                code = codes[position].ravel()
                base = encoded[position]._replace(codes=codes[position])
                now = formats.decode(base, fmt, jnp.float32).ravel()
                flipped = jax.vmap(lambda b: formats.decode(
                    base._replace(codes=codes[position] ^ b), fmt,
                    jnp.float32).ravel())(bits)            # [width, n]
                gain = grads[i].ravel().astype(jnp.float32) * (flipped - now)
                # A flip to NaN or inf has no first-order gain to rank by;
                # an entry flipped before is not flipped again (a second
                # flip could only undo or repeat the damage).
                touched = code != start[position].ravel()
                gain = jnp.where(jnp.isfinite(gain) & ~touched[None], gain,
                                 -jnp.inf)
                count = min(candidates, int(gain.size))
                _, cells = jax.lax.top_k(gain.ravel(), count)
                for cell in cells:
                    index = (cell % code.size).astype(jnp.int32)
                    bit = (cell // code.size).astype(jnp.int32)
                    leaf_ids.append(position)
                    indices.append(index)
                    bit_ids.append(bit)
                    losses.append(loss_of(flip(codes, position, index, bit)))
            losses = jnp.stack(losses)
            losses = jnp.where(jnp.isnan(losses), jnp.inf, losses)
            best = jnp.argmax(losses)
            leaf = jnp.asarray(leaf_ids, jnp.int32)[best]
            return leaf, jnp.stack(indices)[best], jnp.stack(bit_ids)[best]

        sizes = np.asarray([int(np.prod(np.shape(leaves[i]))) for i in chosen])

        def random_pick(codes, step_key):
            # A uniform cell over every bit of every leaf in scope.
            total = int(sizes.sum()) * width
            cell = jax.random.randint(step_key, (), 0, total)
            entry, bit = cell // width, cell % width
            starts = jnp.asarray(np.concatenate([[0], np.cumsum(sizes)]))
            leaf = (jnp.searchsorted(starts, entry, side="right") - 1
                    ).astype(jnp.int32)
            return leaf, (entry - starts[leaf]).astype(jnp.int32), \
                bit.astype(jnp.int32)

        pick = gradient_pick if strategy == "gradient" else random_pick

        limit = jnp.float32(flips) if budget is None else budget

        def step(codes, inputs):
            step_key, number = inputs
            leaf, index, bit = pick(codes, step_key)
            flipped = jax.lax.switch(leaf, [
                (lambda c, p=p: flip(c, p, index, bit))
                for p in range(len(chosen))], codes)
            # Past the budget the codes stay as they are.
            live = number.astype(jnp.float32) < limit
            codes = [jnp.where(live, new, old)
                     for new, old in zip(flipped, codes)]
            return codes, (leaf, index, bit, loss_of(codes),
                           accuracy_of(codes))

        codes, (leaf, index, bit, loss, accuracy) = jax.lax.scan(
            step, start, (jax.random.split(key, flips),
                          jnp.arange(flips, dtype=jnp.int32)))
        return BitSearch(assemble(codes), assemble(start), leaf, index, bit,
                         loss, jnp.concatenate([accuracy_of(start)[None],
                                                accuracy]))

    def paths(params: Params) -> tuple[str, ...]:
        """The paths of the leaves in scope, as ``BitSearch.leaf`` counts
        them."""
        names = leaf_paths(params)
        return tuple(names[i] for i in in_scope(params))

    search.paths = paths
    return search


ATTACK_EXAMPLES = 128
"""Examples in the attack batch of :func:`make_bit_search_damage`."""


class BitSearchDamage:
    """The bit search as a damage operator, once bound to a model and data.

    Built by :func:`make_bit_search_damage`. :meth:`bind` gives ``op(key,
    params, flips, *, info=None) -> Damage``: the attack with a budget of
    ``flips`` (traced, at most the ``flips`` it was built with) on an
    attack batch drawn by the key from the training examples it was bound
    to. An experiment binds it to the first 1,000 training examples.
    """

    amount_name = "flips"
    amount_is_fraction = False
    amount_is_budget = True
    damage_kind = "params"
    per_leaf_amounts = False
    check_traced = False

    def __init__(self, flips: int, scope, format: str, granularity: str,
                 strategy: str, attack_examples: int, candidates: int = 1):
        if isinstance(attack_examples, bool) or not isinstance(
                attack_examples, (int, np.integer)) or attack_examples < 1:
            raise ValueError(f"attack_examples must be a positive int, got "
                             f"{attack_examples!r}")
        self.settings = dict(flips=flips, scope=scope, format=format,
                             granularity=granularity, strategy=strategy,
                             candidates=candidates)
        formats.get_format(format, granularity)
        check_choice("strategy", strategy, STRATEGIES)
        if isinstance(flips, bool) or not isinstance(
                flips, (int, np.integer)) or flips < 1:
            raise ValueError(f"flips must be a positive int, got {flips!r}")
        self.attack_examples = int(attack_examples)

    def __call__(self, key: PRNGKey, params: Params, amount, *,
                 info=None) -> Damage:
        raise TypeError("the bit search needs a model and attack data: "
                        "op.bind(model, images, labels) first")

    def bind(self, model, images: Array, labels: Array) -> Callable:
        """The operator for ``model``, drawing attack batches from
        ``images`` and ``labels``.

        Raises:
            ValueError: for fewer examples than an attack batch.
        """
        images, labels = jnp.asarray(images), jnp.asarray(labels)
        count = int(images.shape[0])
        if count < self.attack_examples:
            raise ValueError(f"attack data: {count} examples, fewer than "
                             f"the attack batch of {self.attack_examples}")
        search = make_bit_search(model, **self.settings)
        size, limit = self.attack_examples, self.settings["flips"]

        def op(key: PRNGKey, params: Params, amount, *, info=None
               ) -> Damage:
            select.check_key(key)
            amount = select.check_amount(amount, name="flips",
                                         fraction=False)
            if not _checks.is_traced(amount) and (
                    float(amount) != int(amount) or amount > limit):
                raise ValueError(f"flips must be a whole number of at most "
                                 f"{limit}, got {float(amount)}")
            chosen = jax.random.choice(jax.random.fold_in(key, 1), count,
                                       (size,), replace=False)
            result = search(key, params, (images[chosen], labels[chosen]),
                            None, budget=amount)
            return as_damage(result)

        op.__name__ = f"bit_search_{self.settings['strategy']}"
        op.amount_name, op.amount_is_fraction = "flips", False
        op.damage_kind, op.per_leaf_amounts = "params", False
        op.check_traced = False
        # Every budget of a seed shares its key: the same attack batch and
        # the same flips, a larger budget continuing a smaller one.
        op.amount_is_budget = True
        op._checked_version = lambda: op
        return op


def make_bit_search_damage(flips: int = 30, scope: ScopeLike = "weights", *,
                           format: str = "int8", granularity: str = "tensor",
                           strategy: Literal["gradient", "random"]
                           = "gradient",
                           attack_examples: int = ATTACK_EXAMPLES,
                           candidates: int = 1) -> BitSearchDamage:
    """The progressive bit search as a damage kind for sweeps and configs.

    Args:
        flips: the largest budget (the scan's length); a point's amount is
            its budget, at most this.
        scope, format, granularity, strategy, candidates: as for
            :func:`make_bit_search`.
        attack_examples: the attack batch size.

    Returns:
        A :class:`BitSearchDamage`; ``bind(model, images, labels)`` gives
        the operator. The damaged parameters are the deployed model with
        the flips (entries no flip hit carry the format's rounding, as
        :func:`~recovjax.damage.formats.deploy` gives them); the mask marks
        the entries whose codes changed.
    """
    return BitSearchDamage(flips, scope, format, granularity, strategy,
                           attack_examples, candidates)


def run_bit_search(search: Callable[..., BitSearch], keys: Array,
                   params: Params, attack_batches: Batch, eval_batches
                   ) -> BitSearch:
    """Run a bit search for many seeds and attack batches in one program.

    Args:
        search: from :func:`make_bit_search`.
        keys: ``[runs]`` typed keys.
        params: the clean parameters (shared).
        attack_batches: ``(images [runs, B, ...], labels [runs, B])``.
        eval_batches: the evaluation set (shared).

    Returns:
        The :class:`BitSearch` of every run, stacked on a leading axis.
    """
    def one(key, batch):
        return search(key, params, batch, eval_batches)

    return jax.jit(jax.vmap(one))(keys, attack_batches)


def as_damage(result: BitSearch) -> Damage:
    """The attack as a :class:`~recovjax.Damage` of the deployed model, for
    :func:`~recovjax.damage.replay.fault_list` (one run, not a stack)::

        faults = fault_list(result.deployed, as_damage(result))
    """
    mask = jax.tree.map(lambda a, b: jnp.asarray(a) != jnp.asarray(b),
                        result.params, result.deployed)
    return Damage(params=result.params, mask=mask)


__all__ = ["BitSearch", "BitSearchDamage", "as_damage", "make_bit_search",
           "make_bit_search_damage", "run_bit_search"]
