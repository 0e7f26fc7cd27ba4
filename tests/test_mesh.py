"""Points x model meshes on 4 forced CPU devices give 1 device's results."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from _tolerance import assert_sums_close
from recovjax import runner

WORKER = pathlib.Path(__file__).with_name("_mesh_worker.py")
# The MLP's chain of sums (784, 300 and 100 inputs, 10 classes) and the
# mean over 200 test examples.
LOSS_TERMS = 784 + 300 + 100 + 10 + 200


def test_every_mesh_of_four_devices_gives_the_one_device_results(tmp_path):
    out = tmp_path / "mesh.npz"
    done = subprocess.run([sys.executable, str(WORKER), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    arrays = np.load(out)
    # The default rule splits the large kernel's largest axis, keeps the
    # small bias whole.
    assert str(arrays["spec/fc1/kernel"]) == str(PartitionSpec("model",
                                                               None))
    assert str(arrays["spec/fc3/bias"]) == str(PartitionSpec())
    for layout in ("1x4", "2x2", "4x1"):
        for part in ("sweep", "recovery"):
            want = arrays[f"1x1/{part}/accuracy"]
            np.testing.assert_array_equal(arrays[f"{layout}/{part}/accuracy"],
                                          want, err_msg=layout)
            loss = arrays[f"1x1/{part}/loss"]
            assert_sums_close(arrays[f"{layout}/{part}/loss"], loss,
                              terms=LOSS_TERMS * (5 if part == "recovery"
                                                  else 1),
                              magnitude=10 * np.abs(loss) + 1,
                              err_msg=f"{layout} {part}")


def test_the_default_partition_splits_large_leaves_only():
    assert runner.default_partition(np.zeros((784, 300)), 4) == (
        PartitionSpec("model", None))
    assert runner.default_partition(np.zeros((300, 784)), 4) == (
        PartitionSpec(None, "model"))
    assert runner.default_partition(np.zeros((7, 5000)), 3) == (
        PartitionSpec())  # no axis divisible by 3
    assert runner.default_partition(np.zeros((100,)), 4) == PartitionSpec()
    assert runner.default_partition(np.zeros((784, 300)), 1) == (
        PartitionSpec())


def test_a_model_axis_that_does_not_divide_the_devices_is_refused():
    count = len(jax.devices())
    with pytest.raises(ValueError, match="model_devices"):
        runner.map_points(lambda point, shared: point,
                          model_devices=count + 1)
    with pytest.raises(ValueError, match="model_devices"):
        runner.make_mesh(tuple(jax.devices()), 0)
