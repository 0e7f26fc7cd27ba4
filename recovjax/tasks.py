"""Tasks: what a model is trained on and measured by, as pure functions.

A :class:`Task` says which part of a batch the model reads, the loss it is
trained on, and the metrics it is evaluated by, in the manner of optax's
``GradientTransformation``: a named tuple of pure functions, built by
factories (:func:`classification`, :func:`language_model`) that settle the
static choices (number of classes, vocabulary size) in Python.

A *batch* is a dict of arrays sharing a leading batch axis, for example
``{"images": f32[B, H, W, C], "labels": i32[B], "mask": bool[B]}`` or
``{"tokens": i32[B, T + 1], "mask": bool[B, T + 1]}``. The model is a pure
``forward(params, inputs) -> outputs`` with ``inputs = task.inputs(batch)``.

**Summation contract.** Per batch a task returns *sums* over the unmasked
examples (or tokens): ``float32`` sums of losses and ``int32`` counts. Sums
add across batches, so :func:`task_totals` accumulates them in a
``lax.scan`` over fixed-shape stacked batches and :func:`evaluate_task`
divides once at the end, exactly as :func:`recovjax.evaluate.evaluate`
does. Counts are therefore exact; totals of disjoint sets of batches (chunks,
devices) can be added before ``task.finalize``. Padding is excluded with
``jnp.where(valid, value, 0)``, never a product, so that a non-finite
output on padding cannot turn a total into NaN.

**Writing a task.** Any :class:`Task` works with :func:`evaluate_task`,
:func:`task_totals` and :func:`mean_loss`. Only ``name``, ``keys``,
``inputs`` and ``loss`` are required; without ``batch_totals`` the totals are
the loss's ``{"loss_sum", "count"}``, and without ``finalize`` the metrics
are those totals plus ``loss = loss_sum / count``. A mean squared error
regression task::

    def squared_error(predictions, batch):
        valid = batch["mask"] > 0
        error = jnp.sum((predictions - batch["targets"]) ** 2, axis=-1)
        return (jnp.where(valid, error, 0.0).sum(dtype=jnp.float32),
                valid.sum(dtype=jnp.int32))

    regression = Task(name="regression", keys=("inputs", "targets", "mask"),
                      inputs=lambda batch: batch["inputs"],
                      loss=squared_error)
    register_task("regression", lambda: regression)
    metrics = evaluate_task(get_task("regression"), forward, params, batches)
    metrics["loss"]  # mean squared error over the unmasked examples

A ``batch_totals`` of one's own returns a dict of sums (``float32`` for sums
of values, ``int32`` for counts) whose shapes do not depend on the batch;
``finalize`` turns the totals into a dict of metrics, typically dividing and
also returning the totals themselves.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from recovjax import _checks
from recovjax._types import Array, Params

Batch = Mapping[str, Any]
"""A dict of arrays sharing a leading batch axis (stacked batches: two)."""

Totals = Mapping[str, Any]
"""A dict of per-batch (or accumulated) sums: ``float32`` sums, ``int32``
counts."""

ForwardFn = Callable[[Params, Any], Any]
"""``forward(params, inputs) -> outputs``, e.g. a model's ``apply``."""

LossFn = Callable[[Any, Batch], tuple[Array, Array]]
"""``loss(outputs, batch) -> (loss_sum float32, count int32)``."""


