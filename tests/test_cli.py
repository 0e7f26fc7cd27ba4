"""End-to-end tests of the ``recovjax`` command line (subprocesses).

A tiny LeNet-5 checkpoint is put in the zoo first, so the runs only damage,
evaluate, recover and report on data subsets; the persistent compilation
cache (shared through ``RECOVJAX_CACHE_DIR``) keeps later runs quick.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from recovjax.checkpoints import save_checkpoint
from recovjax.pretrain import zoo_path

TINY = """\
name: tiny
model: lenet5
dataset: mnist5k
damage:
  - kind: zero
    ratios: [0.2, 0.6]
sweep: {seeds: 2}
evaluate: {batch_size: 100, test_examples: 200}
recovery:
  strategies: [finetune, restore_entries]
  steps: 10
  eval_every: 5
  data: {train_examples: 300}
"""


@pytest.fixture(scope="module")
def zoo(trained_lenet):
    """The tiny trained LeNet-5 as the zoo's pretrained lenet5 (seed 0)."""
    path = zoo_path("lenet5", "mnist5k", 0)
    if not path.exists():
        save_checkpoint(path, trained_lenet,
                        {"model": "lenet5", "dataset": "mnist5k", "seed": 0,
                         "epochs": 3, "test_accuracy": 0.0})
    return path


def recovjax(*args, check=False, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "recovjax", *map(str, args)],
                            capture_output=True, text=True, timeout=300,
                            **kwargs)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def reference(zoo, tmp_path_factory):
    """One complete run of the tiny config, shared by the tests below."""
    root = tmp_path_factory.mktemp("cli")
    config = root / "tiny.yaml"
    config.write_text(TINY)
    run = root / "reference"
    recovjax("--quiet", "recover", "--config", config, "--run-dir", run,
             check=True)
    return config, run


def test_run_writes_a_complete_run_directory(reference):
    _, run = reference
    for name in ("config.yaml", "results.csv", "results.json", "env.json",
                 "costs.json", "report.md", "accuracy_vs_ratio.png",
                 "recovery_curves.png", "recovery_heatmap.png",
                 "strategies.png"):
        assert (run / name).is_file(), name
    report = (run / "report.md").read_text()
    assert "![Recovery curves](recovery_curves.png)" in report
    assert "restore_entries" in report
    text = (run / "results.csv").read_text()
    assert "recovered/finetune" in text and ",damaged," in text


def test_rerun_is_byte_identical_and_resume_changes_nothing(reference,
                                                             tmp_path):
    config, run = reference
    again = tmp_path / "again"
    recovjax("--quiet", "recover", "--config", config, "--run-dir", again,
             check=True)
    assert (again / "results.csv").read_bytes() == (
        run / "results.csv").read_bytes()
    before = (again / "results.csv").read_bytes()
    recovjax("--quiet", "recover", "--config", config, "--run-dir", again,
             check=True)
    assert (again / "results.csv").read_bytes() == before


def test_killed_run_resumes_to_identical_results(reference, tmp_path):
    config, run = reference
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "recovjax", "--quiet", "recover", "--config",
         str(config), "--run-dir", str(killed)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = killed / "parts" / "damaged-zero.json"
    deadline = time.monotonic() + 240
    while not marker.exists() and process.poll() is None and (
            time.monotonic() < deadline):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert marker.exists(), "the run died before its sweep finished"
    assert not (killed / "results.csv").exists(), "killed too late"
    recovjax("--quiet", "recover", "--config", config, "--run-dir", killed,
             check=True)
    assert (killed / "results.csv").read_bytes() == (
        run / "results.csv").read_bytes()


def test_changed_config_is_refused_unless_forced(reference, tmp_path):
    config, run = reference
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    changed = recovjax("--quiet", "recover", "--config", config, "--run-dir",
                       copy, "--set", "sweep.seeds=1")
    assert changed.returncode == 2
    assert "different config" in changed.stderr
    assert "Traceback" not in changed.stderr
    assert (copy / "results.csv").read_bytes() == (
        run / "results.csv").read_bytes()
    forced = recovjax("--quiet", "sweep", "--config", config, "--run-dir",
                      copy, "--set", "sweep.seeds=1", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "seeds: 1" in (copy / "config.yaml").read_text()
    assert "recovered/" not in (copy / "results.csv").read_text()


def test_report_is_regenerated_from_saved_results(reference, tmp_path):
    _, run = reference
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    results = (copy / "results.csv").stat().st_mtime_ns
    (copy / "report.md").unlink()
    (copy / "accuracy_vs_ratio.png").unlink()
    done = recovjax("report", copy, check=True)
    assert "report.md" in done.stdout
    assert (copy / "report.md").read_text() == (run / "report.md").read_text()
    assert (copy / "accuracy_vs_ratio.png").is_file()
    assert (copy / "results.csv").stat().st_mtime_ns == results
    missing = recovjax("report", tmp_path / "nowhere")
    assert missing.returncode == 2 and "nowhere" in missing.stderr


@pytest.mark.parametrize("text, expected", [
    ("sweep: {sedes: 2}\n", ["sweep.sedes", "did you mean 'seeds'?"]),
    ("sweep: {seeds: two}\n", ["sweep.seeds", "expected an integer"]),
    ("sweep: {seeds: 0}\n", ["sweep.seeds", "must be >= 1"]),
    ("damage: [{kind: zap}]\n", ["damage[0].kind", "unknown damage 'zap'"]),
    ("damage: [{kind: zero, ratios: [1.5]}]\n", ["damage[0].ratios",
                                                 "fractions in [0, 1]"]),
    ("recovery: {strategies: [retrain]}\n",
     ["recovery.strategies[0]", "unknown recovery strategy 'retrain'"]),
])
def test_config_errors_are_one_line_naming_key_and_file(tmp_path, text,
                                                        expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = recovjax("recover", "--config", path, "--run-dir",
                      tmp_path / "run")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith("recovjax: error:")
    for fragment in expected:
        assert fragment in line
    if "unknown" not in expected[-1]:
        assert str(path) in line
    assert not (tmp_path / "run").exists()


def test_missing_config_file(tmp_path):
    result = recovjax("sweep", "--config", tmp_path / "absent.yaml")
    assert result.returncode == 2
    assert "absent.yaml: config file not found" in result.stderr


def test_sweep_needs_a_config():
    result = recovjax("sweep")
    assert result.returncode == 2 and "--config" in result.stderr


def test_list_shows_every_registry():
    result = recovjax("list", check=True)
    for name in ("lenet5", "mnist5k", "zero", "bit_flip", "remove_heads",
                 "label_noise", "finetune", "restore_entries", "distill"):
        assert name in result.stdout


def test_console_script_is_installed():
    script = os.path.join(os.path.dirname(sys.executable), "recovjax")
    assert os.path.exists(script)
    result = subprocess.run([script, "list"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "lenet5" in result.stdout
