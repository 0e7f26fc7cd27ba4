"""Atomic writes, clear read errors and moving damaged caches aside."""

from __future__ import annotations

import datetime
import os
import pathlib
import tempfile


def _umask() -> int:
    # /proc/self/status reports the umask without changing it; the portable
    # fallback sets and restores it, briefly, which is not thread-safe.
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def atomic_write(path: os.PathLike[str] | str, data: bytes | str
                 ) -> pathlib.Path:
    """Write ``data`` to ``path`` through a temporary file and a rename.

    Readers see either the old file or the whole new one, never a partial
    write, even if the process is killed midway. Text is written as UTF-8
    exactly as given (no newline translation). The file gets the mode an
    ordinary ``open(path, "w")`` would give it, ``0o666 & ~umask`` (0644
    under the usual umask 022), not the private 0600 of a temporary file.

    Returns:
        ``path`` as a :class:`pathlib.Path`.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    handle, temporary = tempfile.mkstemp(dir=path.parent,
                                         prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(handle, 0o666 & ~_umask())
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


def move_aside(path: os.PathLike[str] | str, reason: str = "corrupt"
               ) -> pathlib.Path:
    """Rename ``path`` to ``<path>.<reason>-<UTC timestamp>`` next to it.

    Nothing is deleted: the damaged file or directory stays on disk for
    inspection, out of the way of whatever rebuilds it. A second move in
    the same second gets a ``.1``, ``.2``, ... suffix.

    Args:
        path: the file or directory to move.
        reason: the word in the new name.

    Returns:
        The new path.

    Raises:
        FileNotFoundError: if ``path`` does not exist (e.g. another process
            moved it first).
    """
    path = pathlib.Path(path)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime(
        "%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.{reason}-{stamp}")
    count = 0
    while target.exists():
        count += 1
        target = path.with_name(f"{path.name}.{reason}-{stamp}.{count}")
    path.rename(target)
    return target


def read_text(path: os.PathLike[str] | str) -> str:
    """A UTF-8 text file's contents, or an error naming the file and line.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if the bytes are not UTF-8 text (e.g. a binary file);
            the message names the path, the line and the byte offset.
    """
    path = pathlib.Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ValueError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x} "
            f"at offset {error.start}); is it a binary file?") from None


def read_json_file(path: os.PathLike[str] | str) -> tuple[str, object]:
    """A JSON file's text and parsed value, or an error naming file and line.

    ``NaN``/``Infinity`` tokens are accepted, as :func:`json.loads` does.

    Returns:
        ``(text, value)``.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if the file is not UTF-8 text or not valid JSON; the
            message is ``<path>:<line>:<column>: not valid JSON (<reason>)``.
    """
    import json
    text = read_text(path)
    try:
        return text, json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno}:{error.colno}: not valid "
                         f"JSON ({error.msg})") from None
