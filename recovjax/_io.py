"""Atomic file writes shared by results tables, run directories and reports."""

from __future__ import annotations

import os
import pathlib
import tempfile


def atomic_write(path: os.PathLike[str] | str, data: bytes | str
                 ) -> pathlib.Path:
    """Write ``data`` to ``path`` through a temporary file and a rename.

    Readers see either the old file or the whole new one, never a partial
    write, even if the process is killed midway. Text is written as UTF-8
    exactly as given (no newline translation).

    Returns:
        ``path`` as a :class:`pathlib.Path`.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    handle, temporary = tempfile.mkstemp(dir=path.parent,
                                         prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(payload)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return path
