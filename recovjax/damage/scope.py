"""Which leaves of a parameter tree a damage operator touches.

A *scope* is a static choice, settled when an operator is built
(:func:`parse_scope`), and resolved against the parameters (and, where it
needs them, their leaf metadata) when the operator is traced. It is one of:

* ``"all"``: every leaf (the seed's behaviour).
* a *role keyword*: the leaves whose :class:`~recovjax.models.info.LeafInfo`
  role is one of a set, whatever the leaves are called:

  ========================  ===========================================
  ``"weights"``             role ``kernel``: the connection weights of
                            dense, convolution and attention layers
                            (flax ``kernel``, equinox ``weight``, ...)
  ``"biases"``              role ``bias``
  ``"norms"``               roles ``norm_scale`` and ``norm_offset``
  ``"embeddings"``          role ``embedding``
  ``"role:R1,R2,..."``      the listed roles (any of
                            :data:`~recovjax.models.info.ROLES`)
  ========================  ===========================================

  Roles come from the model's leaf metadata, so a role scope needs the
  operator to be called with ``info=model.info``; without it, or when a
  leaf's role is not known, the call raises
  :class:`~recovjax.models.info.InfoError` saying how to provide it. The
  keywords take precedence over regexes; write ``re.compile("weights")``
  for the regex.
* any other string, or a compiled :class:`re.Pattern`: a regular expression
  searched (:func:`re.search`, not a full match) in each leaf's
  ``'/'``-joined path, e.g. ``"conv1"`` (both ``conv1/kernel`` and
  ``conv1/bias``), ``"^fc[12]/kernel$"`` or ``"attention/(query|key)"``.
* a predicate ``predicate(path, leaf, info) -> bool``: ``path`` is the
  leaf's ``'/'``-joined path, ``leaf`` a :class:`jax.ShapeDtypeStruct` with
  the leaf's shape and dtype (a scope is structural: it never depends on
  values), ``info`` its :class:`LeafInfo` or ``None`` when the operator got
  no ``info``. It runs on the host while tracing and must return a Python
  (or NumPy) bool.
* a *label tree*, as for optax's ``masked``: a pytree of bools with the
  structure of the parameters, or a prefix of it (``{"encoder": True,
  "head": False}`` labels every leaf under each key); ``True`` is in scope.
  ``None`` is an empty subtree, as everywhere in JAX, not ``False``.

Per-leaf damage amounts (a number or ``None`` per leaf or subtree) are
prefix trees too; :func:`spread_prefix` matches one against the parameters
by path, in nested or flat (path-keyed) form.

Paths are written by :func:`recovjax.checkpoints.leaf_path`, the same
strings checkpoints, reports and the leaf metadata use. A resolved
:class:`Scope` is hashable (a predicate compares by identity, a label tree
by its structure and flags), so it can be a static argument of ``jit``.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Union

import jax
import numpy as np

from recovjax._types import Params
from recovjax.checkpoints import leaf_path
from recovjax.models.info import (BIAS, EMBEDDING, KERNEL, NORM_OFFSET,
                                  NORM_SCALE, ROLES, InfoError, LeafInfo,
                                  info_by_path, require_roles)

Predicate = Callable[[str, Any, "LeafInfo | None"], bool]
"""``predicate(path, leaf, info) -> bool``, evaluated while tracing."""

ScopeLike = Union[str, "re.Pattern[str]", Predicate, Any, "Scope"]
"""What operators accept as ``scope``: ``"all"``, a role keyword, a regex,
a predicate, a label tree of bools or a :class:`Scope`."""

ALL = "all"
WEIGHTS = "weights"
ROLE_PREFIX = "role:"
ROLE_KEYWORDS: Mapping[str, tuple[str, ...]] = {
    WEIGHTS: (KERNEL,),
    "biases": (BIAS,),
    "norms": (NORM_SCALE, NORM_OFFSET),
    "embeddings": (EMBEDDING,),
}
"""The role keywords and the roles each selects."""

_KINDS = ("all", "roles", "pattern", "predicate", "labels")
_WHERE_TO_GET_INFO = (
    "call the operator with info=model.info, for a Model from "
    "recovjax.models.from_linen / from_nnx / from_equinox / from_apply (or "
    "build the info with recovjax.models.info.info_tree), or use a regex "
    "scope on the leaf paths such as 'kernel$'")


def _shown(paths: list[str]) -> str:
    return ", ".join(paths[:20]) + (" ..." if len(paths) > 20 else "")


class Scope:
    """A resolved scope; build it with :func:`parse_scope`.

    Attributes:
        kind: ``"all"``, ``"roles"``, ``"pattern"``, ``"predicate"`` or
            ``"labels"``.
        text: the keyword or ``role:`` string as written (roles only).
        roles: the roles selected (roles only).
        pattern: the compiled regex (pattern only).
        predicate: the function (predicate only).
        labels: ``(treedef, flags)`` of the label tree (labels only).
    """

    __slots__ = ("kind", "text", "roles", "pattern", "predicate", "labels")

    def __init__(self, kind: str, *, text: str | None = None,
                 roles: tuple[str, ...] = (),
                 pattern: "re.Pattern[str] | None" = None,
                 predicate: Predicate | None = None,
                 labels: tuple[Any, tuple[bool, ...]] | None = None):
        if kind not in _KINDS:
            raise ValueError(f"Scope kind must be one of {_KINDS}, got "
                             f"{kind!r}")
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "text", text)
        object.__setattr__(self, "roles", roles)
        object.__setattr__(self, "pattern", pattern)
        object.__setattr__(self, "predicate", predicate)
        object.__setattr__(self, "labels", labels)

    def __setattr__(self, name, value):
        raise AttributeError("Scope is immutable")

    def _key(self) -> tuple:
        # A predicate compares by identity: user callables need not be
        # hashable, and two different functions are two different scopes.
        return (self.kind, self.text, self.roles, self.pattern,
                id(self.predicate), self.labels)

    def __eq__(self, other) -> bool:
        return isinstance(other, Scope) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"Scope({self.describe()})"

    @property
    def needs_info(self) -> bool:
        """Whether resolving the scope needs the leaves' roles."""
        return self.kind == "roles"

    def describe(self) -> str:
        """Human-readable form, as it was written."""
        if self.kind == "pattern":
            return f"pattern '{self.pattern.pattern}'"
        if self.kind == "roles":
            return repr(self.text)
        if self.kind == "predicate":
            name = getattr(self.predicate, "__qualname__", None) or repr(
                self.predicate)
            return f"predicate {name}"
        if self.kind == "labels":
            return "label tree"
        return repr(self.kind)

    def select(self, params: Params,
               infos: Mapping[str, LeafInfo] | None = None
               ) -> tuple[bool, ...]:
        """Which leaves of ``params`` (in flattening order) are in scope.

        Args:
            params: the parameter tree (arrays, tracers or shape structs).
            infos: ``{path: LeafInfo}`` for every leaf
                (:func:`~recovjax.models.info.info_by_path`), or ``None``.

        Returns:
            One flag per leaf; at least one is ``True``.

        Raises:
            InfoError: for a role scope without ``infos`` or with a leaf of
                unknown role (naming it and how to declare it).
            ValueError: if the scope selects no leaf (naming the scope and
                listing the paths), or a label tree does not match the
                parameters.
            TypeError: if a predicate returns something other than a bool.
        """
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        paths = [leaf_path(path) for path, _ in flat]
        if self.kind == ALL:
            flags = tuple(True for _ in paths)
        elif self.kind == "roles":
            flags = self._select_roles(paths, infos)
        elif self.kind == "pattern":
            flags = tuple(self.pattern.search(path) is not None
                          for path in paths)
        elif self.kind == "predicate":
            flags = tuple(self._ask(path, leaf, infos)
                          for path, (_, leaf) in zip(paths, flat))
        else:
            flags = self._select_labels(params, paths)
        if not any(flags):
            raise ValueError(f"scope {self.describe()} matches no leaf of "
                             f"the parameters (leaves: "
                             f"{_shown(paths) or 'none'})")
        return flags

    def _select_roles(self, paths: list[str],
                      infos: Mapping[str, LeafInfo] | None
                      ) -> tuple[bool, ...]:
        why = f"scope {self.describe()}"
        if infos is None:
            raise InfoError(f"{why} selects leaves by their role and needs "
                            f"the model's leaf metadata, which this call did "
                            f"not get: {_WHERE_TO_GET_INFO}")
        require_roles(infos, paths, why)
        return tuple(infos[path].role in self.roles for path in paths)

    def _ask(self, path: str, leaf: Any,
             infos: Mapping[str, LeafInfo] | None) -> bool:
        info = None if infos is None else infos[path]
        # Always a shape struct, so the answer cannot depend on values,
        # whether the operator is traced or not.
        shape = leaf.shape if hasattr(leaf, "shape") else np.shape(leaf)
        dtype = leaf.dtype if hasattr(leaf, "dtype") else np.result_type(
            leaf)
        answer = self.predicate(path, jax.ShapeDtypeStruct(shape, dtype),
                                info)
        if not isinstance(answer, (bool, np.bool_)):
            raise TypeError(
                f"scope {self.describe()} must return a Python bool, got "
                f"{type(answer).__name__} for leaf {path!r}; it runs on the "
                f"host while tracing, so decide from the path, the info or "
                f"the leaf's shape and dtype, not from its values")
        return bool(answer)

    def _select_labels(self, params: Params, paths: list[str]
                       ) -> tuple[bool, ...]:
        treedef, flags = self.labels
        labels = jax.tree.unflatten(treedef, flags)
        try:
            spread = jax.tree.map(
                lambda flag, subtree: jax.tree.map(lambda _: flag, subtree),
                labels, params)
        except (ValueError, TypeError) as error:
            raise ValueError(
                f"scope label tree does not match the parameters: it must "
                f"have their structure or a prefix of it; "
                f"{_label_mismatch(labels, paths, error)}") from None
        result = tuple(bool(flag) for flag in jax.tree.leaves(spread))
        if len(result) != len(paths):  # pragma: no cover - tree.map ensures
            raise ValueError("scope label tree does not match the "
                             "parameters")
        return result


