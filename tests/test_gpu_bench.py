"""benchmarks/gpu.py at its tiny size on CPU: every part, positive finite
figures, and the formulations each measurement traced."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from recovjax import formulations
from recovjax.checkpoints import save_checkpoint
from recovjax.pretrain import zoo_path

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu.py"
LENET_LEAVES = 10


def _load_script():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gpu = _load_script()


@pytest.fixture(scope="module")
def zoo(trained_lenet, mnist):
    """The tiny trained LeNet-5 as the zoo's pretrained lenet5 (seed 0)."""
    path = zoo_path("lenet5", "mnist5k", 0)
    if not path.exists():
        save_checkpoint(path, trained_lenet,
                        {"model": "lenet5", "dataset": "mnist5k", "seed": 0,
                         "epochs": 3, "test_accuracy": 0.0})
    return path


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and (
        value > 0)


def _check_ops(row):
    chosen, ops = row["formulations"], row["ops"]
    assert (ops["convolution"] > 0) is (chosen["conv"] == "lax"), row
    assert (ops["threefry"] > 0) is (chosen["random"] == "jax"), row
    # The sort formulation sorts every leaf's group; the bitwise search
    # sorts none of the hash draws and only the small groups of others.
    assert (ops["sort"] >= LENET_LEAVES) is (chosen["select"] == "sort"), row


def test_tiny_run_reports_every_part(zoo, tmp_path):
    out = tmp_path / "gpu.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop(formulations.ENV_VAR, None)
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--out", str(out),
         "--w3-model", "lenet5", "--w3-dataset", "mnist5k"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
        check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "## GPU: W1 at 10,000 models" in done.stdout
    report = json.loads(out.read_text())
    assert "notes" not in report, report["notes"]
    for section in ("meta", "w1_setup", "w1", "w3_setup", "w3", "mesh"):
        assert report.get(section), section
    meta = report["meta"]
    assert meta["platform"] == "cpu" and meta["device_count"] >= 1
    assert report["w1_setup"]["points"] == 20
    assert report["w1_setup"]["images"] == 100
    assert report["w3_setup"]["weights"] == "pretrained"

    rows = report["w1"] + report["w3"] + [report["mesh"]]
    for row in rows:
        for key in ("first_s", "steady_s", "stream_s", "model_images_per_s",
                    "stream_model_images_per_s", "seconds_per_point",
                    "peak_host_rss_bytes"):
            assert _positive(row[key]), (key, row)
        assert row["table_s"] >= 0
        assert row["model_images_per_s"] == pytest.approx(
            row["points"] * row["images"] / row["steady_s"])

    # The defaults are the CPU formulations, recorded as such, then the
    # plain JAX ones, forced; each traced what it records.
    cpu = formulations.CPU_DEFAULTS._asdict()
    plain = formulations.ACCELERATOR_DEFAULTS._asdict()
    assert meta["formulations"]["sources"] == dict.fromkeys(
        formulations.MECHANISMS, "default for cpu")
    assert [row["label"] for row in report["w1"]] == [
        "defaults", "plain JAX formulations"]
    assert [row["label"] for row in report["w3"]] == ["defaults"]
    for defaults in (report["w1"][0], report["w3"][0]):
        assert {k: defaults["formulations"][k] for k in cpu} == cpu
        assert defaults["formulations"]["sources"] == meta["formulations"][
            "sources"]
    forced = report["w1"][1]
    assert {k: forced["formulations"][k] for k in plain} == plain
    assert forced["formulations"]["sources"] == dict.fromkeys(
        formulations.MECHANISMS, "set_formulations")
    for row in report["w1"] + report["w3"]:
        _check_ops(row)
    for row in report["w1"]:
        assert row["accuracy_at_lowest_ratio"] > row[
            "accuracy_at_highest_ratio"]

    mesh = report["mesh"]
    assert mesh["devices"] == meta["device_count"]
    assert mesh["mesh"] == {"points": 1, "model": meta["device_count"]}
    assert mesh["compared_points"] == mesh["points"] > 0
    assert mesh["max_accuracy_difference"] == 0.0


def test_w3_falls_back_and_says_so(zoo):
    model, params, split, facts, notes = gpu.w3_setup(
        "no_such_model", "no_such_dataset", 8)
    assert facts["model"] == "rescnn" and facts["weights"] == "fresh"
    assert split.images.shape == (8, 28, 28, 1)
    assert len(notes) == 2
    assert "model 'no_such_model' is not registered" in notes[0]
    assert "dataset 'no_such_dataset' is not available" in notes[1]
    assert model.forward(params, split.images).shape == (8, 10)
    _, _, _, facts, notes = gpu.w3_setup("mlp", "mnist5k", 8)
    assert facts["weights"] == "fresh"
    assert notes == [f"w3: no pretrained mlp for mnist5k in the zoo "
                     f"({zoo_path('mlp', 'mnist5k', 0)}); freshly "
                     "initialised weights (timing does not depend on them)"]
    _, _, _, facts, notes = gpu.w3_setup("lenet5", "mnist5k", 8)
    assert facts["weights"] == "pretrained" and notes == []


def test_budget_decisions():
    assert gpu.estimate_s(10.0, 2.0, 3) == pytest.approx(1.3 * 16.0)
    assert gpu.skip_note("w1: cpu", 5.0, deadline=100.0, now=90.0) is None
    note = gpu.skip_note("w1: cpu", 20.0, deadline=100.0, now=90.0)
    assert note == ("w1: cpu skipped (needs about 20 s, 10 s left of its "
                    "budget)")
    assert "0 s left" in gpu.skip_note("w3:", 1.0, deadline=5.0, now=9.0)


def test_variants_swap_one_mechanism_at_a_time():
    with formulations.use_formulations(
            **formulations.CPU_DEFAULTS._asdict()):
        variants = dict(gpu.formulation_variants(True))
        pair = gpu.formulation_variants(False)
    assert variants == {
        "defaults": {},
        "plain JAX formulations": formulations.ACCELERATOR_DEFAULTS._asdict(),
        "defaults, conv=lax": {"conv": "lax"},
        "defaults, random=jax": {"random": "jax"},
        "defaults, select=sort": {"select": "sort"}}
    assert [label for label, _ in pair] == ["defaults",
                                            "plain JAX formulations"]


def test_bad_budget_is_refused():
    with pytest.raises(SystemExit):
        gpu.main(["--tiny", "--budget-s", "0"])
