"""Which formulation of each backend-sensitive mechanism recovjax traces.

Three mechanisms have two formulations each: one tuned for XLA:CPU, and the
plain JAX one that XLA compiles well everywhere else.

=========  =====================================  ===========================
mechanism  XLA:CPU formulation                    plain JAX formulation
=========  =====================================  ===========================
``conv``   ``"banded"``: banded-GEMM convolutions ``"lax"``:
           (:func:`recovjax.models.layers.        ``lax.conv_general_dilated``,
           conv2d`, and ``conv_relu_pool_stack``  differentiated by JAX
           differentiated batch-minor)            (``jax.jvp`` works too)
``random`` ``"hash"``: a keyed counter hash,      ``"jax"``: ``jax.random.
           distinct draws                         bits`` (threefry) of
           (:func:`recovjax.damage.select.        ``fold_in(key, stream)``
           draw_bits`)
``select`` ``"radix"``: exact counts by bitwise   ``"sort"``: one sort per
           threshold search over 128-entry rows   group, the threshold read
           (:func:`recovjax.damage.select.        at the count, ties settled
           select_smallest`)                      by a running count
=========  =====================================  ===========================

Why the CPU formulations exist is explained where they live: XLA:CPU runs
the small LeNet-style convolutions several times faster as a banded GEMM
than as ``lax.conv``; it compiles threefry slowly (about half a second per
call site) and runs it several times slower than a hash of a counter; and
it sorts and reduces along the minor axis slowly, so counting passes over
``uint16`` rows beat a sort.

None of those reasons holds on a GPU or TPU, where the plain formulations
are the natural choice, and so they are the defaults there: convolutions go
to the vendor's convolution kernels (under ``vmap`` over a stack of models
a grouped convolution, which cuDNN runs natively) instead of multiplying a
band's zeros (``(tile + kw - 1) / kw`` times the FLOPs) after copying
shifted slabs; threefry is cheap integer arithmetic that a GPU compiles and
runs quickly, and it is JAX's own reference generator; a sort is a library
primitive (a radix sort on GPUs) where the bitwise search needs 32 full
passes with a reduction each. These accelerator defaults are a reasoned
starting point, to be confirmed by ``benchmarks/gpu.py``, which times the
same sweep under each choice on the device.

The choice is *static*: it is read in Python while a function is traced,
so a compiled program holds one formulation. It is resolved per mechanism,
first match wins:

1. :func:`set_formulations` (or the :func:`use_formulations` context);
2. the environment variable :data:`ENV_VAR`, e.g.
   ``RECOVJAX_FORMULATIONS=conv=lax,random=jax``, read once, when the
   choice is first needed;
3. the default for ``jax.default_backend()``: :data:`CPU_DEFAULTS` on
   ``"cpu"``, :data:`ACCELERATOR_DEFAULTS` on any other backend. Where
   JAX has no other backend to start (no ``jax_platforms`` naming one, no
   accelerator plugin or ``libtpu`` installed) this is decided without
   starting JAX, so building a model leaves
   :func:`recovjax.use_all_cores` free to set the CPU device count.

When the resolved choice changes, every JAX compilation cache is cleared
(:func:`jax.clear_caches`), so no jitted function, however it is cached
(the runner's programs, a user's ``jax.jit``), can reuse a program traced
under the previous choice; the next call retraces. Switch once per process
where possible; programs compiled ahead of time (``.lower().compile()``)
are the caller's to rebuild.

What each choice changes:

* ``select``: not which entries are chosen. Both formulations choose
  exactly ``floor(n * ratio)`` entries per group, the smallest values with
  ties to the lowest position, so the masks are the same bit for bit
  (values computed next to them, such as random replacements, may differ
  in their last bit: XLA fuses another program differently).
* ``random``: the draws. Both keep every operator's contract (exact counts
  chosen uniformly without replacement, independent Bernoulli choices at
  the traced rate, uniform and normal values, the same entries chosen by
  every operator for one key), but the entries a key chooses differ
  between ``"hash"`` and ``"jax"``. ``"jax"`` draws may repeat; exact
  selection breaks such ties by position.
* ``conv``: floating-point rounding only (the sums are taken in another
  order).

For one choice, the same key gives byte-identical results.
:func:`describe_formulations` is what each run's ``env.json`` records.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import threading
from typing import Iterator, Mapping, NamedTuple

import jax

ENV_VAR = "RECOVJAX_FORMULATIONS"
"""Environment variable: comma-separated ``mechanism=formulation`` pairs."""


class Formulations(NamedTuple):
    """One formulation per mechanism.

    Attributes:
        conv: ``"banded"`` or ``"lax"``.
        random: ``"hash"`` or ``"jax"``.
        select: ``"radix"`` or ``"sort"``.
    """

    conv: str
    random: str
    select: str


MECHANISMS: Mapping[str, tuple[str, ...]] = {
    "conv": ("banded", "lax"),
    "random": ("hash", "jax"),
    "select": ("radix", "sort"),
}
"""Each mechanism's formulations, the XLA:CPU one first."""