def _is_prefix(prefix: str, path: str) -> bool:
    return prefix == "" or path == prefix or path.startswith(prefix + "/")


def _label_mismatch(labels: Any, paths: list[str], error: Exception
                    ) -> str:
    # Say which labels or leaves disagree, by path, before JAX's own message.
    label_paths = [leaf_path(path) for path, _ in
                   jax.tree_util.tree_flatten_with_path(labels)[0]]
    extra = [label for label in label_paths
             if not any(_is_prefix(label, path) for path in paths)]
    missing = [path for path in paths
               if not any(_is_prefix(label, path) for label in label_paths)]
    parts = []
    if extra:
        parts.append(f"labels for {_shown(extra)}, which the parameters do "
                     f"not have")
    if missing:
        parts.append(f"no label for {_shown(missing)}")
    if not parts:
        parts.append(f"the labels ({_shown(label_paths)}) and the "
                     f"parameters ({_shown(paths)}) differ in container "
                     f"types: {error}")
    return "; ".join(parts)


def _parse_roles(text: str) -> Scope:
    if text in ROLE_KEYWORDS:
        return Scope("roles", text=text, roles=ROLE_KEYWORDS[text])
    names = tuple(name.strip() for name in text[len(ROLE_PREFIX):].split(","))
    unknown = [name for name in names if name not in ROLES]
    if unknown:
        raise ValueError(f"scope {text!r}: unknown role "
                         f"{', '.join(repr(n) for n in unknown)}; roles are "
                         f"{', '.join(ROLES)}")
    return Scope("roles", text=text, roles=names)


