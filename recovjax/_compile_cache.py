"""JAX's persistent compilation cache, set up once for repeated runs.

Compilation dominates short sweeps on CPU: a LeNet-5 sweep compiles for a
few seconds and then runs for about as long. With the persistent cache a
second process that builds the same program (same model, damage kind,
shapes, jax version and flags) loads the executable from disk instead.

The cache lives in ``<cache_dir()>/xla`` (``$RECOVJAX_CACHE_DIR`` or
``~/.cache/recovjax``), or in the directory given explicitly. The
environment variable ``RECOVJAX_COMPILATION_CACHE`` overrides both for every
entry point that calls :func:`enable_compilation_cache` (the sweep, the
CLI): ``0`` (or ``false``/``off``/``no``) turns the cache off, a path moves
it there.
"""

from __future__ import annotations

import os
import pathlib

import jax
from jax.experimental.compilation_cache import compilation_cache

from recovjax import _paths

CACHE_ENV = "RECOVJAX_COMPILATION_CACHE"
"""Environment variable: ``0``/``false``/``off``/``no`` disables the cache;
any other non-empty value is the cache directory."""

_OFF = ("0", "false", "off", "no")


def compilation_cache_disabled() -> bool:
    """Whether ``$RECOVJAX_COMPILATION_CACHE`` turns the cache off."""
    return os.environ.get(CACHE_ENV, "").strip().lower() in _OFF


def enable_compilation_cache(path: os.PathLike[str] | str | None = None
                             ) -> pathlib.Path | None:
    """Point JAX's persistent compilation cache at a directory.

    Every compiled program is written there, however quick it was to
    compile: the thresholds are lowered to zero because the small CPU
    programs of a sweep compile in seconds, below JAX's defaults, yet those
    seconds are most of a short run. Calling it again with the same path is
    harmless; a different path moves the cache for programs compiled from
    then on.

    Args:
        path: the cache directory; ``None`` uses
            ``$RECOVJAX_COMPILATION_CACHE`` if it names a directory, else
            ``<cache_dir()>/xla``.

    Returns:
        The directory in use, or ``None`` when the cache is disabled by
        ``$RECOVJAX_COMPILATION_CACHE``.

    Raises:
        OSError: if the directory cannot be created.
    """
    if compilation_cache_disabled():
        return None
    if path is None:
        path = os.environ.get(CACHE_ENV, "").strip() or (
            _paths.cache_dir() / "xla")
    directory = pathlib.Path(path).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    if (jax.config.jax_enable_compilation_cache and
            jax.config.jax_compilation_cache_dir == str(directory) and
            jax.config.jax_persistent_cache_min_compile_time_secs == 0.0):
        return directory  # Already in use: keep the open cache.
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # JAX opens its cache once per process; without a reset, a new
    # directory (or re-enabling) would be ignored after the first compile.
    compilation_cache.reset_cache()
    return directory


def disable_compilation_cache() -> None:
    """Stop using the persistent cache in this process (e.g. to time compiles).

    In-memory caches of already compiled functions are not affected; use
    :func:`jax.clear_caches` for a cold start.
    """
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
