"""Tests of recovjax.weights: PyTorch-layout imports, round trips, errors."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from recovjax import checkpoints
from recovjax.weights import (WeightsError, load_npz, load_orbax,
                              load_safetensors, save_safetensors,
                              torch_mapping)

# A non-square kernel and distinct channel counts, so that a transform that
# swaps the wrong axes changes a shape or (for kh/kw) the hand forward.
IMAGES = np.random.default_rng(0).normal(size=(2, 5, 6, 2)).astype(np.float32)


class TinyCNN(nn.Module):
    """Conv 3x2 (2 -> 4 channels, VALID) -> relu -> flatten -> Dense 3."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 2), padding="VALID")(x))
        return nn.Dense(3)(x.reshape((x.shape[0], -1)))


MODULE = TinyCNN()
PARAMS = jax.tree.map(np.asarray, MODULE.init(jax.random.key(0), IMAGES)
                      ["params"])
ABSTRACT = jax.eval_shape(lambda: PARAMS)
EXPLICIT = {"Conv_0/kernel": ("Conv_0.weight", "oihw_to_hwio"),
            "Conv_0/bias": "Conv_0.bias",
            "Dense_0/kernel": ("Dense_0.weight", "out_in_to_in_out"),
            "Dense_0/bias": ("Dense_0.bias", "identity")}


def _torch_tensors(prefix=None) -> dict[str, np.ndarray]:
    """PARAMS in PyTorch layout and naming, transposed by hand."""
    prefix = prefix or {"Conv_0": "Conv_0", "Dense_0": "Dense_0"}
    conv, dense = PARAMS["Conv_0"], PARAMS["Dense_0"]
    return {f"{prefix['Conv_0']}.weight":
            np.ascontiguousarray(conv["kernel"].transpose(3, 2, 0, 1)),
            f"{prefix['Conv_0']}.bias": conv["bias"],
            f"{prefix['Dense_0']}.weight":
            np.ascontiguousarray(dense["kernel"].T),
            f"{prefix['Dense_0']}.bias": dense["bias"]}


def _write_safetensors(path, tensors):
    safetensors.numpy.save_file(tensors, str(path))
    return path


def _write_npz(path, tensors):
    np.savez(path, **tensors)
    return path


def _write_orbax(path, tensors):
    return checkpoints.save_checkpoint(path, tensors, {"model": "torch"})


FORMATS = {"safetensors": (_write_safetensors, load_safetensors, "w.st"),
           "npz": (_write_npz, load_npz, "w.npz"),
           "orbax": (_write_orbax, load_orbax, "ckpt")}


@pytest.fixture(params=sorted(FORMATS))
def source(request, tmp_path):
    """``(write(tensors) -> path, load)`` for each file format."""
    write, load, name = FORMATS[request.param]
    return (lambda tensors: write(tmp_path / name, tensors)), load


def _assert_exact(tree):
    assert jax.tree.structure(tree) == jax.tree.structure(PARAMS)
    for got, want in zip(jax.tree.leaves(tree), jax.tree.leaves(PARAMS)):
        assert isinstance(got, np.ndarray) and got.dtype == want.dtype
        np.testing.assert_array_equal(got, want, strict=True)


def test_torch_layout_import_gives_native_params_and_logits(source):
    write, load = source
    imported = load(write(_torch_tensors()), ABSTRACT, mapping=EXPLICIT)
    _assert_exact(imported)
    native = MODULE.apply({"params": PARAMS}, IMAGES)
    logits = MODULE.apply({"params": imported}, IMAGES)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(native))


def test_torch_mapping_matches_the_explicit_mapping(tmp_path):
    assert torch_mapping(ABSTRACT) == {
        target: entry if isinstance(entry, tuple) else (entry, "identity")
        for target, entry in EXPLICIT.items()}
    path = _write_safetensors(tmp_path / "w.st", _torch_tensors())
    _assert_exact(load_safetensors(path, PARAMS,
                                   mapping=torch_mapping(PARAMS)))


