"""Which leaves of a parameter tree a damage operator touches.

A *scope* is settled when an operator is built (it is a static choice) and
resolved against the tree's leaf paths when the operator is traced:

* ``"all"``: every leaf, weights and biases alike (the seed's behaviour).
* ``"weights"``: the leaves named ``kernel``: the connection weights of
  dense, convolution and attention layers. Biases, LayerNorm scales and
  offsets, and the ViT's ``position`` table are left out: they are additive
  offsets or normalisation parameters rather than connections, and pruning
  and fault-injection studies conventionally leave them alone.
* any other string, or a compiled :class:`re.Pattern`: a regular expression
  searched (:func:`re.search`, not a full match) in each leaf's
  ``'/'``-joined path, e.g. ``"conv1"`` (both ``conv1/kernel`` and
  ``conv1/bias``), ``"^fc[12]/kernel$"`` or ``"attention/(query|key)"``.

Paths are written by :func:`recovjax.checkpoints.leaf_path`, the same
strings checkpoints and reports use.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Union

import jax

from recovjax._types import Params
from recovjax.checkpoints import leaf_path

ScopeLike = Union[str, "re.Pattern[str]", "Scope"]
"""What operators accept as ``scope``: ``"all"``, ``"weights"``, a regex."""

ALL = "all"
WEIGHTS = "weights"
WEIGHT_LEAF_NAMES = ("kernel",)
"""Last path components that ``"weights"`` selects."""


@dataclasses.dataclass(frozen=True)
class Scope:
    """A resolved scope: a keyword or a compiled pattern.

    Attributes:
        kind: ``"all"``, ``"weights"`` or ``"pattern"``.
        pattern: the compiled regex for ``kind == "pattern"``.
    """

    kind: str
    pattern: "re.Pattern[str] | None" = None

    def matches(self, path: str) -> bool:
        """Whether the leaf at ``path`` (``'a/b/kernel'``) is in scope."""
        if self.kind == ALL:
            return True
        if self.kind == WEIGHTS:
            return path.rsplit("/", 1)[-1] in WEIGHT_LEAF_NAMES
        return self.pattern.search(path) is not None

    def describe(self) -> str:
        """Human-readable form, as it was written."""
        if self.kind == "pattern":
            return f"pattern '{self.pattern.pattern}'"
        return repr(self.kind)


def parse_scope(scope: ScopeLike) -> Scope:
    """Resolve what an operator was given as ``scope``.

    Args:
        scope: ``"all"``, ``"weights"``, a regex string or a compiled
            pattern (or an already parsed :class:`Scope`).

    Returns:
        The :class:`Scope`.

    Raises:
        ValueError: if a regex does not compile (the message names it).
        TypeError: for anything that is not a string or pattern.
    """
    if isinstance(scope, Scope):
        return scope
    if isinstance(scope, re.Pattern):
        return Scope("pattern", scope)
    if not isinstance(scope, str):
        raise TypeError(f"scope must be 'all', 'weights' or a regex string, "
                        f"got {type(scope).__name__}")
    if scope in (ALL, WEIGHTS):
        return Scope(scope)
    if not scope:
        raise ValueError("scope must be 'all', 'weights' or a non-empty "
                         "regex, got ''")
    try:
        return Scope("pattern", re.compile(scope))
    except re.error as error:
        raise ValueError(f"scope pattern '{scope}' is not a valid regular "
                         f"expression: {error}") from error


def leaf_paths(params: Params) -> list[str]:
    """The ``'/'``-joined path of every leaf, in flattening order."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return [leaf_path(path) for path, _ in flat]


def select_leaves(params: Params, scope: ScopeLike) -> tuple[bool, ...]:
    """Which leaves (in flattening order) a scope selects.

    Args:
        params: the parameter tree (arrays, tracers or shape structs).
        scope: see :func:`parse_scope`.

    Returns:
        One flag per leaf.

    Raises:
        ValueError: if the scope selects no leaf (the message names the
            scope and lists the tree's paths).
    """
    resolved = parse_scope(scope)
    paths = leaf_paths(params)
    chosen = tuple(resolved.matches(path) for path in paths)
    if not any(chosen):
        shown = ", ".join(paths[:20]) + (" ..." if len(paths) > 20 else "")
        raise ValueError(f"scope {resolved.describe()} matches no leaf of "
                         f"the parameters (leaves: {shown or 'none'})")
    return chosen
