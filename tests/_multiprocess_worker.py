"""One process of a multi-process run (or the single-process reference).

    python tests/_multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT CKPT

With ``NUM_PROCESSES > 1`` it joins ``jax.distributed`` on 127.0.0.1:PORT
with one CPU device; with 1 it runs alone on 2 CPU devices and first saves
the pretrained checkpoint ``CKPT`` that the restores read (several
processes read one shared checkpoint, as hosts read shared storage). Every
process computes its share of the points of a sweep and of a recovery;
process 0 writes the sweep's CSV and the recovery's arrays to ``OUT``.
"""

import os
import sys

process_id, processes, port, out, checkpoint = (
    int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4],
    sys.argv[5])
os.environ["JAX_NUM_CPU_DEVICES"] = "1" if processes > 1 else "2"
os.environ["RECOVJAX_COMPILATION_CACHE"] = "0"

import jax  # noqa: E402

if processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}",
                               num_processes=processes,
                               process_id=process_id)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import recovjax as rj  # noqa: E402
from recovjax.checkpoints import save_checkpoint  # noqa: E402
from recovjax.data import batch_split, load_dataset  # noqa: E402

assert len(jax.devices()) == 2, jax.devices()
data = load_dataset("mnist5k")
model = rj.get_model("mlp")
params = model.init(jax.random.key(0), data.test.images[:1])
test = rj.Split(data.test.images[:200], data.test.labels[:200])
sweep = rj.sweep(model, params, damages=["zero", "gaussian_noise"],
                 ratios=[0.1, 0.5], seeds=3, data=test, root_key=0)

if processes == 1:
    save_checkpoint(checkpoint, params, {"model": "mlp"})
train = rj.Split(data.train.images[:300], data.train.labels[:300])
task = rj.make_task(model, train, checkpoint=checkpoint,
                    eval_batches=batch_split(test, 100))
count = 5
damage_keys = jax.random.split(jax.random.key(1), count)
keys = jax.random.split(jax.random.key(2), count)
amounts = jnp.linspace(0.1, 0.5, count)
outcomes = {}
for name in ("finetune", "restore_entries"):
    strategy = rj.get_strategy(name, steps=4, batch_size=50, eval_every=2) \
        if name == "finetune" else rj.get_strategy(name)
    outcome = rj.recover_damage(strategy, task, rj.get_damage("zero"),
                                params, damage_keys=damage_keys,
                                amounts=amounts, keys=keys)
    outcomes[f"{name}/accuracy"] = np.asarray(outcome.curve.accuracy)
    outcomes[f"{name}/loss"] = np.asarray(outcome.curve.loss)
    outcomes[f"{name}/losses"] = np.asarray(outcome.losses)
    outcomes[f"{name}/restored"] = np.asarray(
        ",".join(outcome.restored_leaves))
if process_id == 0:
    sweep.table.to_csv(f"{out}.csv")
    np.savez(f"{out}.npz", **outcomes)
print("done", process_id, flush=True)