class Task(NamedTuple):
    """A loss over a batch pytree plus metrics, as pure functions.

    Attributes:
        name: the task's name (``"classification"``, ``"language_model"``).
        keys: the batch keys the task needs; a batch may hold more.
        inputs: ``inputs(batch) -> inputs``: what the model reads.
        loss: ``loss(outputs, batch) -> (loss_sum, count)``: the ``float32``
            sum of the per-example (per-token) losses over the unmasked
            examples and their ``int32`` count, for one batch. Training
            minimises ``loss_sum / count`` (:func:`mean_loss`).
        batch_totals: ``batch_totals(outputs, batch) -> totals``: a dict of
            the sums one batch adds to the evaluation totals. ``None``: the
            loss's ``{"loss_sum": ..., "count": ...}``.
        finalize: ``finalize(totals) -> metrics``: divides the accumulated
            totals once. ``None``: the totals plus ``loss = loss_sum /
            count``.
        validate: ``validate(batch)``: host checks of the batch's values
            (label ranges, token ids), skipped for traced batches; works on
            one batch or on stacked batches. ``None``: no checks beyond the
            keys. Checks of static shapes (the logit width) belong in
            ``loss`` and ``batch_totals``, where they cost nothing.
        distill: ``distill(outputs, teacher_outputs, batch, temperature) ->
            (loss_sum, count)``: the distillation loss toward a teacher's
            outputs over the same examples (tokens) the loss counts, for the
            ``distill`` recovery strategy. ``None``: the task cannot be
            distilled (the strategy says so).
        headline: the metric reports lead with and plot (one of
            ``finalize``'s scalars, or of ``from_curve``'s).
        higher_is_better: whether a larger ``headline`` is better
            (accuracy) or worse (perplexity).
        from_curve: ``from_curve(metrics) -> metrics``: metrics derived from a
            recovery curve point's mean ``loss`` and ``accuracy`` (for
            example ``perplexity = exp(loss)``), so curves report them too.
            ``None``: none.
    """

    name: str
    keys: tuple[str, ...]
    inputs: Callable[[Batch], Any]
    loss: LossFn
    batch_totals: Callable[[Any, Batch], Totals] | None = None
    finalize: Callable[[Totals], dict[str, Array]] | None = None
    validate: Callable[[Batch], None] | None = None
    distill: Callable[[Any, Any, Batch, float], tuple[Array, Array]] | None \
        = None
    headline: str = "loss"
    higher_is_better: bool = False
    from_curve: Callable[[Mapping[str, Array]], dict[str, Array]] | None = None


# --------------------------------------------------------------------------
# Running a task.
# --------------------------------------------------------------------------


def _as_dict(batch: Any, name: str) -> dict[str, Any]:
    if hasattr(batch, "_asdict"):  # recovjax.Batches and other NamedTuples
        batch = batch._asdict()
    if not isinstance(batch, Mapping):
        raise TypeError(f"{name}: must be a dict of arrays, got "
                        f"{type(batch).__name__}")
    return dict(batch)


def _check_stacked(batches: dict, name: str) -> None:
    shapes = {key: tuple(np.shape(value)) for key, value in batches.items()}
    bad = [key for key, shape in shapes.items() if len(shape) < 2]
    if bad or len({shape[:2] for shape in shapes.values()}) > 1:
        shown = ", ".join(f"{key} {shape}" for key, shape in shapes.items())
        raise ValueError(
            f"{name}: every array needs the same leading [num_batches, "
            f"batch_size] axes (stack fixed-shape batches), got {shown}")


def check_batch(task: Task, batch: Any, name: str = "batch", *,
                stacked: bool = False) -> dict:
    """Check that ``batch`` has the task's keys and valid values.

    The keys (and, for stacked batches, the leading axes) are always
    checked; the values (``task.validate``) only when they are concrete.

    Args:
        task: the task.
        batch: one batch, or stacked batches (a dict; a
            :class:`~recovjax.Batches` is read as its fields).
        name: the argument's name, for the messages.
        stacked: whether ``batch`` holds stacked batches, whose every array
            must share the leading ``[num_batches, batch_size]`` axes.

    Returns:
        ``batch`` as a plain dict.

    Raises:
        TypeError: if ``batch`` is not a dict.
        ValueError: if a key is missing (the message lists the expected
            keys), stacked arrays disagree on their leading axes, or for
            what ``task.validate`` rejects.
    """
    batch = _as_dict(batch, name)
    missing = [key for key in task.keys if key not in batch]
    if missing:
        raise ValueError(
            f"{name}: task {task.name!r} expects the keys "
            f"{', '.join(repr(k) for k in task.keys)}; missing "
            f"{', '.join(repr(k) for k in missing)} (got "
            f"{', '.join(repr(k) for k in batch) or 'no keys'})")
    if stacked:
        _check_stacked(batch, name)
    if task.validate is not None and not _checks.any_traced(batch):
        task.validate(batch)
    return batch


