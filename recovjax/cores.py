"""Every CPU core busy: one JAX CPU device per core.

XLA:CPU runs most kernels of one program on one thread, and JAX shows a
single CPU device unless asked for more. recovjax runs different points on
different devices (:mod:`recovjax.runner`), so one device per core keeps
every core busy. The CLI calls :func:`use_all_cores` before JAX starts; a
Python user calls it once, before the first computation::

    import recovjax
    recovjax.use_all_cores()      # before anything runs on JAX
    result = recovjax.sweep(...)  # the points spread over every core

Results do not depend on the device count (each point is computed on one
device, as alone), so this changes speed only.
"""

from __future__ import annotations

import os
import re

import jax

ENV = "JAX_NUM_CPU_DEVICES"
"""The environment variable that sets JAX's CPU device count."""

_FORCE_FLAG = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, else the count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def _requested() -> int | None:
    """A device count the user asked for in the environment, if any."""
    value = os.environ.get(ENV)
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            raise ValueError(f"{ENV}: must be a positive integer, got "
                             f"{value!r}") from None
    forced = _FORCE_FLAG.search(os.environ.get("XLA_FLAGS", ""))
    return int(forced.group(1)) if forced else None


def use_all_cores(count: int | None = None) -> int:
    """Show one JAX CPU device per core (call before JAX's first use).

    An explicit request in the environment (``JAX_NUM_CPU_DEVICES``, or
    ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``) wins over
    the core count.

    Args:
        count: devices to ask for; default: the environment's request, else
            :func:`available_cores`.

    Returns:
        The number of CPU devices JAX shows (or will show).

    Raises:
        ValueError: for a ``count`` below 1 or a malformed
            ``JAX_NUM_CPU_DEVICES``.
        RuntimeError: if JAX has already started with another number of CPU
            devices (the count cannot change afterwards; call this first).
    """
    if count is not None and (isinstance(count, bool) or not isinstance(
            count, int) or count < 1):
        raise ValueError(f"count: must be a positive int, got {count!r}")
    forced = _FORCE_FLAG.search(os.environ.get("XLA_FLAGS", ""))
    if count is None and forced and not os.environ.get(ENV):
        # XLA's own flag sets the count; JAX refuses a second setting.
        return int(forced.group(1))
    wanted = count if count is not None else (_requested()
                                              or available_cores())
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():
        shown = len(jax.devices("cpu"))
        if shown != wanted and count is not None:
            raise RuntimeError(
                f"count: JAX has started with {shown} CPU device(s) and "
                f"cannot change to {wanted}; call use_all_cores() before "
                "anything runs on JAX")
        return shown
    jax.config.update("jax_num_cpu_devices", wanted)
    return wanted


__all__ = ["ENV", "available_cores", "use_all_cores"]