CPU_DEFAULTS = Formulations(conv="banded", random="hash", select="radix")
"""The defaults on ``jax.default_backend() == "cpu"``."""

ACCELERATOR_DEFAULTS = Formulations(conv="lax", random="jax", select="sort")
"""The defaults on every other backend (GPU, TPU)."""

SET_BY_CALL = "set_formulations"
"""Source of a choice made by :func:`set_formulations`."""

_lock = threading.RLock()
_overrides: dict[str, str] = {}
_environment: dict[str, str] | None = None
_backend: str | None = None


def defaults_for(backend: str) -> Formulations:
    """The default formulations of a JAX backend (``"cpu"``, ``"gpu"``...).

    Args:
        backend: a platform name as :func:`jax.default_backend` returns it.

    Returns:
        :data:`CPU_DEFAULTS` for ``"cpu"``, else :data:`ACCELERATOR_DEFAULTS`.
    """
    return CPU_DEFAULTS if backend == "cpu" else ACCELERATOR_DEFAULTS


def check_formulation(mechanism: str, name: str, *, where: str = "") -> str:
    """Check that ``name`` is a formulation of ``mechanism``.

    Args:
        mechanism: ``"conv"``, ``"random"`` or ``"select"``.
        name: the formulation's name.
        where: what to name in the error (``"RECOVJAX_FORMULATIONS: "``).

    Returns:
        ``name``.

    Raises:
        ValueError: for an unknown mechanism or formulation, naming it and
            listing the valid ones.
    """
    if mechanism not in MECHANISMS:
        raise ValueError(f"{where}unknown mechanism {mechanism!r}; valid: "
                         f"{', '.join(MECHANISMS)}")
    valid = MECHANISMS[mechanism]
    if name not in valid:
        raise ValueError(f"{where}{mechanism}: unknown formulation "
                         f"{name!r}; valid: {', '.join(valid)}")
    return name


def parse_formulations(text: str, *, name: str = ENV_VAR) -> dict[str, str]:
    """Parse ``"conv=lax,random=jax"`` into ``{"conv": "lax", ...}``.

    Spaces around names are ignored; an empty text is no choice at all.

    Args:
        text: comma-separated ``mechanism=formulation`` pairs.
        name: where the text came from, for the error messages.

    Returns:
        The choices, one per named mechanism.

    Raises:
        ValueError: for a pair without ``=``, an unknown mechanism or
            formulation, or a mechanism named twice; the message starts
            with ``name`` and quotes the bad pair.
    """
    choices: dict[str, str] = {}
    for pair in text.split(","):
        if not pair.strip():
            continue
        mechanism, equals, value = (part.strip() for part in
                                    pair.partition("="))
        if not equals:
            raise ValueError(f"{name}: expected mechanism=formulation "
                             f"pairs separated by commas, got {pair!r}")
        check_formulation(mechanism, value, where=f"{name}: ")
        if mechanism in choices:
            raise ValueError(f"{name}: {mechanism} is given twice")
        choices[mechanism] = value
    return choices


def _environment_choices() -> dict[str, str]:
    global _environment
    if _environment is None:
        _environment = parse_formulations(os.environ.get(ENV_VAR, ""))
    return _environment


def _accelerator_possible() -> bool:
    # Whether JAX could start on something other than the CPU, decided
    # without starting it: resolving the choice while models are built
    # must not fix JAX's CPU device count before use_all_cores() runs.
    platforms = jax.config.jax_platforms
    if platforms:
        return platforms.split(",")[0].strip().lower() != "cpu"
    if any(os.environ.get(name) for name in ("PJRT_NAMES_AND_LIBRARY_PATHS",
                                             "TPU_LIBRARY_PATH")):
        return True
    if any(importlib.util.find_spec(name) is not None
           for name in ("libtpu", "jax_plugins")):
        return True
    return bool(importlib.metadata.entry_points(group="jax_plugins"))


def _backend_name() -> str:
    global _backend
    if _backend is None:
        from jax._src import xla_bridge
        if xla_bridge.backends_are_initialized() or _accelerator_possible():
            _backend = jax.default_backend()
        else:
            _backend = "cpu"  # the only backend this installation has
    return _backend


