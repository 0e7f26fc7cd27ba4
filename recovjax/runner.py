"""One runner for points: the sweep and every recovery strategy use it.

A *point* is one unit of work: a damaged model to evaluate or to recover,
described by a small pytree (its key, its amount, flags). The runner maps a
pure per-point function over many points in one compiled program::

    run = map_points(lambda point, shared: evaluate_point(point, *shared),
                     group_size=1)
    outputs = run(points, shared)   # leading axis: one entry per point

The points are sharded over a one-axis :class:`jax.sharding.Mesh` of
``devices`` (axis :data:`AXIS`) with ``shard_map``; on each device
``lax.map`` walks over groups of ``group_size`` points, and a group runs
under ``vmap``. ``shared`` (the pretrained parameters, the data, a
checkpoint's values) is replicated, never copied per point, so what a
program holds at once is one group's damaged copies, optimiser states and
temporaries: memory does not grow with the number of points. A stack of
points that is not a multiple of ``group_size * len(devices)`` is padded by
repeating its last point, and the padding is dropped from the outputs.

Every point is computed on one device as it would be alone, so results do
not depend on the device count beyond how XLA compiles a reduction for
it. :func:`group_size_for` picks a group size from XLA's own memory
analysis of the compiled per-point program.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "points"
"""Name of the mesh axis the points are sharded over."""

MODEL_AXIS = "model"
"""Name of the mesh axis the shared arrays (parameters) are sharded over."""

MIN_SHARDED_SIZE = 1 << 14
"""Entries a shared leaf needs before the default rule shards it."""

PartitionRule = Callable[[str, Any], Any]
"""``rule(path, leaf) -> PartitionSpec | None`` for a shared leaf (``None``:
the default, :func:`default_partition`)."""

DEFAULT_CHUNK_POINTS = 100
"""Most points per device in one call of a compiled program.

A longer stack runs as several calls of one program over balanced chunks.
XLA:CPU's resident memory grows with the trip count of a long loop within
one execution (``benchmarks/bench_memory.py``: a 1,000-point recovery in
one call peaked 25 % above a 100-point one; in chunks it stays flat), and
equal chunks keep one compiled shape whatever the number of points.
"""

CALL_GROWTH_BYTES = 64 << 20
"""What one call's points may add to XLA:CPU's memory in use.