def _parse_labels(scope: Any) -> Scope:
    flat, treedef = jax.tree_util.tree_flatten_with_path(scope)
    for path, flag in flat:
        if not isinstance(flag, (bool, np.bool_)):
            where = leaf_path(path) or "the root"
            raise TypeError(f"scope label tree: the label at {where} is "
                            f"{type(flag).__name__} {flag!r}; labels must be "
                            f"True (in scope) or False, one per leaf or "
                            f"subtree")
    return Scope("labels", labels=(treedef,
                                   tuple(bool(flag) for _, flag in flat)))


def parse_scope(scope: ScopeLike) -> Scope:
    """Resolve what an operator was given as ``scope``.

    Args:
        scope: ``"all"``, a role keyword (``"weights"``, ``"biases"``,
            ``"norms"``, ``"embeddings"``, ``"role:kernel,bias"``), a regex
            string or compiled pattern, a predicate ``(path, leaf, info) ->
            bool``, a label tree of bools, or an already parsed
            :class:`Scope`. See the module docstring.

    Returns:
        The :class:`Scope`.

    Raises:
        ValueError: if a regex does not compile or a ``role:`` scope names
            an unknown role (the message names it).
        TypeError: for anything else, or a label tree with a leaf that is
            not a bool (naming where).
    """
    if isinstance(scope, Scope):
        return scope
    if isinstance(scope, re.Pattern):
        return Scope("pattern", pattern=scope)
    if isinstance(scope, str):
        if scope == ALL:
            return Scope(ALL)
        if scope in ROLE_KEYWORDS or scope.startswith(ROLE_PREFIX):
            return _parse_roles(scope)
        if not scope:
            raise ValueError("scope must be 'all', a role keyword or a "
                             "non-empty regex, got ''")
        try:
            return Scope("pattern", pattern=re.compile(scope))
        except re.error as error:
            raise ValueError(f"scope pattern '{scope}' is not a valid regular "
                             f"expression: {error}") from error
    leaves = jax.tree.leaves(scope)
    is_flag = lambda leaf: isinstance(leaf, (bool, np.bool_))
    # A callable pytree of bools (an equinox module, say) is a label tree.
    if callable(scope) and not any(is_flag(leaf) for leaf in leaves):
        return Scope("predicate", predicate=scope)
    if len(leaves) == 1 and leaves[0] is scope and not is_flag(scope):
        raise TypeError(f"scope must be 'all', a role keyword ('weights', "
                        f"...), a regex string, a predicate (path, leaf, "
                        f"info) -> bool or a label tree of bools, got "
                        f"{type(scope).__name__}")
    return _parse_labels(scope)


