"""Run directories: resolved config, persisted parts, atomic writes, resume.

A run directory holds ``config.yaml`` (the resolved config), ``parts/``
(one JSON file per finished unit of work, written atomically as it
finishes), ``results.csv`` / ``results.json``, ``env.json``, plots and
``report.md``. Re-running the same config on the same directory resumes from
the parts; a different config is refused unless the caller forces a fresh
start, so results are never mixed.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import shutil
import subprocess
from typing import Any

from recovjax._io import atomic_write  # noqa: F401  (re-exported)

CONFIG_FILE = "config.yaml"
PARTS_DIR = "parts"


class RunConflictError(ValueError):
    """The run directory belongs to a different config."""


class RunDirectory:
    """A directory that holds one experiment's config, parts and results.

    Args:
        path: the run directory (created if absent).
        config_text: the resolved config as YAML text.
        force: start over if the directory holds another config.

    Raises:
        RunConflictError: the directory was made with a different config and
            ``force`` is false.
    """

    def __init__(self, path: os.PathLike[str] | str, config_text: str, *,
                 force: bool = False):
        self.path = pathlib.Path(path)
        config_file = self.path / CONFIG_FILE
        if config_file.is_file():
            if config_file.read_text() != config_text:
                if not force:
                    raise RunConflictError(
                        f"{self.path}: this run directory was made with a "
                        "different config; results would be mixed. Use "
                        "another directory, or --force to start over "
                        "(deletes its results)")
                self._clear()
        elif self.path.exists() and any(self.path.iterdir()) and not force:
            raise RunConflictError(
                f"{self.path}: exists, is not empty and is not a recovjax run "
                "directory; use another directory or --force")
        elif force and self.path.exists():
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


def environment() -> dict[str, Any]:
    """Versions, devices and the git commit of the recovjax source, if any."""
    import jax

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
    return {
        "versions": library_versions(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "backend": jax.default_backend(),
        "devices": [str(device) for device in devices],
        "device_kind": devices[0].device_kind,
        "process_count": jax.process_count(),
        "git_commit": commit,
    }
