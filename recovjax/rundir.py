"""Run directories: resolved config, persisted parts, atomic writes, resume.

A run directory holds ``config.yaml`` (the resolved config), ``parts/``
(one JSON file per finished unit of work, written atomically as it
finishes), ``results.csv`` / ``results.json``, ``env.json``, plots and
``report.md``. Re-running the same config on the same directory resumes from
the parts; a different config is refused unless the caller forces a fresh
start, so results are never mixed.

:func:`check_run_directory` answers "could this directory be claimed?"
without writing anything that stays behind, so a caller can refuse a bad
directory (a file, under a file, not writable, another config) before any
work; :class:`RunDirectory` runs the same check, then claims the directory
by writing ``config.yaml``.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import re
import shutil
import subprocess
import tempfile
from typing import Any

from recovjax._io import atomic_write  # noqa: F401  (re-exported)

CONFIG_FILE = "config.yaml"
PARTS_DIR = "parts"


class RunConflictError(ValueError):
    """The run directory belongs to a different config."""


class RunDirectoryError(ValueError):
    """The run directory cannot be used: a file, under a file, not writable."""


def _reason(error: OSError) -> str:
    return error.strerror or type(error).__name__


def check_writable_directory(path: os.PathLike[str] | str) -> None:
    """Check that ``path`` is, or could be created as, a writable directory.

    Writability is tested by creating (and deleting) a probe file in
    ``path`` or in its nearest existing parent, because permission bits do
    not tell: root may write through them, and a read-only mount refuses
    everyone. Nothing is left behind.

    Raises:
        RunDirectoryError: ``path`` is not a directory, lies under a file, or
            its directory is not writable (read-only filesystem, permission);
            the message names the path and the reason.
    """
    path = pathlib.Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise RunDirectoryError(f"{path}: exists and is not a directory")
        existing = path
        while not existing.exists():
            if existing.parent == existing:
                break
            existing = existing.parent
    except OSError as error:  # e.g. a name too long for the filesystem
        raise RunDirectoryError(f"{path}: cannot be used: "
                                f"{_reason(error)}") from None
    if existing.exists() and not existing.is_dir():
        raise RunDirectoryError(f"{path}: cannot be created, {existing} is "
                                "a file, not a directory")
    try:
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".recovjax-",
                                         suffix=".probe")
    except OSError as error:
        where = ("" if existing == path else
                 f" (cannot be created in {existing})")
        raise RunDirectoryError(f"{path}: not writable{where}: "
                                f"{_reason(error)}") from None
    os.close(handle)
    os.unlink(probe)


def check_run_directory(path: os.PathLike[str] | str, config_text: str, *,
                        force: bool = False) -> None:
    """Check that :class:`RunDirectory` would accept ``path``; write nothing.

    Args:
        path: the run directory (need not exist).
        config_text: the resolved config as YAML text.
        force: whether a directory with another config may be cleared.

    Raises:
        RunDirectoryError: see :func:`check_writable_directory`; also for an
            unreadable ``config.yaml``.
        RunConflictError: the directory holds another config, or is a
            non-empty directory that is not a run directory, and ``force``
            is false.
    """
    path = pathlib.Path(path)
    check_writable_directory(path)
    if force or not path.is_dir():
        return
    config_file = path / CONFIG_FILE
    if config_file.is_file():
        try:
            saved = config_file.read_text()
        except (OSError, UnicodeDecodeError) as error:
            raise RunDirectoryError(
                f"{config_file}: cannot be read: "
                f"{_reason(error) if isinstance(error, OSError) else error}"
            ) from None
        if saved != config_text:
            raise RunConflictError(
                f"{path}: this run directory was made with a "
                "different config; results would be mixed. Use "
                "another directory, or --force to start over "
                "(deletes its results)")
    elif any(path.iterdir()):
        raise RunConflictError(
            f"{path}: exists, is not empty and is not a recovjax run "
            "directory; use another directory or --force")


class RunDirectory:
    """A directory that holds one experiment's config, parts and results.

    Args:
        path: the run directory (created if absent).
        config_text: the resolved config as YAML text.
        force: start over if the directory holds another config.

    Raises:
        RunConflictError: the directory was made with a different config and
            ``force`` is false.
        RunDirectoryError: the directory cannot be used (see
            :func:`check_run_directory`).
    """

    def __init__(self, path: os.PathLike[str] | str, config_text: str, *,
                 force: bool = False):
        self.path = pathlib.Path(path)
        check_run_directory(self.path, config_text, force=force)
        config_file = self.path / CONFIG_FILE
        if force and self.path.is_dir() and not (
                config_file.is_file()
                and config_file.read_text() == config_text):
            self._clear()
        self.path.mkdir(parents=True, exist_ok=True)
        if not config_file.is_file():
            atomic_write(config_file, config_text)

    def _clear(self) -> None:
        for child in self.path.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()

    def part_file(self, name: str) -> pathlib.Path:
        return self.path / PARTS_DIR / f"{name}.json"

    def has_part(self, name: str) -> bool:
        """Whether the unit of work ``name`` finished in an earlier run."""
        return self.part_file(name).is_file()

    def read_part(self, name: str) -> Any:
        return json.loads(self.part_file(name).read_text())

    def write_part(self, name: str, value: Any) -> None:
        """Persist a finished unit of work (atomic)."""
        atomic_write(self.part_file(name),
                     json.dumps(value, sort_keys=True, allow_nan=True))

    def write(self, name: str, data: bytes | str) -> pathlib.Path:
        """Atomically write a file inside the run directory."""
        target = self.path / name
        atomic_write(target, data)
        return target


LOCK_FILE = "requirements.lock"
"""The pinned, tested versions (pip constraints) at the source tree's top."""

