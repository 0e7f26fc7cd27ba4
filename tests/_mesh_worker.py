"""A sweep and a recovery on meshes of 4 CPU devices, against 1 device.

    python tests/_mesh_worker.py OUT

Runs with ``JAX_NUM_CPU_DEVICES=4`` (set here, before JAX starts) and
writes, for each mesh (points x model) and for one device, the sweep's
accuracies and losses and the recovery's curves to ``OUT`` (.npz).
"""

import os
import sys

os.environ["JAX_NUM_CPU_DEVICES"] = "4"
os.environ["RECOVJAX_COMPILATION_CACHE"] = "0"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import recovjax as rj  # noqa: E402
from recovjax.data import batch_split, load_dataset  # noqa: E402

assert len(jax.devices()) == 4, jax.devices()
data = load_dataset("mnist5k")
model = rj.get_model("mlp")
params = model.init(jax.random.key(0), data.test.images[:1])
test = rj.Split(data.test.images[:200], data.test.labels[:200])
train = rj.Split(data.train.images[:300], data.train.labels[:300])
task = rj.make_task(model, train, eval_batches=batch_split(test, 100))
strategy = rj.get_strategy("finetune", steps=4, batch_size=50, eval_every=2)
count = 4
damage_keys = jax.random.split(jax.random.key(1), count)
keys = jax.random.split(jax.random.key(2), count)
amounts = jnp.linspace(0.1, 0.5, count)
arrays = {}
layouts = {"1x1": (jax.devices()[:1], 1), "1x4": (None, 4),
           "2x2": (None, 2), "4x1": (None, 1)}
for name, (devices, model_devices) in layouts.items():
    result = rj.sweep(model, params, damages=["zero"], ratios=[0.1, 0.5],
                      seeds=2, data=test, root_key=0, devices=devices,
                      model_devices=model_devices)
    rows = result.table.select(stage="damaged")
    for metric in ("accuracy", "loss"):
        arrays[f"{name}/sweep/{metric}"] = np.asarray(
            [r["value"] for r in rows if r["metric"] == metric])
    outcome = rj.recover_damage(strategy, task, rj.get_damage("zero"),
                                params, damage_keys=damage_keys,
                                amounts=amounts, keys=keys, devices=devices,
                                model_devices=model_devices)
    arrays[f"{name}/recovery/accuracy"] = np.asarray(outcome.curve.accuracy)
    arrays[f"{name}/recovery/loss"] = np.asarray(outcome.curve.loss)
from recovjax import runner  # noqa: E402
program = runner.map_points(lambda point, shared: point, model_devices=2)
specs = program.shared_sharding(params)
arrays["spec/fc1/kernel"] = np.asarray(str(specs["fc1"]["kernel"].spec))
arrays["spec/fc3/bias"] = np.asarray(str(specs["fc3"]["bias"].spec))
np.savez(sys.argv[1], **arrays)
print("done", flush=True)
