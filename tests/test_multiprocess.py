"""Several processes on jax.distributed: the same tables as one process."""

from __future__ import annotations

import pathlib
import socket
import subprocess
import sys

import numpy as np

WORKER = pathlib.Path(__file__).with_name("_multiprocess_worker.py")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(*args):
    return subprocess.Popen([sys.executable, str(WORKER), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish(process, timeout=240):
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    assert process.returncode == 0, output[-3000:]


def test_two_processes_give_the_single_process_tables(tmp_path):
    checkpoint = tmp_path / "ckpt"
    finish(run(0, 1, 0, tmp_path / "single", checkpoint))
    port = free_port()
    workers = [run(index, 2, port, tmp_path / "multi", checkpoint)
               for index in range(2)]
    for worker in workers:
        finish(worker)
    # The sweep: each process computed its share; the tidy table is whole.
    assert (tmp_path / "multi.csv").read_bytes() == (
        tmp_path / "single.csv").read_bytes()
    single, multi = (np.load(tmp_path / f"{name}.npz")
                     for name in ("single", "multi"))
    assert sorted(single.files) == sorted(multi.files)
    for name in single.files:
        assert single[name].shape == multi[name].shape, name
        np.testing.assert_array_equal(multi[name], single[name],
                                      err_msg=name)
    assert single["finetune/losses"].shape == (5, 4)


CLI_CONFIG = """\
name: two
model: lenet5
dataset: mnist5k
damage:
  - kind: zero
    ratios: [0.2, 0.6]
sweep: {seeds: 3}
evaluate: {batch_size: 100, test_examples: 200}
recovery:
  strategies: [finetune, restore_entries]
  steps: 6
  eval_every: 3
  data: {train_examples: 300}
"""


def cli(*args, env):
    return subprocess.Popen([sys.executable, "-m", "recovjax", "--quiet",
                             *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def test_the_cli_on_two_processes_writes_the_single_process_results(
        tmp_path, trained_lenet):
    import os

    from recovjax.checkpoints import save_checkpoint
    from recovjax.pretrain import zoo_path

    env = dict(os.environ, RECOVJAX_CACHE_DIR=str(tmp_path / "cache"))
    save_checkpoint(zoo_path("lenet5", "mnist5k", 0, tmp_path / "cache/zoo"),
                    trained_lenet, {"model": "lenet5", "dataset": "mnist5k",
                                    "seed": 0})
    config = tmp_path / "two.yaml"
    config.write_text(CLI_CONFIG)
    finish(cli("recover", "--config", config, "--run-dir",
               tmp_path / "single", env=env))
    port = free_port()
    workers = [cli("recover", "--config", config, "--run-dir",
                   tmp_path / "multi", "--coordinator", f"127.0.0.1:{port}",
                   "--num-processes", 2, "--process-id", index, env=env)
               for index in range(2)]
    for worker in workers:
        finish(worker)
    assert (tmp_path / "multi" / "results.csv").read_bytes() == (
        tmp_path / "single" / "results.csv").read_bytes()
    assert (tmp_path / "multi" / "report.md").is_file()
    import json
    environment = json.loads((tmp_path / "multi" / "env.json").read_text())
    assert environment["process_count"] == 2


def test_bad_process_flags_are_one_line_errors():
    result = subprocess.run(
        [sys.executable, "-m", "recovjax", "sweep", "--config", "x.yaml",
         "--coordinator", "127.0.0.1:1", "--num-processes", "2",
         "--process-id", "2"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "recovjax: error: --process-id: must lie in [0, 2) for "
        "--num-processes 2, got 2")
    result = subprocess.run(
        [sys.executable, "-m", "recovjax", "sweep", "--config", "x.yaml",
         "--coordinator", "127.0.0.1:1"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "go together" in result.stderr