# Installed by the virtual environment itself (pip freeze leaves them out
# too); the lock pins them only for its own installs.
_INSTALLER_TOOLS = frozenset({"pip", "setuptools", "wheel"})


def _canonical_name(name: str) -> str:
    # PEP 503: case, "-", "_" and "." do not distinguish distributions.
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_distributions() -> dict[str, str]:
    """Every installed distribution's name and version (importlib.metadata).

    Returns:
        ``{name: version}``, sorted by canonical name; a distribution
        installed twice on the path counts once, as the import system would
        find it.
    """
    import importlib.metadata
    found: dict[str, tuple[str, str]] = {}
    for distribution in importlib.metadata.distributions():
        name = distribution.metadata["Name"]
        if name:
            found.setdefault(_canonical_name(name),
                             (name, distribution.version))
    return dict(found[key] for key in sorted(found))


def read_lock(path: os.PathLike[str] | str) -> dict[str, str]:
    """The ``name==version`` pins of a lock file, by canonical name.

    Args:
        path: a pip requirements/constraints file of exact pins.

    Returns:
        ``{canonical name: version}``.

    Raises:
        ValueError: a line that is not a comment or ``name==version``; the
            message names the file and the line.
    """
    pins = {}
    for number, line in enumerate(pathlib.Path(path).read_text().splitlines(),
                                  start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*(\S+)",
                             text)
        if match is None:
            raise ValueError(f"{path}:{number}: not an exact pin "
                             f"'name==version': {line!r}")
        pins[_canonical_name(match[1])] = match[2]
    return pins


def lock_status(installed: dict[str, str],
                path: os.PathLike[str] | str) -> dict[str, Any] | None:
    """How the installed distributions compare with a lock file.

    A distribution matches when the lock pins it at its version (a local
    label such as torch's ``+cpu`` aside). Pins of what is not installed
    (an extra left out, such as ``bench``) are no mismatch; pip, setuptools
    and wheel, which come with the virtual environment, are not compared.

    Args:
        installed: ``{name: version}``, e.g. :func:`installed_distributions`.
        path: the lock file.

    Returns:
        ``{"file", "matches", "differences"}`` with ``differences`` mapping
        each mismatched name to ``{"installed", "locked"}`` (``locked`` is
        ``None`` when the lock does not name it); ``None`` when the file does
        not exist (recovjax installed from a wheel, not a source tree).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        return None
    try:
        locked = read_lock(path)
    except (OSError, ValueError) as error:
        return {"file": str(path), "matches": False, "error": str(error),
                "differences": {}}
    differences = {}
    for name, version in installed.items():
        key = _canonical_name(name)
        if key in _INSTALLER_TOOLS or key == "recovjax":
            continue
        pinned = locked.get(key)
        if pinned != version.split("+", 1)[0]:
            differences[name] = {"installed": version, "locked": pinned}
    return {"file": str(path), "matches": not differences,
            "differences": differences}


def _cpu_model() -> str:
    # XLA:CPU compiles for this CPU's SIMD width, so the last bits of float
    # results follow it; platform.processor() is often empty on Linux.
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """What produced a run: versions, devices, CPU, git commit, installs.

    Returns:
        A JSON-ready dict. ``distributions`` lists every installed
        distribution and its version; ``lock`` compares them with the
        source tree's ``requirements.lock`` (see :func:`lock_status`;
        ``None`` outside a source tree); ``cpu`` and ``xla_flags`` name
        what XLA compiled for; ``formulations`` the convolution, random
        and selection formulations traced and where each choice came from
        (:func:`recovjax.formulations.describe_formulations`).
    """
    import jax

    from recovjax.formulations import describe_formulations
    from recovjax.pretrain import library_versions
    devices = jax.devices()
    commit = None
    source = pathlib.Path(__file__).resolve().parent.parent
    if (source / ".git").exists():
        try:
            commit = subprocess.run(
                ["git", "-C", str(source), "rev-parse", "HEAD"],
                capture_output=True, text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            commit = None
    distributions = installed_distributions()
    return {
        "versions": library_versions(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "backend": jax.default_backend(),
        "devices": [str(device) for device in devices],
        "device_kind": devices[0].device_kind,
        "formulations": describe_formulations(),
        "process_count": jax.process_count(),
        "git_commit": commit,
        "distributions": distributions,
        "lock": lock_status(distributions, source / LOCK_FILE),
    }