Within one execution of a long ``lax.map`` XLA:CPU's memory in use grows by
about one byte per shared entry per point, and all of it is released when
the call returns (measured with ``malloc_trim`` between samples: 10.6 MB a
point for a ResNet-18 recovery, 11 M parameters; 1.3 MB for an MLP of
1.3 M). :func:`auto_chunk_points` sizes calls so that this stays below
64 MiB, so the peak does not grow with the number of points.
"""

PointFn = Callable[[Any, Any], Any]
"""``fn(point, shared) -> outputs`` for one point (traceable)."""


def devices_of(devices: Sequence[Any] | None) -> tuple[Any, ...]:
    """The devices to run on (default: every device JAX shows).

    Raises:
        ValueError: for an empty sequence.
    """
    found = tuple(jax.devices() if devices is None else devices)
    if not found:
        raise ValueError("devices is empty")
    return found


def _count(points: Any) -> int:
    leaves = jax.tree.leaves(points)
    if not leaves:
        raise ValueError("points: the pytree of points has no arrays")
    sizes = {int(np.shape(leaf)[0]) if np.ndim(leaf) else -1
             for leaf in leaves}
    if len(sizes) != 1 or -1 in sizes:
        raise ValueError("points: every array needs the same leading "
                         f"points axis, got leading sizes {sorted(sizes)}")
    return sizes.pop()


def pad_points(points: Any, size: int) -> Any:
    """``points`` padded to ``size`` entries by repeating the last one."""
    count = _count(points)
    if count == size:
        return points
    return jax.tree.map(lambda x: jnp.concatenate(
        [x] + [x[-1:]] * (size - count)), points)


def place(tree: Any, sharding: NamedSharding) -> Any:
    """Put host or device arrays on ``sharding`` as global arrays.

    ``make_array_from_callback`` builds global arrays, so the same code
    serves one process and several (multi-host) processes.
    """
    def put(leaf):
        if leaf is None:
            return None
        if jax.dtypes.issubdtype(getattr(leaf, "dtype", None),
                                 jax.dtypes.prng_key):
            # Typed keys travel as their raw data: device_put cannot target
            # devices of other processes, make_array_from_callback can.
            data = put(jax.random.key_data(leaf))
            return jax.random.wrap_key_data(data,
                                            impl=jax.random.key_impl(leaf))
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding,
                                            lambda index: host[index])

    return jax.tree.map(put, tree)


def fetch(tree: Any) -> Any:
    """Host (numpy) copies of a tree of arrays, from every process.

    With several processes each holds only its own points' outputs; they
    are gathered (``process_allgather``), so every process gets the whole
    tree.
    """
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        def gather(leaf):
            if np.size(leaf) == 0:  # nothing to gather; keep the shape
                return np.zeros(np.shape(leaf), leaf.dtype)
            return np.asarray(multihost_utils.process_allgather(
                leaf, tiled=True))

        return jax.tree.map(gather, tree)
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _global(tree: Any, sharding: NamedSharding) -> Any:
    """``tree`` as global arrays on ``sharding`` when several processes
    run (leaves already global stay); unchanged in one process."""
    if jax.process_count() == 1:
        return tree
    return jax.tree.map(
        lambda leaf: leaf if isinstance(leaf, jax.Array) and not (
            leaf.is_fully_addressable) else place(leaf, sharding), tree)


def default_partition(leaf: Any, model_devices: int) -> PartitionSpec:
    """The default rule: a leaf of at least :data:`MIN_SHARDED_SIZE`
    entries is split along its largest axis that ``model_devices``
    divides; smaller leaves (and those without such an axis) are
    replicated."""
    shape = tuple(np.shape(leaf))
    if model_devices == 1 or int(np.prod(shape)) < MIN_SHARDED_SIZE:
        return PartitionSpec()
    axes = [axis for axis in np.argsort(shape, kind="stable")[::-1]
            if shape[axis] % model_devices == 0]
    if not axes:
        return PartitionSpec()
    spec = [None] * len(shape)
    spec[int(axes[0])] = MODEL_AXIS
    return PartitionSpec(*spec)


def make_mesh(devices: tuple[Any, ...], model_devices: int = 1) -> Mesh:
    """The runner's mesh: points x model (``model_devices`` per point).

    Raises:
        ValueError: ``model_devices`` not a positive divisor of the devices.
    """
    if isinstance(model_devices, bool) or not isinstance(
            model_devices, (int, np.integer)) or model_devices < 1 or (
            len(devices) % model_devices):
        raise ValueError(f"model_devices must be a positive divisor of the "
                         f"{len(devices)} devices, got {model_devices!r}")
    if model_devices == 1:
        return Mesh(np.asarray(devices), (AXIS,))
    return Mesh(np.asarray(devices).reshape(-1, int(model_devices)),
                (AXIS, MODEL_AXIS))


def shardings(devices: tuple[Any, ...]) -> tuple[NamedSharding,
                                                   NamedSharding]:
    """``(points sharded over devices, replicated)`` on the runner's mesh."""
    mesh = Mesh(np.asarray(devices), (AXIS,))
    return (NamedSharding(mesh, PartitionSpec(AXIS)),
            NamedSharding(mesh, PartitionSpec()))


