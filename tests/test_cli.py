"""End-to-end tests of the ``recovjax`` command line (subprocesses).

A tiny LeNet-5 checkpoint is put in the zoo first, so the runs only damage,
evaluate, recover and report on data subsets; the persistent compilation
cache (shared through ``RECOVJAX_CACHE_DIR``) keeps later runs quick.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from recovjax import formulations
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
                 "frontier.png"):
        assert (run / name).is_file(), name
    report = (run / "report.md").read_text()
    assert "![Recovery curves](recovery_curves.png)" in report
    assert "restore_entries" in report
    text = (run / "results.csv").read_text()
    assert "recovered/finetune" in text and ",damaged," in text


def test_env_json_records_the_formulations_and_their_sources(reference):
    _, run = reference
    recorded = json.loads((run / "env.json").read_text())["formulations"]
    chosen = formulations.parse_formulations(
        os.environ.get(formulations.ENV_VAR, ""))
    want = formulations.CPU_DEFAULTS._replace(**chosen)
    assert recorded["backend"] == "cpu"
    for mechanism in formulations.MECHANISMS:
        assert recorded[mechanism] == getattr(want, mechanism)
        assert recorded["sources"][mechanism] == (
            formulations.ENV_VAR if mechanism in chosen else "default for cpu")


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
    lines = result.stdout.splitlines()
    assert "  NAME                  KIND       STATUS" in lines
    assert "  NAME                  KIND       AMOUNT  DESCRIPTION" in lines
    assert "  NAME                  OPTIONS" in lines
    options = lines[lines.index(next(l for l in lines
                                     if l.startswith("  zero "))) + 1]
    assert options.strip() == ("options: scope='all', mode='exact', "
                               "ratio_over='leaf', target='random', "
                               "scores=None, calibration=256")
    finetune = next(l for l in lines if l.startswith("  finetune "))
    assert "steps" in finetune and "learning_rate" in finetune
    cifar = next(l for l in lines if l.startswith("  cifar10 "))
    assert "NOT PREPARED" in cifar
    assert "sgd, adam, adamw" in result.stdout


def test_list_marks_prepared_catalogue_datasets(tmp_path):
    version = tmp_path / "mnist" / "3.0.1"
    version.mkdir(parents=True)
    (version / "dataset_info.json").write_text("{}")
    result = recovjax("list", check=True,
                      env={**os.environ, "TFDS_DATA_DIR": str(tmp_path)})
    lines = result.stdout.splitlines()
    assert "prepared" in next(l for l in lines if l.startswith("  mnist "))
    assert "NOT PREPARED" in next(l for l in lines
                                  if l.startswith("  cifar10 "))


def test_console_script_is_installed():
    script = os.path.join(os.path.dirname(sys.executable), "recovjax")
    assert os.path.exists(script)
    result = subprocess.run([script, "list"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "lenet5" in result.stdout


# Bad input is refused up front: one line, exit status 2, nothing claimed.

@pytest.fixture
def cli(monkeypatch, capsys):
    """``main(argv)`` in this process: fast, for errors found before work."""
    from recovjax import cli as cli_module
    monkeypatch.setattr(cli_module, "_quiet_logs", lambda: None)
    monkeypatch.delenv("RECOVJAX_DEBUG", raising=False)

    def run(*args):
        status = cli_module.main([str(a) for a in args])
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run


def one_line_error(status, err, *fragments, status_expected=2,
                   prefix="recovjax: error: ") -> str:
    assert status == status_expected, err
    assert "Traceback" not in err
    line = err.strip()
    assert "\n" not in line and line.startswith(prefix), err
    for fragment in fragments:
        assert fragment in line, line
    return line


UNTRAINED = TINY.replace("name: tiny\n", "name: tiny\npretrain_seed: 7\n")
"""TINY with a checkpoint the zoo does not hold: if a bad run directory
were found only after work started, pretraining would have made it."""


def assert_no_work():
    assert not zoo_path("lenet5", "mnist5k", 7).exists()


@pytest.mark.parametrize("change, fragments", [
    (("model: lenet5", "model: lenet"), ["model: unknown model 'lenet'"]),
    (("dataset: mnist5k", "dataset: cifar10"),
     ["dataset: dataset 'cifar10' is not prepared", "tfds build cifar10"]),
    (("kind: zero\n", "kind: zero\n    options: {scope: conv9}\n"),
     ["damage[0].options.scope", "'conv9' matches no leaf"]),
    (("steps: 10", "steps: 10\n  optimizer: {name: rmsprop}"),
     ["recovery.optimizer.name", "expected one of 'sgd', 'adam', 'adamw'"]),
    (("strategies: [finetune, restore_entries]",
      "strategies: [{name: finetune, options: {stpes: 3}}]"),
     ["recovery.strategies[0].options.stpes", "did you mean 'steps'?"]),
    (("sweep: {seeds: 2}", "sweep: &s {seeds: 2}\nreport: *s"),
     ["line 8: YAML anchor '&s' refused", "alias"]),
    (("sweep: {seeds: 2}", "sweep: {seeds: 2"), ["line ", "not valid YAML"]),
])
def test_bad_config_claims_no_run_directory(cli, tmp_path, change,
                                            fragments):
    path = tmp_path / "bad.yaml"
    assert change[0] in UNTRAINED
    path.write_text(UNTRAINED.replace(*change))
    status, out, err = cli("recover", "--config", path, "--run-dir",
                           tmp_path / "run")
    one_line_error(status, err, str(path), *fragments)
    assert out == ""
    assert not (tmp_path / "run").exists()
    assert_no_work()


def test_alias_bomb_is_refused_fast(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    rows = ["name: bomb", "damage:", "  - kind: zero", "    options:",
            "      l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    rows += [f"      l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]"
             for i in range(1, 10)]
    bomb.write_text("\n".join(rows) + "\n")
    start = time.monotonic()
    result = recovjax("recover", "--config", bomb, "--run-dir",
                      tmp_path / "run")
    assert time.monotonic() - start < 60
    one_line_error(result.returncode, result.stderr,
                   f"{bomb}: line 5: YAML anchor '&l0' refused")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("where, fragments", [
    ("file", ["file: exists and is not a directory"]),
    ("file/run", ["file/run: cannot be created", "is a file"]),
])
def test_unusable_run_directory_is_refused_before_work(cli, tmp_path, where,
                                                       fragments):
    config = tmp_path / "tiny.yaml"
    config.write_text(UNTRAINED)
    (tmp_path / "file").write_text("mine")
    status, _, err = cli("--quiet", "recover", "--config", config,
                         "--run-dir", tmp_path / where)
    one_line_error(status, err, *fragments)
    assert (tmp_path / "file").read_text() == "mine"
    assert_no_work()


def _read_only_mount_works(directory) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c",
         f"mount --bind {directory} {directory} && mount -o remount,bind,ro "
         f"{directory} {directory} && ! touch {directory}/probe"],
        capture_output=True, timeout=60)
    return probe.returncode == 0 and not (directory / "probe").exists()


def test_read_only_filesystem_is_refused_before_work(tmp_path):
    """A real read-only mount (in a user namespace), which refuses root."""
    mount = tmp_path / "mount"
    mount.mkdir()
    if not _read_only_mount_works(mount):
        pytest.skip("cannot make a read-only bind mount here (needs "
                    "unprivileged user namespaces)")
    config = tmp_path / "tiny.yaml"
    config.write_text(UNTRAINED)
    script = (f"mount --bind {mount} {mount} && mount -o remount,bind,ro "
              f"{mount} {mount} && exec {sys.executable} -m recovjax "
              f"recover --config {config} --run-dir {mount}/run")
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script],
                            capture_output=True, text=True, timeout=300)
    one_line_error(result.returncode, result.stderr, f"{mount}/run",
                   "not writable", "Read-only file system")
    assert list(mount.iterdir()) == []
    assert_no_work()


def test_filesystem_errors_of_other_commands(cli, tmp_path):
    (tmp_path / "file").write_text("mine")
    status, _, err = cli("report", tmp_path / "file")
    one_line_error(status, err, "file: is not a run directory")
    status, _, err = cli("pretrain", "--seed", 7, "--out",
                         tmp_path / "file" / "checkpoint")
    one_line_error(status, err, "checkpoint: cannot be created",
                   "is a file")
    status, _, err = cli("pretrain", "--seed", 7, "--dataset", "cifar10")
    one_line_error(status, err, "dataset 'cifar10' is not prepared")
    status, _, err = cli("recover", "--config", tmp_path)
    one_line_error(status, err, "is a directory, not a config file")
    assert_no_work()


def test_argument_errors_are_one_line(cli):
    status, out, err = cli("pretrain", "--model", "lenet")
    one_line_error(status, err, "argument --model: invalid choice: 'lenet'",
                   "recovjax pretrain --help",
                   prefix="recovjax pretrain: error: ")
    status, out, err = cli("frobnicate")
    one_line_error(status, err, "invalid choice: 'frobnicate'",
                   prefix="recovjax: error: ")


def test_internal_errors_are_one_line_with_status_1(cli, monkeypatch):
    from recovjax import cli as cli_module

    def broken(args):
        raise RuntimeError("something inside\nbroke")

    monkeypatch.setattr(cli_module, "_command_list", broken)
    status, _, err = cli("list")
    one_line_error(status, err, "RuntimeError: something inside; broke",
                   "RECOVJAX_DEBUG=1", status_expected=1,
                   prefix="recovjax: internal error: ")


def test_every_option_has_help_choices_and_defaults():
    import argparse

    from recovjax.cli import build_parser
    parser = build_parser()
    commands = next(a for a in parser._actions
                    if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) >= {"demo", "sweep", "recover", "report",
                                     "pretrain", "list"}
    for name, command in commands.choices.items():
        assert command.description, name
        for action in command._actions:
            assert action.help, (name, action.dest)
        text = command.format_help()
        assert "--quiet" in text, name
    pretrain = commands.choices["pretrain"].format_help()
    # The choices are the built-in image classifiers (the language model
    # has its own pretraining, recovjax.load_pretrained_lm).
    from recovjax.models import BUILT_IN
    assert BUILT_IN == ("lenet5", "mlp", "rescnn", "vit", "resnet18")
    assert "{" + ",".join(BUILT_IN) + "}" in pretrain
    assert "(default: lenet5)" in pretrain and "(default: mnist5k)" in pretrain
    assert "(default: 0)" in pretrain
    recover = commands.choices["recover"].format_help()
    assert "(default: runs/<name>)" in recover


def test_version_and_quiet_after_every_command(zoo):
    from recovjax import __version__
    version = recovjax("--version", check=True)
    assert version.stdout.strip() == f"recovjax {__version__}"
    quiet = recovjax("pretrain", "--quiet", check=True)
    assert quiet.stdout == "" and quiet.stderr == ""
    loud = recovjax("pretrain", check=True)
    assert "test accuracy" in loud.stdout


@pytest.fixture(scope="module")
def corrected(zoo, tmp_path_factory):
    """A config with a typo in `model:`, then the corrected rerun (adamw,
    stderr a pipe as in CI logs, progress on)."""
    root = tmp_path_factory.mktemp("corrected")
    config = root / "one.yaml"
    text = TINY.replace("ratios: [0.2, 0.6]", "ratios: [0.3]").replace(
        "{seeds: 2}", "{seeds: 1}").replace(
        "strategies: [finetune, restore_entries]", "strategies: [finetune]"
    ).replace("steps: 10", "steps: 4\n  optimizer: {name: adamw, "
              "learning_rate: 0.001}")
    config.write_text(text.replace("model: lenet5", "model: lenett5"))
    run = root / "run"
    typo = recovjax("recover", "--config", config, "--run-dir", run)
    config.write_text(text)
    rerun = recovjax("recover", "--config", config, "--run-dir", run)
    return typo, rerun, run


def test_model_typo_then_corrected_rerun_needs_no_force(corrected):
    typo, rerun, run = corrected
    one_line_error(typo.returncode, typo.stderr,
                   "model: unknown model 'lenett5'")
    assert rerun.returncode == 0, rerun.stderr
    assert "seeds: 1" in (run / "config.yaml").read_text()


def test_adamw_runs_end_to_end(corrected):
    _, rerun, run = corrected
    assert rerun.returncode == 0, rerun.stderr
    assert "name: adamw" in (run / "config.yaml").read_text()
    assert "recovered/finetune" in (run / "results.csv").read_text()


def test_progress_in_a_log_is_plain_lines(corrected):
    _, rerun, _ = corrected
    assert rerun.returncode == 0, rerun.stderr
    assert "\r" not in rerun.stderr
    progress = [line for line in rerun.stderr.splitlines()
                if line.startswith("tiny: [")]
    messages = ["loading data and the pretrained model",
                "clean model evaluated", "swept zero",
                "recovered zero with finetune"]
    assert [line[:line.rindex(" (")] for line in progress] == [
        f"tiny: [{done}/3] {message}" for done, message in enumerate(messages)]
    assert all(line.endswith(" s)") for line in progress)


def test_progress_on_a_terminal_is_one_bar():
    import io

    from recovjax._progress import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream, interactive in ((Terminal(), True), (io.StringIO(), False)):
        progress = Progress("run", enabled=True, stream=stream, interval=0)
        for done in range(1, 201):
            progress(f"unit {done}", done, 200)
        progress.close()
        text = stream.getvalue()
        if interactive:
            assert "200/200" in text and text.count("\r") < 50
        else:
            assert "\r" not in text and len(text.splitlines()) == 200
    quiet = io.StringIO()
    progress = Progress("run", enabled=False, stream=quiet)
    progress("unit", 1, 1)
    progress.close()
    assert quiet.getvalue() == ""


def test_progress_in_a_log_prints_a_line_now_and_then(monkeypatch):
    import io

    from recovjax import _progress

    clock = iter(float(t) for t in range(1000))
    monkeypatch.setattr(_progress.time, "perf_counter", lambda: next(clock))
    log = io.StringIO()
    progress = _progress.Progress("pretrain", stream=log, interval=10)
    for done in range(1, 101):
        progress(f"loss={done}", done, 100)
    lines = log.getvalue().splitlines()
    # One line per 10 s of a 1 s-per-report clock, and always the last one.
    assert "\r" not in log.getvalue()
    assert 9 <= len(lines) <= 11
    assert lines[0].startswith("pretrain: [1/100] loss=1 ")
    assert lines[-1].startswith("pretrain: [100/100] loss=100 ")


def test_sensitivity_command_maps_layers_into_a_run_directory(zoo, tmp_path):
    from recovjax.results import read_csv
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY.replace("kind: zero", "kind: gaussian_noise"))
    run_dir = tmp_path / "map"
    result = recovjax("sensitivity", "--config", config, "--run-dir",
                      run_dir, "--layers", "conv1,fc3", check=True)
    assert "2 layers x" in result.stdout
    table = read_csv(run_dir / "results.csv")
    assert {row["layer"] for row in table.rows} == {"", "conv1", "fc3"}
    assert (run_dir / "sensitivity.png").is_file()
    assert "## Sensitivity" in (run_dir / "report.md").read_text()
    bad = recovjax("sensitivity", "--config", config, "--run-dir",
                   tmp_path / "bad", "--layers", "conv9")
    assert bad.returncode == 2
    assert "layers: 'conv9' is not a layer" in bad.stderr
    assert not (tmp_path / "bad").exists()
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text(TINY.replace("kind: zero", "kind: remove_neurons"))
    refused = recovjax("sensitivity", "--config", scalar)
    assert refused.returncode == 2 and "per-leaf amounts" in refused.stderr