def _batch_totals(task: Task, outputs: Any, batch: Batch) -> Totals:
    if task.batch_totals is not None:
        return task.batch_totals(outputs, batch)
    loss_sum, count = task.loss(outputs, batch)
    return {"loss_sum": loss_sum, "count": count}


def _finalize(task: Task, totals: Totals) -> dict[str, Array]:
    if task.finalize is not None:
        return task.finalize(totals)
    return {**totals, "loss": totals["loss_sum"] / jnp.asarray(
        totals["count"], jnp.float32)}


def mean_loss(task: Task, forward: ForwardFn, params: Params,
              batch: Batch) -> Array:
    """The task's mean loss over one batch's unmasked examples (to train on).

    Args:
        task: the task.
        forward: ``forward(params, inputs) -> outputs``.
        params: the model's parameters.
        batch: one batch (leading batch axis).

    Returns:
        ``float32`` scalar ``loss_sum / max(count, 1)``: zero for a batch
        that is all padding, so such a batch gives zero gradients.

    Raises:
        ValueError, TypeError: as :func:`check_batch`.
    """
    batch = check_batch(task, batch)
    loss_sum, count = task.loss(forward(params, task.inputs(batch)), batch)
    return loss_sum / jnp.maximum(count, 1).astype(jnp.float32)


def task_totals(task: Task, forward: ForwardFn, params: Params,
                batches: Batch) -> Totals:
    """Accumulate a task's totals over stacked batches in a ``lax.scan``.

    Traceable: call it inside ``jit`` and ``vmap`` (for example over a
    stack of parameters). Totals of disjoint batches add.

    Args:
        task: the task.
        forward: ``forward(params, inputs) -> outputs``, or, if it has
            ``takes_batch = True`` (a model with transient activation
            faults), ``forward(params, inputs, batch_index)``.
        params: the model's parameters.
        batches: a dict of arrays with leading ``[num_batches, batch_size]``
            axes (a :class:`~recovjax.Batches` is read as its fields).

    Returns:
        The summed ``task.batch_totals`` (the dtypes of one batch's totals).

    Raises:
        ValueError: for a missing key, arrays that disagree on the leading
            two axes, or what ``task.validate`` rejects (concrete batches).
        TypeError: if ``batches`` is not a dict.
    """
    batches = check_batch(task, batches, "batches", stacked=True)
    takes_batch = getattr(forward, "takes_batch", False)

    def one(batch, index=0):
        inputs = task.inputs(batch)
        outputs = (forward(params, inputs, index) if takes_batch
                   else forward(params, inputs))
        return _batch_totals(task, outputs, batch)

    first = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(
        leaf.shape[1:], leaf.dtype), batches)
    shapes = jax.eval_shape(one, first)
    start = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def accumulate(totals, step):
        index, batch = step if takes_batch else (0, step)
        return jax.tree.map(lambda total, value: total + value.astype(
            total.dtype), totals, one(batch, index)), None

    # Only a forward pass that takes the batch index scans over it: the
    # program of any other is what it was without activation faults.
    steps = batches
    if takes_batch:
        count = jax.tree.leaves(batches)[0].shape[0]
        steps = (jnp.arange(count, dtype=jnp.int32), batches)
    totals, _ = jax.lax.scan(accumulate, start, steps)
    return totals