class PointProgram:
    """A per-point function compiled over stacks of points.

    Attributes:
        group_size: points per ``vmap`` group.
        devices: the devices the points are sharded over.
        unit: ``group_size * len(devices)``: stacks are padded to multiples.
    """

    def __init__(self, fn: PointFn, *, group_size: int,
                 devices: tuple[Any, ...],
                 chunk_points: int | None = None,
                 model_devices: int = 1,
                 partition: PartitionRule | None = None):
        for name, value in (("group_size", group_size),
                            ("chunk_points", chunk_points)):
            if value is None and name == "chunk_points":
                continue
            if isinstance(value, bool) or not isinstance(
                    value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive int, got "
                                 f"{value!r}")
        self.group_size = int(group_size)
        self.chunk_points = None if chunk_points is None else int(
            chunk_points)
        self.devices = devices
        self.mesh = make_mesh(devices, model_devices)
        self.model_devices = int(model_devices)
        self.partition = partition
        self.points_devices = len(devices) // self.model_devices
        self.unit = self.group_size * self.points_devices
        group = jax.vmap(fn, in_axes=(0, None))
        size = self.group_size

        def local(points, shared):
            count = _count(points) // size
            grouped = jax.tree.map(
                lambda x: x.reshape((count, size) + x.shape[1:]), points)
            outputs = jax.lax.map(lambda xs: group(xs, shared), grouped)
            return jax.tree.map(
                lambda x: x.reshape((count * size,) + x.shape[2:]), outputs)

        self.sharded = NamedSharding(self.mesh, PartitionSpec(AXIS))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        # With a model axis only the points axis is manual: XLA partitions
        # each point's computation over the model axis (GSPMD).
        manual = {} if self.model_devices == 1 else {"axis_names": {AXIS}}
        self._compiled = jax.jit(jax.shard_map(
            local, mesh=self.mesh,
            in_specs=(PartitionSpec(AXIS), PartitionSpec()),
            out_specs=PartitionSpec(AXIS),
            # Loop state made from constants (zeros, iotas) is not written
            # for shard_map's replication types, and nothing here
            # communicates across the points axis.
            check_vma=False, **manual))

    def shared_sharding(self, shared: Any) -> Any:
        """The sharding of every shared leaf: replicated, or split over the
        model axis by :attr:`partition` (default
        :func:`default_partition`)."""
        if self.model_devices == 1:
            return jax.tree.map(lambda _: self.replicated, shared)
        flat, treedef = jax.tree_util.tree_flatten_with_path(shared)
        specs = []
        for path, leaf in flat:
            spec = None if self.partition is None else self.partition(
                jax.tree_util.keystr(path), leaf)
            specs.append(NamedSharding(self.mesh, spec if spec is not None
                                       else default_partition(
                                           leaf, self.model_devices)))
        return jax.tree_util.tree_unflatten(treedef, specs)

    def place_shared(self, shared: Any) -> Any:
        """``shared`` on its shardings (:meth:`shared_sharding`)."""
        if self.model_devices == 1 and jax.process_count() == 1:
            return shared
        targets = self.shared_sharding(shared)

        def put(leaf, sharding):
            if isinstance(leaf, jax.Array) and (
                    leaf.sharding == sharding or not leaf.is_fully_addressable):
                return leaf
            if jax.process_count() == 1 and not jax.dtypes.issubdtype(
                    getattr(leaf, "dtype", None), jax.dtypes.prng_key):
                return jax.device_put(leaf, sharding)
            return place(leaf, sharding)

        return jax.tree.map(put, shared, targets)

    def padded_size(self, count: int, shared: Any = None) -> int:
        """The stack size one call pads ``count`` points to."""
        return self.chunk_size(count, shared) if count > 0 else self.unit

    def dispatch(self, points: Any, shared: Any, size: int | None = None
                 ) -> tuple[Any, int]:
        """Start one call; ``(outputs with padding, number of points)``.

        The points are padded to ``size`` (default :meth:`padded_size`).
        Nothing is read back, so a caller can dispatch the next stack
        before it reads this one.
        """
        count = _count(points)
        points = pad_points(points, size or self.padded_size(count, shared))
        return self._compiled(_global(points, self.sharded),
                              self.place_shared(shared)), count

    def points_per_call(self, shared: Any = None) -> int:
        """Most points per device in one call: ``chunk_points``, or by
        default :func:`auto_chunk_points` of ``shared``."""
        if self.chunk_points is not None:
            return self.chunk_points
        return auto_chunk_points(shared)

    def chunk_size(self, count: int, shared: Any = None) -> int:
        """Points per call for a stack of ``count``: at most
        :meth:`points_per_call` per device, in as few balanced chunks as
        that allows, a multiple of :attr:`unit`."""
        per_device = -(-int(count) // self.points_devices)
        chunks = -(-per_device // self.points_per_call(shared))
        size = -(-int(count) // chunks)
        return -(-size // self.unit) * self.unit

    def __call__(self, points: Any, shared: Any) -> Any:
        """The outputs of every point (leading axis: the points).

        A stack longer than :meth:`chunk_size` runs as several calls of one
        program. Each call is dispatched before the previous one is waited
        for, and no more than those two are in flight: queuing every call
        at once would let their working sets pile up.
        """
        count = _count(points)
        size = self.chunk_size(count, shared)
        parts = []
        for start in range(0, count, size):
            chunk = jax.tree.map(lambda x: x[start:start + size], points)
            parts.append(self.dispatch(chunk, shared, size))
            if len(parts) > 1:
                jax.block_until_ready(parts[-2][0])
        outputs = [jax.tree.map(lambda x, n=n: x[:n], out)
                   if _count(out) != n else out for out, n in parts]
        if len(outputs) == 1:
            return outputs[0]
        return jax.tree.map(lambda *xs: jnp.concatenate(xs), *outputs)

    def lower(self, points: Any, shared: Any):
        """Lower the program for these points (for cost analysis)."""
        count = _count(points)
        return self._compiled.lower(
            pad_points(points, self.padded_size(count, shared)), shared)


def auto_chunk_points(shared: Any) -> int:
    """Points per device and call that keep one call's growth of memory in
    use below :data:`CALL_GROWTH_BYTES` (about a byte per shared entry per
    point), at most :data:`DEFAULT_CHUNK_POINTS`."""
    entries = sum(int(np.prod(np.shape(leaf)))
                  for leaf in jax.tree.leaves(shared)
                  if hasattr(leaf, "dtype") and not jax.dtypes.issubdtype(
                      leaf.dtype, jax.dtypes.prng_key))
    return max(1, min(DEFAULT_CHUNK_POINTS,
                      CALL_GROWTH_BYTES // max(1, entries)))


@functools.lru_cache(maxsize=64)
def _program(fn: PointFn, group_size: int, devices: tuple,
             chunk_points: int | None, model_devices: int,
             partition: PartitionRule | None) -> PointProgram:
    return PointProgram(fn, group_size=group_size, devices=devices,
                        chunk_points=chunk_points,
                        model_devices=model_devices, partition=partition)


def _positive_int(value: Any) -> Any:
    # ints pass as ints (cache keys); anything else reaches the checks.
    return int(value) if isinstance(value, (int, np.integer)) and not (
        isinstance(value, bool)) else value


def map_points(fn: PointFn, *, group_size: int = 1,
               devices: Sequence[Any] | None = None,
               chunk_points: int | None = None,
               model_devices: int = 1,
               partition: PartitionRule | None = None) -> PointProgram:
    """The runner for ``fn``: one compiled program over stacks of points.

    Programs are cached by ``(fn, group_size, devices)``, so calling
    :func:`map_points` again with the same function reuses the compiled
    program.

    Args:
        fn: ``fn(point, shared) -> outputs``, pure and traceable: ``point``
            is one point's slice of the stacked points, ``shared`` what all
            points read (replicated).
        group_size: points per ``vmap`` group (static).
        devices: devices to shard the points over; default every device.
        chunk_points: most points per device in one call; default
            :func:`auto_chunk_points` of the shared inputs (at most
            :data:`DEFAULT_CHUNK_POINTS`, fewer for large models).
        model_devices: devices each point's computation is split over
            (the mesh is ``len(devices) / model_devices`` points x
            ``model_devices`` model); the shared arrays are sharded over
            the model axis by ``partition``.
        partition: ``rule(path, leaf) -> PartitionSpec | None`` for the
            shared leaves (``None`` and a rule's ``None``:
            :func:`default_partition`, the largest axis of large leaves).

    Returns:
        A :class:`PointProgram`: ``program(points, shared) -> outputs``.

    Raises:
        ValueError: for a non-positive ``group_size`` or ``chunk_points``,
            or no devices.
    """
    return _program(fn, _positive_int(group_size), devices_of(devices),
                    None if chunk_points is None else
                    _positive_int(chunk_points),
                    _positive_int(model_devices), partition)


class MemoryEstimate(NamedTuple):
    """What one point's program needs, from XLA or a fallback.

    Attributes:
        point_bytes: temporary bytes of one point's program (damaged
            copies, optimiser state, activations).
        source: ``"memory_analysis"`` or ``"fallback"`` (the backend gave
            no analysis: three copies of the shared arrays' floats and the
            outputs).
    """

    point_bytes: int
    source: str


def _tree_bytes(tree: Any) -> int:
    return sum(int(np.prod(np.shape(leaf))) * np.dtype(leaf.dtype).itemsize
               for leaf in jax.tree.leaves(tree)
               if hasattr(leaf, "dtype") and not jax.dtypes.issubdtype(
                   leaf.dtype, jax.dtypes.prng_key))


def point_memory(fn: PointFn, point: Any, shared: Any) -> MemoryEstimate:
    """Memory of one point's program, from ``compiled.memory_analysis()``.

    Args:
        fn: the per-point function.
        point: one point (arrays or shape structs, no points axis).
        shared: the shared inputs (arrays or shape structs).

    Returns:
        :class:`MemoryEstimate`.
    """
    try:
        analysis = jax.jit(fn).lower(point, shared).compile(
        ).memory_analysis()
    except Exception:  # a backend without the analysis may raise anything
        analysis = None
    temp = getattr(analysis, "temp_size_in_bytes", None)
    if temp is not None and temp >= 0:
        output = getattr(analysis, "output_size_in_bytes", 0) or 0
        return MemoryEstimate(int(temp) + int(output), "memory_analysis")
    outputs = jax.eval_shape(fn, point, shared)
    return MemoryEstimate(3 * _tree_bytes(shared) + _tree_bytes(outputs),
                          "fallback")


def group_size_for(fn: PointFn, point: Any, shared: Any, *, wanted: int,
                   memory_budget_bytes: int) -> tuple[int, MemoryEstimate]:
    """The largest group size up to ``wanted`` whose working set fits.

    One point's program is compiled and measured (:func:`point_memory`)
    only when ``wanted > 1``: a group of one always runs.

    Returns:
        ``(group size, estimate)``; the estimate is ``None`` when nothing
        was measured.
    """
    if wanted <= 1:
        return 1, None
    estimate = point_memory(fn, point, shared)
    fit = int(memory_budget_bytes) // max(1, estimate.point_bytes)
    return max(1, min(int(wanted), fit)), estimate


__all__ = ["AXIS", "CALL_GROWTH_BYTES", "DEFAULT_CHUNK_POINTS",
           "MODEL_AXIS", "MemoryEstimate", "PointProgram",
           "auto_chunk_points", "default_partition", "devices_of", "fetch",
           "group_size_for", "make_mesh", "map_points", "pad_points",
           "place", "point_memory", "shardings"]