def _resolve() -> tuple[Formulations, dict[str, str]]:
    defaults = defaults_for(_backend_name())
    environment = _environment_choices()
    chosen, sources = {}, {}
    for mechanism in MECHANISMS:
        if mechanism in _overrides:
            chosen[mechanism] = _overrides[mechanism]
            sources[mechanism] = SET_BY_CALL
        elif mechanism in environment:
            chosen[mechanism] = environment[mechanism]
            sources[mechanism] = ENV_VAR
        else:
            chosen[mechanism] = getattr(defaults, mechanism)
            sources[mechanism] = f"default for {_backend_name()}"
    return Formulations(**chosen), sources


def current_formulations() -> Formulations:
    """The formulations traced now (see the module docstring's order).

    Raises:
        ValueError: if :data:`ENV_VAR` holds an invalid choice (on the
            first call that reads it).
    """
    with _lock:
        return _resolve()[0]


def describe_formulations() -> dict[str, object]:
    """The resolved choice and where each part came from (JSON-ready).

    Returns:
        ``{"conv": ..., "random": ..., "select": ..., "sources": {mechanism:
        "set_formulations" | "RECOVJAX_FORMULATIONS" | "default for
        <backend>"}, "backend": <jax.default_backend()>}``.
    """
    with _lock:
        resolved, sources = _resolve()
        return {**resolved._asdict(), "sources": sources,
                "backend": _backend_name()}


def _apply(overrides: dict[str, str]) -> Formulations:
    # Install new overrides; clear JAX's caches if the choice changed, so
    # that nothing traced under the previous choice can be reused.
    global _overrides
    before = _resolve()[0]
    _overrides = dict(overrides)
    after = _resolve()[0]
    if after != before:
        jax.clear_caches()
    return after


def set_formulations(*, conv: str | None = None, random: str | None = None,
                     select: str | None = None) -> Formulations:
    """Choose formulations for this process, over the environment and the
    backend's defaults.

    Arguments left ``None`` keep their current choice. A change clears
    JAX's compilation caches (see the module docstring).

    Args:
        conv: ``"banded"`` or ``"lax"``.
        random: ``"hash"`` or ``"jax"``.
        select: ``"radix"`` or ``"sort"``.

    Returns:
        The formulations now in effect.

    Raises:
        ValueError: for an unknown formulation (naming the argument).

    Example::

        recovjax.set_formulations(conv="lax")   # lax.conv from now on
    """
    given = {"conv": conv, "random": random, "select": select}
    with _lock:
        overrides = dict(_overrides)
        for mechanism, name in given.items():
            if name is not None:
                overrides[mechanism] = check_formulation(mechanism, name)
        return _apply(overrides)


def reset_formulations(*mechanisms: str) -> Formulations:
    """Drop the choices :func:`set_formulations` made (all, or these).

    Args:
        mechanisms: ``"conv"``, ``"random"``, ``"select"``; none: all.

    Returns:
        The formulations now in effect (the environment's or the
        backend's).

    Raises:
        ValueError: for an unknown mechanism.
    """
    with _lock:
        for mechanism in mechanisms:
            if mechanism not in MECHANISMS:
                raise ValueError(f"unknown mechanism {mechanism!r}; valid: "
                                 f"{', '.join(MECHANISMS)}")
        overrides = {} if not mechanisms else {
            key: value for key, value in _overrides.items()
            if key not in mechanisms}
        return _apply(overrides)


@contextlib.contextmanager
def use_formulations(*, conv: str | None = None, random: str | None = None,
                     select: str | None = None) -> Iterator[Formulations]:
    """:func:`set_formulations` inside a ``with`` block, restored after.

    The choice is process-wide while the block runs (not per thread).

    Yields:
        The formulations in effect inside the block.

    Raises:
        ValueError: for an unknown formulation (naming the argument).

    Example::

        with recovjax.use_formulations(conv="lax", select="sort"):
            result = recovjax.sweep(...)
    """
    with _lock:
        previous = dict(_overrides)
        chosen = set_formulations(conv=conv, random=random, select=select)
    try:
        yield chosen
    finally:
        with _lock:
            _apply(previous)


__all__ = [
    "ACCELERATOR_DEFAULTS",
    "CPU_DEFAULTS",
    "ENV_VAR",
    "MECHANISMS",
    "SET_BY_CALL",
    "Formulations",
    "check_formulation",
    "current_formulations",
    "defaults_for",
    "describe_formulations",
    "parse_formulations",
    "reset_formulations",
    "set_formulations",
    "use_formulations",
]