def evaluate_task(task: Task, forward: ForwardFn, params: Params,
                  batches: Batch) -> dict[str, Array]:
    """Evaluate a model on a task over every unmasked example of ``batches``.

    :func:`task_totals` followed by ``task.finalize``: one ``lax.scan`` of
    sums, divided once. Traceable (``jit``, ``vmap`` over parameters).

    Args:
        task: the task.
        forward: ``forward(params, inputs) -> outputs``.
        params: the model's parameters.
        batches: a dict of arrays with leading ``[num_batches, batch_size]``
            axes.

    Returns:
        The task's metrics. The built-in tasks also return their totals
        (``count``, ``loss_sum``, ...), from which every fraction is made.

    Raises:
        ValueError, TypeError: as :func:`task_totals`.

    Example::

        task = classification(10)
        batches = batch_split(dataset.test, 500)._asdict()
        metrics = jax.jit(lambda p: evaluate_task(task, model.apply, p,
                                                  batches))(params)
        metrics["accuracy"]
    """
    return _finalize(task, task_totals(task, forward, params, batches))


# --------------------------------------------------------------------------
# Shared pieces.
# --------------------------------------------------------------------------


def softmax_cross_entropy(logits: Array, labels: Array) -> Array:
    """Per-example softmax cross-entropy with integer labels.

    Args:
        logits: ``[..., num_classes]``.
        labels: ``int[...]``.

    Returns:
        ``float[...]``: ``-log softmax(logits)[label]``, in nats.
    """
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]


def soft_cross_entropy(outputs: Array, teacher_outputs: Array,
                       temperature: float) -> Array:
    """Per-position ``T^2 * KL(softmax(teacher / T) || softmax(outputs / T))``.

    Args:
        outputs: ``[..., C]`` student logits.
        teacher_outputs: ``[..., C]`` teacher logits.
        temperature: softmax temperature ``T`` (the ``T^2`` factor keeps
            gradient sizes comparable across temperatures, Hinton et al.).

    Returns:
        ``float[...]`` divergences, zero where student and teacher agree.
    """
    teacher = jax.nn.log_softmax(teacher_outputs / temperature, axis=-1)
    student = jax.nn.log_softmax(outputs / temperature, axis=-1)
    divergence = jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)
    return divergence * temperature ** 2


def _soft_sums(valid: Array, outputs: Array, teacher_outputs: Array,
               temperature: float) -> tuple[Array, Array]:
    divergence = soft_cross_entropy(outputs, teacher_outputs, temperature)
    return (jnp.where(valid, divergence, 0.0).sum(dtype=jnp.float32),
            valid.sum(dtype=jnp.int32))