def test_pytorch_layout_forward_by_hand_agrees(tmp_path):
    # The PyTorch semantics computed with numpy from the [O,I,kh,kw] and
    # [out,in] tensors: the layouts mean what the transforms assume.
    torch = _torch_tensors()
    windows = np.lib.stride_tricks.sliding_window_view(IMAGES, (3, 2),
                                                       axis=(1, 2))
    hidden = np.einsum("nijcab,ocab->nijo", windows, torch["Conv_0.weight"])
    hidden = np.maximum(hidden + torch["Conv_0.bias"], 0)
    logits = (hidden.reshape(len(IMAGES), -1) @ torch["Dense_0.weight"].T
              + torch["Dense_0.bias"])
    imported = load_safetensors(
        _write_safetensors(tmp_path / "w.st", torch), PARAMS,
        mapping=torch_mapping(PARAMS))
    np.testing.assert_allclose(MODULE.apply({"params": imported}, IMAGES),
                               logits, rtol=1e-5, atol=1e-5)


def test_torch_mapping_renames_layers(tmp_path):
    names = {"Conv_0": "features.0", "Dense_0": "classifier"}
    path = _write_safetensors(tmp_path / "w.st", _torch_tensors(names))
    mapping = torch_mapping(PARAMS, renames=names)
    assert mapping["Conv_0/kernel"] == ("features.0.weight", "oihw_to_hwio")
    _assert_exact(load_safetensors(path, PARAMS, mapping=mapping))


def test_torch_mapping_nested_layers_norms_and_conv1d():
    tree = {"block": {"Conv_0": {"kernel": np.zeros((3, 2, 5))},
                      "LayerNorm_0": {"scale": np.zeros(5),
                                      "bias": np.zeros(5)}}}
    assert torch_mapping(tree) == {
        "block/Conv_0/kernel": ("block.Conv_0.weight", (2, 1, 0)),
        "block/LayerNorm_0/bias": ("block.LayerNorm_0.bias", "identity"),
        "block/LayerNorm_0/scale": ("block.LayerNorm_0.weight", "identity")}


def test_without_mapping_source_names_are_leaf_paths(source):
    write, load = source
    native = {"Conv_0/kernel": PARAMS["Conv_0"]["kernel"],
              "Conv_0/bias": PARAMS["Conv_0"]["bias"],
              "Dense_0/kernel": PARAMS["Dense_0"]["kernel"],
              "Dense_0/bias": PARAMS["Dense_0"]["bias"]}
    if load is load_orbax:  # Orbax stores the nested tree; paths are the same.
        native = PARAMS
    _assert_exact(load(write(native), ABSTRACT))


def test_orbax_round_trip_of_native_params(tmp_path):
    path = checkpoints.save_checkpoint(tmp_path / "ckpt", PARAMS, {})
    _assert_exact(load_orbax(path, ABSTRACT))


def test_save_then_load_safetensors_round_trip(tmp_path):
    path = save_safetensors(tmp_path / "out.safetensors", PARAMS,
                            mapping=torch_mapping(PARAMS),
                            metadata={"format": "pt"})
    stored = safetensors.numpy.load_file(str(path))
    assert sorted(stored) == sorted(_torch_tensors())
    for name, tensor in _torch_tensors().items():
        np.testing.assert_array_equal(stored[name], tensor, strict=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]
    _assert_exact(load_safetensors(path, ABSTRACT,
                                   mapping=torch_mapping(PARAMS)))


def test_bfloat16_is_kept_or_widened_with_cast(tmp_path):
    half = {"Dense_0": {
        "kernel": np.asarray([[1.5, -2.0]], ml_dtypes.bfloat16),
        "bias": np.asarray([0.25], np.float16)}}
    path = save_safetensors(tmp_path / "half.st", half)
    kept = load_safetensors(path, half)
    assert kept["Dense_0"]["kernel"].dtype == ml_dtypes.bfloat16
    wide = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32),
                        half)
    with pytest.raises(WeightsError, match=r"leaf 'Dense_0/bias': expected "
                       r"dtype float32, found float16.*cast=True"):
        load_safetensors(path, wide)
    widened = load_safetensors(path, wide, cast=True)
    assert widened["Dense_0"]["kernel"].dtype == np.float32
    np.testing.assert_array_equal(widened["Dense_0"]["kernel"], [[1.5, -2.0]])
    np.testing.assert_array_equal(widened["Dense_0"]["bias"], [0.25])


# --- errors -----------------------------------------------------------------

def test_missing_source_tensor_names_leaf_source_and_candidates(source):
    write, load = source
    tensors = _torch_tensors()
    del tensors["Dense_0.bias"]
    with pytest.raises(WeightsError) as error:
        load(write(tensors), ABSTRACT, mapping=EXPLICIT)
    message = str(error.value)
    assert "no source tensor 'Dense_0.bias' for leaf 'Dense_0/bias'" in message
    assert "'Dense_0.weight'" in message and "'Conv_0.bias'" in message


