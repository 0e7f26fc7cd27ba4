"""``import recovjax`` freezes the import's objects out of the cyclic GC."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from recovjax import _gc

PROBE = ("import gc, recovjax; "
         "print(gc.get_freeze_count(), recovjax.sweep is not None)")


def _frozen_after_import(env_value: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if k != _gc.FREEZE_ENV}
    if env_value is not None:
        env[_gc.FREEZE_ENV] = env_value
    done = subprocess.run([sys.executable, "-c", PROBE], env=env,
                          capture_output=True, text=True, check=True)
    count, imported = done.stdout.split()
    assert imported == "True"
    return int(count)


def test_import_freezes_its_objects():
    # Far more than the interpreter's own objects: JAX, Flax, Orbax, TFDS.
    assert _frozen_after_import(None) > 100_000


@pytest.mark.parametrize("value", ["0", "off"])
def test_environment_turns_the_freeze_off(value):
    assert _frozen_after_import(value) == 0


def test_freeze_reports_what_it_did(monkeypatch):
    monkeypatch.setenv(_gc.FREEZE_ENV, "no")
    assert _gc.freeze_import_objects() is False