def _check_count(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (
            value < minimum):
        raise ValueError(f"{name}: must be an int of at least {minimum}, got "
                         f"{value!r}")
    return int(value)


def _check_integer(value: Any, name: str) -> None:
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        dtype = np.asarray(value).dtype
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{name}: must hold integers, got dtype {dtype}")


# --------------------------------------------------------------------------
# Classification.
# --------------------------------------------------------------------------


def classification(num_classes: int) -> Task:
    """Classification with softmax cross-entropy, any input shape.

    Batch: ``{"images": [B, ...], "labels": int[B], "mask": [B]}``; the model
    reads ``batch["images"]`` (of any shape and dtype) and returns logits
    ``[B, num_classes]``. An example counts where ``mask > 0`` (a boolean
    mask, or weights of which those above zero count).

    Metrics (the numbers :func:`recovjax.evaluate.evaluate` computes):
    ``accuracy``, ``loss`` (mean cross-entropy, nats), ``per_class_accuracy``
    (``[num_classes]``, NaN for a class without examples), and the totals
    ``correct``, ``count``, ``class_correct``, ``class_count`` (``int32``)
    and ``loss_sum`` (``float32``).

    Args:
        num_classes: the number of classes (static).

    Returns:
        The :class:`Task`; the same object for the same ``num_classes``.

    Raises:
        ValueError: if ``num_classes`` is not a positive int. Evaluating,
            for a model whose logits are not ``num_classes`` wide
            (``"num_classes: ..."``) and, for concrete batches, labels
            outside ``[0, num_classes)`` (``"batch['labels']: ..."``).
        TypeError: (evaluating) for labels that are not integers.
    """
    return _classification(_check_count(num_classes, "num_classes"))


@functools.lru_cache(maxsize=None)
def _classification(num_classes: int) -> Task:
    # Cached, so that jit keyed on the task compiles once per num_classes.

    def validate(batch: Batch) -> None:
        labels, mask = batch["labels"], batch["mask"]
        _check_integer(labels, "batch['labels']")
        if np.shape(mask) != np.shape(labels):
            raise ValueError(f"batch['mask']: must have the shape of "
                             f"batch['labels'] {np.shape(labels)}, got "
                             f"{np.shape(mask)}")
        leading = np.shape(batch["images"])[:np.ndim(labels)]
        if leading != np.shape(labels):
            raise ValueError(f"batch['images']: its leading axes {leading} "
                             f"do not match batch['labels'] "
                             f"{np.shape(labels)}")
        _checks.check_labels(labels, num_classes, "batch['labels']",
                             where=mask)

    def terms(logits: Array, batch: Batch):
        labels = batch["labels"]
        # Static: checked while tracing, at no cost.
        _checks.check_logits_shape(logits.shape, num_classes)
        if logits.shape[:-1] != labels.shape:
            raise ValueError(f"num_classes: the model gives logits of shape "
                             f"{logits.shape} for labels of shape "
                             f"{labels.shape}; expected "
                             f"{labels.shape + (num_classes,)}")
        valid = batch["mask"] > 0
        loss = jnp.where(valid, softmax_cross_entropy(logits, labels), 0.0)
        hit = valid & (jnp.argmax(logits, axis=-1) == labels)
        return valid, loss, hit

    def loss(logits: Array, batch: Batch) -> tuple[Array, Array]:
        valid, losses, _ = terms(logits, batch)
        return losses.sum(dtype=jnp.float32), valid.sum(dtype=jnp.int32)

    def batch_totals(logits: Array, batch: Batch) -> Totals:
        valid, losses, hit = terms(logits, batch)
        in_class = valid[:, None] & (batch["labels"][:, None]
                                     == jnp.arange(num_classes))
        return {"correct": hit.sum(dtype=jnp.int32),
                "loss_sum": losses.sum(dtype=jnp.float32),
                "class_correct": (in_class & hit[:, None]).sum(
                    0, dtype=jnp.int32),
                "class_count": in_class.sum(0, dtype=jnp.int32)}

    def finalize(totals: Totals) -> dict[str, Array]:
        # As evaluate: an example whose label is out of range belongs to no
        # class and is not counted.
        count = totals["class_count"].sum()
        denominator = count.astype(jnp.float32)
        return {"accuracy": totals["correct"] / denominator,
                "loss": totals["loss_sum"] / denominator,
                "per_class_accuracy": totals["class_correct"]
                / totals["class_count"].astype(jnp.float32),
                "count": count, **totals}

    def distill(logits, teacher_logits, batch, temperature):
        valid, _, _ = terms(logits, batch)
        return _soft_sums(valid, logits, teacher_logits, temperature)

    return Task(name="classification", keys=("images", "labels", "mask"),
                inputs=lambda batch: batch["images"], loss=loss,
                batch_totals=batch_totals, finalize=finalize,
                validate=validate, distill=distill, headline="accuracy",
                higher_is_better=True)


# --------------------------------------------------------------------------
# Language modelling.
# --------------------------------------------------------------------------


def language_model(vocab_size: int, *, pad_id: int | None = None) -> Task:
    """Next-token prediction with softmax cross-entropy.

    Batch: ``{"tokens": int[B, T + 1], "mask": [B, T + 1]}``. The model
    reads ``tokens[:, :-1]`` and returns logits ``[B, T, vocab_size]``; the
    targets are ``tokens[:, 1:]``, and target ``t`` counts where
    ``mask[:, t + 1] > 0``. With ``pad_id``, ``"mask"`` may be left out,
    and targets equal to ``pad_id`` never count (``mask`` and
    ``tokens != pad_id`` when both are given).

    Metrics: ``loss`` (mean cross-entropy per target token, nats),
    ``perplexity`` (``exp(loss)``), ``accuracy`` (fraction of target tokens
    whose argmax logit is the token), and the totals ``count`` and
    ``correct`` (``int32``) and ``loss_sum`` (``float32``). With no target
    token, the fractions are NaN.

    Args:
        vocab_size: the number of token ids (static); every token, masked or
            not, must lie in ``[0, vocab_size)`` since the model reads them
            all (a pad id outside the embedding table would give NaN).
        pad_id: optional padding id in ``[0, vocab_size)``.

    Returns:
        The :class:`Task`; the same object for the same arguments.

    Raises:
        ValueError: for a ``vocab_size`` below 1 or a ``pad_id`` outside
            ``[0, vocab_size)``. Evaluating: for a model whose logits are not
            ``vocab_size`` wide (``"vocab_size: ..."``) and, for concrete
            batches, token ids outside ``[0, vocab_size)``
            (``"batch['tokens']: ..."``) or tokens and mask of other shapes.
        TypeError: (evaluating) for tokens that are not integers.
    """
    vocab_size = _check_count(vocab_size, "vocab_size")
    if pad_id is not None:
        _check_count(pad_id, "pad_id", 0)
        if pad_id >= vocab_size:
            raise ValueError(f"pad_id: must lie in [0, vocab_size={vocab_size}"
                             f"), got {pad_id}")
        pad_id = int(pad_id)
    return _language_model(vocab_size, pad_id)


@functools.lru_cache(maxsize=None)
def _language_model(vocab_size: int, pad_id: int | None) -> Task:

    def validate(batch: Batch) -> None:
        tokens = batch["tokens"]
        _check_integer(tokens, "batch['tokens']")
        if np.ndim(tokens) < 2 or np.shape(tokens)[-1] < 2:
            raise ValueError("batch['tokens']: must be [batch, T + 1] with "
                             f"T >= 1, got shape {np.shape(tokens)}")
        if "mask" in batch and np.shape(batch["mask"]) != np.shape(tokens):
            raise ValueError(f"batch['mask']: must have the shape of "
                             f"batch['tokens'] {np.shape(tokens)}, got "
                             f"{np.shape(batch['mask'])}")
        # Every token, masked or not: the model reads them all.
        _checks.check_labels(tokens, vocab_size, "batch['tokens']")

    def terms(logits: Array, batch: Batch):
        tokens = batch["tokens"]
        targets = tokens[:, 1:]
        expected = targets.shape + (vocab_size,)
        if tuple(logits.shape) != expected:
            raise ValueError(
                f"vocab_size: the model gives logits of shape {logits.shape} "
                f"for inputs of shape {tuple(tokens[:, :-1].shape)}, expected "
                f"{expected} (one distribution over {vocab_size} tokens per "
                "input position)")
        valid = (batch["mask"][:, 1:] > 0 if "mask" in batch else
                 jnp.ones(targets.shape, bool))
        if pad_id is not None:
            valid = valid & (targets != pad_id)
        loss = jnp.where(valid, softmax_cross_entropy(logits, targets), 0.0)
        hit = valid & (jnp.argmax(logits, axis=-1) == targets)
        return valid, loss, hit

    def loss(logits: Array, batch: Batch) -> tuple[Array, Array]:
        valid, losses, _ = terms(logits, batch)
        return losses.sum(dtype=jnp.float32), valid.sum(dtype=jnp.int32)

    def batch_totals(logits: Array, batch: Batch) -> Totals:
        valid, losses, hit = terms(logits, batch)
        return {"loss_sum": losses.sum(dtype=jnp.float32),
                "count": valid.sum(dtype=jnp.int32),
                "correct": hit.sum(dtype=jnp.int32)}

    def finalize(totals: Totals) -> dict[str, Array]:
        denominator = totals["count"].astype(jnp.float32)
        loss_value = totals["loss_sum"] / denominator
        return {"loss": loss_value, "perplexity": jnp.exp(loss_value),
                "accuracy": totals["correct"] / denominator, **totals}

    def distill(logits, teacher_logits, batch, temperature):
        valid, _, _ = terms(logits, batch)
        return _soft_sums(valid, logits, teacher_logits, temperature)

    def from_curve(metrics):
        return {"perplexity": jnp.exp(metrics["loss"])}

    keys = ("tokens",) if pad_id is not None else ("tokens", "mask")
    return Task(name="language_model", keys=keys,
                inputs=lambda batch: batch["tokens"][:, :-1], loss=loss,
                batch_totals=batch_totals, finalize=finalize,
                validate=validate, distill=distill, headline="perplexity",
                higher_is_better=False, from_curve=from_curve)


def general_task(model: Any) -> Task | None:
    """A model's task when it is not classification, else ``None``.

    ``None`` stands for the classification path (images and labels, a
    :class:`~recovjax.Batches` of test data); any other task reads batch
    dicts.

    Raises:
        ValueError: for a task string other than ``"classification"``.
        TypeError: for a task that is neither that string nor a
            :class:`Task`.
    """
    task = getattr(model, "task", "classification")
    if isinstance(task, str):
        if task == "classification":
            return None
        raise ValueError(f"model.task: {task!r} is not a task; build the "
                         f"model with task=recovjax.tasks.get_task(...)")
    if not isinstance(task, Task):
        raise TypeError(f"model.task must be 'classification' or a "
                        f"recovjax.tasks.Task, got {type(task).__name__}")
    return None if task.name == "classification" else task


# --------------------------------------------------------------------------
# The registry of names.
# --------------------------------------------------------------------------

_TASKS: dict[str, Callable[..., Task]] = {
    "classification": classification,
    "language_model": language_model,
}


def task_names() -> tuple[str, ...]:
    """Names accepted by :func:`get_task`, in registration order."""
    return tuple(_TASKS)


def register_task(name: str, factory: Callable[..., Task], *,
                  replace: bool = False) -> None:
    """Register a task factory under a name, for configs and :func:`get_task`.

    Args:
        name: the name.
        factory: ``factory(**options) -> Task``.
        replace: allow replacing a registered name.

    Raises:
        ValueError: for an empty name or one already registered (without
            ``replace``).
        TypeError: if ``name`` is not a string or ``factory`` is not
            callable.
    """
    if not isinstance(name, str):
        raise TypeError(f"name: must be a string, got {name!r}")
    if not name:
        raise ValueError("name: must not be empty")
    if not callable(factory):
        raise TypeError(f"factory: must be callable, got {factory!r}")
    if name in _TASKS and not replace:
        raise ValueError(f"name: task {name!r} is already registered; pass "
                         "replace=True to replace it")
    _TASKS[name] = factory


def get_task(name: str, **options: Any) -> Task:
    """Build a registered task by name.

    Args:
        name: one of :func:`task_names`.
        **options: the factory's arguments, e.g. ``num_classes=10`` for
            ``"classification"``, ``vocab_size=257, pad_id=256`` for
            ``"language_model"``.

    Returns:
        The :class:`Task`.

    Raises:
        ValueError: for an unknown name (the message lists the valid ones)
            or what the factory rejects.
        TypeError: for an option the factory does not take (the message
            lists those it does), or a factory that returns no Task.
    """
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; valid names: "
                         f"{', '.join(task_names())}")
    factory = _TASKS[name]
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # e.g. some builtins
        signature = None
    if signature is not None:
        try:
            signature.bind(**options)
        except TypeError as error:
            accepted = [p.name for p in signature.parameters.values()
                        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
            raise TypeError(f"task {name!r}: {error}; its options: "
                            f"{', '.join(accepted) or 'none'}") from None
    task = factory(**options)
    if not isinstance(task, Task):
        raise TypeError(f"task {name!r}: its factory returned "
                        f"{type(task).__name__}, not a recovjax.tasks.Task")
    return task
