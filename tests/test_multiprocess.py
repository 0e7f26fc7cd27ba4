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
