"""A user's own model, weights and data from a config, with no edits to recovjax."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest

from recovjax.config import ConfigError, load_config
from recovjax.experiment import run_experiment
from recovjax.validation import check_config

MODULE = textwrap.dedent("""
    import flax.linen as nn
    import jax, jax.numpy as jnp
    from recovjax.models import from_linen

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.relu(nn.BatchNorm(use_running_average=not train)(
                nn.Conv(4, (3, 3))(x)))
            x = nn.Dropout(0.2, deterministic=not train)(
                x.reshape(x.shape[0], -1))
            return nn.Dense(3)(x)

    def make_model():
        sample = jnp.zeros((1, 6, 6, 1))
        return from_linen(Net(), Net().init(jax.random.key(0), sample),
                          sample=sample, name="usernet")

    def not_a_model():
        return 42
""")


@pytest.fixture()
def user(tmp_path, monkeypatch):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "usernets.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(package))
    rng = np.random.default_rng(0)
    data = tmp_path / "toy.npz"
    np.savez(data, images=rng.integers(0, 255, (60, 6, 6, 1), np.uint8),
             labels=(np.arange(60) % 3).astype(np.int64))
    yield tmp_path, data
    sys.modules.pop("usernets", None)


def _config(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return load_config(path)


def test_own_model_and_data_run_from_a_config(user):
    tmp_path, data = user
    config = _config(tmp_path, f"""
        name: own
        model: usernets:make_model
        dataset: {data}
        damage:
          - kind: zero
            ratios: [0.3]
            options: {{scope: weights}}
          - kind: remove_neurons
            ratios: [0.5]
        sweep: {{seeds: 2}}
        evaluate: {{batch_size: 6}}
        recovery:
          strategies: [finetune, restore_entries]
          batch_size: 12
          steps: 4
          eval_every: 2
        """)
    check_config(config)
    table = run_experiment(config, tmp_path / "run", progress=False,
                           zoo_dir=tmp_path / "zoo")
    stages = {row["stage"] for row in table.rows}
    assert {"clean", "damaged", "recovered/finetune",
            "recovered/restore_entries"} <= stages
    assert (tmp_path / "run" / "report.md").is_file()
    clean = [row["value"] for row in table.rows
             if row["stage"] == "clean" and row["metric"] == "accuracy"]
    restored = [row["value"] for row in table.rows
                if row["stage"] == "recovered/restore_entries"
                and row["metric"] == "accuracy"]
    assert restored and set(restored) == {clean[0]}


@pytest.mark.parametrize("model, message", [
    ("nosuchmodule:make", "cannot import 'nosuchmodule'"),
    ("usernets:missing", "has no callable 'missing'"),
    ("usernets:not_a_model", "returned int, not a recovjax Model"),
])
def test_bad_model_import_paths_are_named(user, model, message):
    tmp_path, data = user
    config = _config(tmp_path, f"""
        model: {model}
        dataset: {data}
        """)
    with pytest.raises(ConfigError, match=f"model: .*{message}"):
        check_config(config)


def test_missing_weights_and_data_files_are_named(user):
    tmp_path, data = user
    config = _config(tmp_path, f"""
        model: usernets:make_model
        dataset: {data}
        weights: {tmp_path / 'nope.safetensors'}
        """)
    with pytest.raises(ConfigError, match="weights: .*nope.safetensors"):
        check_config(config)
    config = _config(tmp_path, f"""
        model: usernets:make_model
        dataset: {tmp_path / 'nope.npz'}
        """)
    with pytest.raises(ConfigError, match="dataset: .*nope.npz"):
        check_config(config)


def test_weights_from_a_torch_layout_safetensors_file(user):
    from safetensors.numpy import save_file
    tmp_path, data = user
    sys.path.insert(0, str(tmp_path / "pkg"))
    import usernets
    model = usernets.make_model()
    params = {key: np.asarray(value) for key, value in {
        "Conv_0.weight": np.transpose(model.params["Conv_0"]["kernel"],
                                      (3, 2, 0, 1)) * 2,
        "Conv_0.bias": model.params["Conv_0"]["bias"],
        "BatchNorm_0.weight": model.params["BatchNorm_0"]["scale"],
        "BatchNorm_0.bias": model.params["BatchNorm_0"]["bias"],
        "Dense_0.weight": np.transpose(model.params["Dense_0"]["kernel"]),
        "Dense_0.bias": model.params["Dense_0"]["bias"]}.items()}
    save_file(params, tmp_path / "net.safetensors")
    config = _config(tmp_path, f"""
        model: usernets:make_model
        dataset: {data}
        weights: {tmp_path / 'net.safetensors'}
        weights_layout: torch
        """)
    check_config(config)
    from recovjax import sources
    loaded = sources.with_weights(model, config.weights,
                                  config.weights_layout)
    np.testing.assert_array_equal(loaded.params["Conv_0"]["kernel"],
                                  2 * np.asarray(
                                      model.params["Conv_0"]["kernel"]))
    bad = _config(tmp_path, f"""
        model: usernets:make_model
        dataset: {data}
        weights: {tmp_path / 'net.safetensors'}
        """)
    with pytest.raises(ConfigError,
                       match="weights: .*no source tensor .*for leaf"):
        check_config(bad)


def test_hardware_faults_attacks_and_protection_from_a_config(user):
    from recovjax.damage.replay import load_faults
    tmp_path, data = user
    config = _config(tmp_path, f"""
        name: faults
        model: usernets:make_model
        dataset: {data}
        damage:
          - kind: bit_position_flip
            ratios: [2, 30]
          - kind: bit_search
            label: attack
            ratios: [0, 2]
            options: {{flips: 2, attack_examples: 8}}
          - kind: bit_flip
            ratios: [0.01]
            options: {{format: int8}}
        sweep: {{seeds: 1, outcomes: true, fault_lists: true}}
        evaluate: {{batch_size: 6}}
        recovery:
          strategies: [checksum_restore]
          batch_size: 12
        """)
    check_config(config)
    run = tmp_path / "run"
    table = run_experiment(config, run, progress=False,
                           zoo_dir=tmp_path / "zoo")
    metrics = {row["metric"] for row in table.rows}
    assert {"outcome/masked", "outcome/sdc", "outcome/due"} <= metrics
    stages = {row["stage"] for row in table.rows}
    assert "recovered/checksum_restore" in stages
    clean = [row["value"] for row in table.rows
             if row["stage"] == "clean" and row["metric"] == "accuracy"][0]
    repaired = [row["value"] for row in table.rows
                if row["stage"] == "recovered/checksum_restore"
                and row["metric"] == "accuracy"]
    assert repaired and set(repaired) == {clean}
    files = sorted(p.relative_to(run).as_posix()
                   for p in (run / "faults").rglob("*.safetensors"))
    assert files == ["faults/attack/r0_s0.safetensors",
                     "faults/attack/r1_s0.safetensors",
                     "faults/bit_flip/r0_s0.safetensors",
                     "faults/bit_position_flip/r0_s0.safetensors",
                     "faults/bit_position_flip/r1_s0.safetensors"]
    one = load_faults(run / "faults/bit_position_flip/r1_s0.safetensors")
    assert one.metadata["damage"] == "bit_position_flip"
    assert sum(int(np.size(f.index)) for f in one.leaves.values()) == 1
    assert "report.md" in {p.name for p in run.iterdir()}
    assert "## Outcomes" in (run / "report.md").read_text()


def test_activation_faults_with_range_restriction_from_a_config(user):
    tmp_path, data = user
    config = _config(tmp_path, f"""
        name: ranger
        model: usernets:make_model
        dataset: {data}
        damage:
          - kind: activation_bit_flip
            ratios: [0.0, 0.01]
            options: {{bits: exponent, range_restriction: clip}}
        sweep: {{seeds: 1}}
        evaluate: {{batch_size: 6}}
        """)
    import dataclasses
    config = dataclasses.replace(config, recovery=None)
    check_config(config)
    table = run_experiment(config, tmp_path / "run", progress=False,
                           zoo_dir=tmp_path / "zoo")
    values = {(row["damage"], row["ratio"]): row["value"]
              for row in table.rows if row["metric"] == "accuracy"}
    assert values[("activation_bit_flip", 0.0)] == values[("none", 0.0)]


def test_the_literature_strategies_recover_a_users_model(user, capsys):
    tmp_path, data = user
    config = _config(tmp_path, f"""
        name: own_literature
        model: usernets:make_model
        dataset: {data}
        damage:
          - kind: zero
            label: wanda
            ratios: [0.5]
            options: {{scope: weights, target: wanda, calibration: 24}}
        sweep: {{seeds: 1}}
        evaluate: {{batch_size: 6}}
        recovery:
          strategies:
            - name: lora
              options: {{rank: 1, layers: ["Conv_0", "Dense_0"]}}
            - name: reconstruct
              options: {{calibration: 24}}
            - name: bias_correction
              options: {{calibration: 24}}
            - name: lr_rewind
              options:
                schedule: {{optimizer: adam, learning_rate: 0.001,
                            schedule: cosine, total_steps: 40}}
            - name: iterative
              options: {{stages: 2}}
            - recalibrate
          batch_size: 12
          steps: 4
          eval_every: 2
        """)
    check_config(config)
    table = run_experiment(config, tmp_path / "run", progress=False,
                           zoo_dir=tmp_path / "zoo")
    stages = {row["stage"] for row in table.rows}
    for name in ("lora", "reconstruct", "bias_correction", "lr_rewind",
                 "iterative", "recalibrate"):
        assert f"recovered/{name}" in stages, name
    import json
    costs = json.loads((tmp_path / "run" / "costs.json").read_text())
    by_name = {r["strategy"]: r for r in costs["recovery"]}
    assert by_name["reconstruct"]["unlabelled_samples"] == 24
    assert by_name["reconstruct"]["labelled_samples"] == 0
    assert 0 < by_name["lora"]["trainable_params"] < by_name[
        "lr_rewind"]["trainable_params"]
    assert all(r["flops_per_model"] is not None for r in costs["recovery"])
    from recovjax import cli
    assert cli.main(["compare", str(tmp_path / "run"), "--cost",
                     "seconds"]) == 0
    assert "best strategy under a budget of any cost" in (
        capsys.readouterr().out)