def test_shape_mismatch_names_leaf_shapes_and_transform(source):
    write, load = source
    tensors = _torch_tensors()
    tensors["Dense_0.weight"] = PARAMS["Dense_0"]["kernel"]  # Not transposed.
    with pytest.raises(WeightsError) as error:
        load(write(tensors), ABSTRACT, mapping=EXPLICIT)
    message = str(error.value)
    assert ("leaf 'Dense_0/kernel': expected shape (60, 3), found (3, 60) "
            "from source 'Dense_0.weight' of shape (60, 3) after transform "
            "'out_in_to_in_out'") in message


def test_dtype_mismatch_names_leaf_and_dtypes(source):
    write, load = source
    tensors = _torch_tensors()
    tensors["Conv_0.bias"] = tensors["Conv_0.bias"].astype(np.int32)
    path = write(tensors)
    for cast in (False, True):  # cast widens floats only.
        with pytest.raises(WeightsError, match=r"leaf 'Conv_0/bias': expected "
                           r"dtype float32, found int32 \(source "
                           r"'Conv_0.bias'\)$"):
            load(path, ABSTRACT, mapping=EXPLICIT, cast=cast)


@pytest.mark.parametrize("name", ["safetensors", "npz"])
def test_lossy_float_casts_are_refused_even_with_cast(tmp_path, name):
    write, load, file_name = FORMATS[name]
    tensors = _torch_tensors()
    tensors["Conv_0.bias"] = tensors["Conv_0.bias"].astype(np.float64)
    path = write(tmp_path / file_name, tensors)
    with pytest.raises(WeightsError, match=r"leaf 'Conv_0/bias': expected "
                       r"dtype float32, found float64 \(source "
                       r"'Conv_0.bias'\)$"):
        load(path, ABSTRACT, mapping=EXPLICIT, cast=True)


def test_orbax_float64_narrowed_by_jax_is_refused(tmp_path):
    if jax.config.jax_enable_x64:
        pytest.skip("float64 survives restore_checkpoint with x64 on")
    tensors = _torch_tensors()
    tensors["Conv_0.bias"] = tensors["Conv_0.bias"].astype(np.float64)
    path = _write_orbax(tmp_path / "ckpt", tensors)
    with pytest.warns(UserWarning, match="float64"), pytest.raises(
            WeightsError, match=r"source 'Conv_0.bias' is stored as float64, "
            r"which JAX restores as float32.*wanted by leaf 'Conv_0/bias'"):
        load_orbax(path, ABSTRACT, mapping=EXPLICIT, cast=True)


def test_transform_of_the_wrong_rank_names_the_leaf(source):
    write, load = source
    mapping = dict(EXPLICIT, **{"Conv_0/bias": ("Conv_0.bias",
                                                "oihw_to_hwio")})
    with pytest.raises(WeightsError, match=r"leaf 'Conv_0/bias': transform "
                       r"'oihw_to_hwio' needs a 4-d tensor, but source "
                       r"'Conv_0.bias' has shape \(4,\) \(1-d\)"):
        load(write(_torch_tensors()), ABSTRACT, mapping=mapping)


def test_unused_source_tensors_raise_unless_not_strict(source):
    write, load = source
    tensors = dict(_torch_tensors(), extra=np.zeros(2, np.float32))
    path = write(tensors)
    with pytest.raises(WeightsError, match=r"1 source tensor\(s\) used by no "
                       r"leaf: 'extra'.*strict=False"):
        load(path, ABSTRACT, mapping=EXPLICIT)
    _assert_exact(load(path, ABSTRACT, mapping=EXPLICIT, strict=False))


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_missing_file_names_the_path(tmp_path, name):
    _, load, file_name = FORMATS[name]
    with pytest.raises(FileNotFoundError, match=str(tmp_path / file_name)):
        load(tmp_path / file_name, ABSTRACT)


@pytest.mark.parametrize("load,content", [
    (load_safetensors, b"garbage"),
    (load_safetensors, b"truncate"),
    (load_npz, b"PK\x03\x04 not a zip"),
])
def test_unreadable_file_names_the_path(tmp_path, load, content):
    path = tmp_path / "bad"
    if content == b"truncate":
        whole = safetensors.numpy.save(_torch_tensors())
        content = whole[:len(whole) - 10]
    path.write_bytes(content)
    with pytest.raises(WeightsError, match=f"^{path}: not a readable"):
        load(path, ABSTRACT, mapping=EXPLICIT)


