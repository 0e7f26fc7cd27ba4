"""Where recovjax keeps prepared data and pretrained checkpoints."""

from __future__ import annotations

import os
import pathlib

DATA_DIR_ENV = "RECOVJAX_DATA_DIR"
CACHE_DIR_ENV = "RECOVJAX_CACHE_DIR"


def cache_dir() -> pathlib.Path:
    """The user cache root: ``$RECOVJAX_CACHE_DIR`` or ``$XDG_CACHE_HOME/recovjax``."""
    explicit = os.environ.get(CACHE_DIR_ENV)
    if explicit:
        return pathlib.Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return pathlib.Path(base).expanduser() / "recovjax"


def data_dir(override: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """Directory for prepared TFDS datasets built by recovjax.

    Resolution order: the ``override`` argument, ``$RECOVJAX_DATA_DIR``, then
    ``<cache_dir()>/datasets``.
    """
    if override is not None:
        return pathlib.Path(override).expanduser()
    explicit = os.environ.get(DATA_DIR_ENV)
    if explicit:
        return pathlib.Path(explicit).expanduser()
    return cache_dir() / "datasets"


def zoo_dir(override: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """Directory of the pretrained-checkpoint zoo (``<cache_dir()>/zoo``)."""
    if override is not None:
        return pathlib.Path(override).expanduser()
    return cache_dir() / "zoo"