def leaf_paths(params: Params) -> list[str]:
    """The ``'/'``-joined path of every leaf, in flattening order."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return [leaf_path(path) for path, _ in flat]


def _ancestors(path: str) -> list[str]:
    # "a/b/c" -> ["a", "a/b", "a/b/c"]
    parts = path.split("/")
    return ["/".join(parts[:end]) for end in range(1, len(parts) + 1)]


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


def _level(path: str) -> str:
    return f"under {path!r}" if path else "at the top level"


def spread_prefix(prefix: Any, params: Params, *, name: str
                  ) -> tuple[tuple[str, Any], ...]:
    """Spread a prefix tree (a value or ``None`` per subtree) over leaves.

    ``prefix`` is read by its ``'/'``-joined paths (:func:`leaf_paths`
    with ``None`` kept as a value): a nested tree such as ``{"conv":
    {"kernel": 0.3, "bias": None}, "dense": 0.1}``, a flat dict keyed by
    paths such as ``{"conv/kernel": 0.3, "conv/bias": None, "dense":
    0.1}``, or a mix. Each entry covers the leaf or the subtree at its path;
    every leaf must be covered by exactly one entry.

    Args:
        prefix: the prefix tree; its leaves (and ``None``) are the values.
        params: the parameter tree (arrays, tracers or shape structs).
        name: the argument's name, for messages (``"ratio"``).

    Returns:
        For every leaf of ``params``, in flattening order, ``(entry, value)``:
        the path of the prefix entry that covers it and its value.

    Raises:
        ValueError: for an entry the parameters do not have (naming it and
            listing the valid keys at that level), an entry below a leaf,
            a leaf that no entry or two entries cover (naming it), or a
            path given twice.
    """
    paths = leaf_paths(params)
    leaves = set(paths)
    children: dict[str, list[str]] = {}
    for path in paths:
        for node in _ancestors(path):
            siblings = children.setdefault(_parent(node), [])
            part = node.rsplit("/", 1)[-1]
            if part not in siblings:
                siblings.append(part)
    nodes = {node for path in paths for node in _ancestors(path)}

    entries: dict[str, Any] = {}
    flat = jax.tree_util.tree_flatten_with_path(
        prefix, is_leaf=lambda value: value is None)[0]
    for key_path, value in flat:
        entry = leaf_path(key_path)
        if entry in entries:
            raise ValueError(f"{name}: the amount tree gives {entry!r} "
                             f"twice; give each path one amount")
        if entry not in nodes:
            known = max((node for node in _ancestors(entry)
                         if node in nodes), key=len, default="")
            if known in leaves:
                raise ValueError(
                    f"{name}: the amount tree has an entry at {entry!r}, "
                    f"below the leaf {known!r} of the parameters; a leaf "
                    f"takes one amount (a number, or None to leave it "
                    f"undamaged)")
            raise ValueError(
                f"{name}: the amount tree has an entry at {entry!r}, which "
                f"the parameters do not have; valid keys {_level(known)}: "
                f"{_shown(children.get(known, []))}")
        entries[entry] = value

    touched = {node for entry in entries for node in _ancestors(entry)}
    result, missing = [], []
    for path in paths:
        cover = [node for node in _ancestors(path) if node in entries]
        if len(cover) > 1:
            raise ValueError(f"{name}: the amount tree gives leaf {path!r} "
                             f"two amounts (at {cover[0]!r} and "
                             f"{cover[1]!r}); give each leaf one")
        if not cover:
            # Name the highest subtree that got no entry at all.
            gap = next(node for node in _ancestors(path)
                       if node not in touched)
            if gap not in missing:
                missing.append(gap)
            continue
        result.append((cover[0], entries[cover[0]]))
    if missing:
        raise ValueError(
            f"{name}: the amount tree has no entry for "
            f"{_shown([repr(m) for m in missing])} (valid keys "
            f"{_level(_parent(missing[0]))}: "
            f"{_shown(children.get(_parent(missing[0]), []))}); give None "
            f"to leave a leaf or subtree undamaged")
    return tuple(result)


def select_leaves(params: Params, scope: ScopeLike, info: Any = None
                  ) -> tuple[bool, ...]:
    """Which leaves (in flattening order) a scope selects.

    Args:
        params: the parameter tree (arrays, tracers or shape structs).
        scope: see :func:`parse_scope`.
        info: the model's leaf metadata, a tree of
            :class:`~recovjax.models.info.LeafInfo` with the structure of
            ``params`` (``model.info``), or ``None``. Role scopes need it.

    Returns:
        One flag per leaf.

    Raises:
        InfoError: for a role scope without ``info``, or a leaf whose role
            is not known (naming it), or ``info`` of another structure.
        ValueError: if the scope selects no leaf (the message names the
            scope and lists the tree's paths), or a label tree does not
            match the parameters.
        TypeError: for an invalid scope, or a predicate returning a
            non-bool.

    Example:
        >>> select_leaves(model.params, "weights", model.info)
        (False, True, False, True)
    """
    resolved = parse_scope(scope)
    infos = None if info is None else info_by_path(params, info)
    return resolved.select(params, infos)