def test_npy_instead_of_npz_is_refused(tmp_path):
    path = tmp_path / "single.npy"
    np.save(path, np.zeros(3))
    with pytest.raises(WeightsError, match=f"{path}: holds a single array"):
        load_npz(path, ABSTRACT)


def test_corrupted_orbax_checkpoint_is_a_weights_error(tmp_path):
    path = checkpoints.save_checkpoint(tmp_path / "ckpt", PARAMS, {})
    array_file = max((p for p in (path / "0" / "params").rglob("*")
                      if p.is_file() and p.parent.name == "d"),
                     key=lambda p: p.stat().st_size)
    array_file.write_bytes(array_file.read_bytes()[:-8])
    with pytest.raises(WeightsError, match=str(path)):
        load_orbax(path, ABSTRACT)


def test_mapping_keys_that_are_not_leaves_are_listed(tmp_path):
    path = _write_safetensors(tmp_path / "w.st", _torch_tensors())
    mapping = dict(EXPLICIT, **{"Conv_0/weight": "Conv_0.weight",
                                "Dense_1/kernel": "Dense_1.weight"})
    with pytest.raises(WeightsError, match=r"not leaves of the expected tree: "
                       r"'Conv_0/weight', 'Dense_1/kernel'; leaves are "
                       r".*'Conv_0/kernel'"):
        load_safetensors(path, ABSTRACT, mapping=mapping)


@pytest.mark.parametrize("transform,message", [
    ("hwio", r"unknown transform 'hwio'; use one of 'identity'"),
    ((0, 0), r"transform \(0, 0\) is neither a named layout nor a "
             r"permutation"),
])
def test_bad_transforms_name_the_leaf(tmp_path, transform, message):
    path = _write_safetensors(tmp_path / "w.st", _torch_tensors())
    mapping = dict(EXPLICIT, **{"Dense_0/kernel": ("Dense_0.weight",
                                                   transform)})
    with pytest.raises(WeightsError, match=r"mapping\['Dense_0/kernel'\]: .*"
                       + message):
        load_safetensors(path, ABSTRACT, mapping=mapping)


def test_bad_renames_and_kernels_are_refused():
    with pytest.raises(WeightsError, match=r"renames names paths that are not "
                       r"layers of the expected tree: 'Conv_1'"):
        torch_mapping(PARAMS, renames={"Conv_1": "features.0"})
    with pytest.raises(WeightsError, match=r"leaf 'Dense_0/kernel': no "
                       r"PyTorch layout for a 1-d kernel"):
        torch_mapping({"Dense_0": {"kernel": np.zeros(3)}})


def test_save_refuses_clashing_names_and_wrong_ranks(tmp_path):
    with pytest.raises(WeightsError, match=r"leaves 'Conv_0/bias' and "
                       r"'Dense_0/bias' both map to source name 'bias'"):
        save_safetensors(tmp_path / "x.st", PARAMS, mapping={
            "Conv_0/bias": "bias", "Dense_0/bias": "bias"})
    with pytest.raises(WeightsError, match=r"leaf 'Dense_0/bias': transform "
                       r"'out_in_to_in_out' needs a 2-d tensor"):
        save_safetensors(tmp_path / "x.st", PARAMS, mapping={
            "Dense_0/bias": ("b", "out_in_to_in_out")})
    assert not list(tmp_path.iterdir())


def test_malformed_entries_and_leaves_are_named(tmp_path):
    path = _write_safetensors(tmp_path / "w.st", _torch_tensors())
    with pytest.raises(WeightsError, match=r"mapping\['Dense_0/bias'\] must "
                       r"be a source name or a \(source name, transform\) "
                       r"pair, not 3"):
        load_safetensors(path, ABSTRACT, mapping=dict(EXPLICIT, **{
            "Dense_0/bias": 3}))
    with pytest.raises(WeightsError, match=r"expected leaf 'Dense_0/bias' is "
                       r"'oops', not an array"):
        load_safetensors(path, {"Dense_0": {"bias": "oops"}})


def test_npz_object_arrays_are_refused_naming_array_and_leaf(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, bias=np.asarray([1, "a"], dtype=object))
    with pytest.raises(WeightsError, match=rf"^{path}: cannot read array "
                       r"'bias' .*; wanted by leaf 'bias'$"):
        load_npz(path, {"bias": jax.ShapeDtypeStruct((2,), jnp.float32)})
