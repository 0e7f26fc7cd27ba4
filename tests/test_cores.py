"""Every core busy by default: one JAX CPU device per core."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from recovjax.cores import available_cores, use_all_cores


def _devices_after(code: str, **env) -> str:
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}
    environment.update(env)
    done = subprocess.run([sys.executable, "-c", code], env=environment,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


COUNT = "import jax; print(len(jax.devices()))"


def test_use_all_cores_gives_one_device_per_core():
    shown = _devices_after("import recovjax; print(recovjax.use_all_cores())"
                           "; " + COUNT)
    assert shown == str(available_cores())
    # the environment's request wins over the core count
    assert _devices_after("import recovjax; recovjax.use_all_cores(); "
                          + COUNT, JAX_NUM_CPU_DEVICES="3") == "3"
    assert _devices_after("import recovjax; recovjax.use_all_cores(); "
                          + COUNT, XLA_FLAGS="--xla_force_host_platform_"
                          "device_count=3") == "3"


def test_the_cli_uses_every_core_without_being_asked():
    shown = _devices_after("from recovjax import cli; import contextlib, io; "
                           "contextlib.redirect_stdout(io.StringIO()).__enter__()"
                           "; cli.main(['list']); import sys; "
                           "sys.stdout = sys.__stdout__; " + COUNT)
    assert shown == str(available_cores())


def test_bad_counts_are_named(monkeypatch):
    with pytest.raises(ValueError, match="count: must be a positive int"):
        use_all_cores(0)
    import jax
    jax.devices()  # JAX has started in this process
    with pytest.raises(RuntimeError, match="count: JAX has started with"):
        use_all_cores(len(jax.devices("cpu")) + 1)
    assert use_all_cores() == len(jax.devices("cpu"))
    monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "many")
    from recovjax import cores
    with pytest.raises(ValueError, match="JAX_NUM_CPU_DEVICES: must be"):
        cores._requested()


def test_malloc_is_tuned_or_reported_unavailable():
    from recovjax._malloc import tune_malloc
    assert tune_malloc() in (True, False)
    assert tune_malloc(1 << 20, arenas=2) in (True, False)
    with pytest.raises(ValueError, match="mmap_threshold"):
        tune_malloc(0)
    with pytest.raises(ValueError, match="arenas"):
        tune_malloc(arenas=True)
