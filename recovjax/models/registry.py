"""The registry of model names: the built-in networks and the user's own.

A registered name maps to a *factory* ``factory(num_classes, sample) ->
Model`` that defines the model (see :mod:`recovjax.models.adapter`). The
built-in networks are ordinary entries: Flax linen modules wrapped by
:func:`~recovjax.models.from_linen`, like any user's linen model.
:func:`get_model` returns the definition with *abstract* parameters (shapes
and dtypes only): ``model.init(key)`` draws fresh ones and
``model.with_params(params)`` holds given ones (from the zoo or a
checkpoint), sharing one ``forward`` so compiled programs are reused.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from recovjax.models import info as info_lib
from recovjax.models import layers, networks
from recovjax.models._linen import from_linen
from recovjax.models.adapter import Model, as_sample

ModelFactory = Callable[[int, jax.ShapeDtypeStruct], Model]
"""``factory(num_classes, sample) -> Model``."""

DEFAULT_SAMPLE = jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32)
"""The input the built-in networks are defined for: one 28x28 grey image."""

# The shipped layers' parameters, declared like any user's module types.
for _conv in (layers.Conv, layers.ConvParams):
    info_lib.register_layer(_conv, {
        "kernel": info_lib.channels_last_conv_kernel,
        "bias": info_lib.features_bias})
info_lib.register_layer(networks.ViT, {"position": info_lib.OTHER})


def linen_factory(name: str, module: Callable[[int], nn.Module]
                  ) -> ModelFactory:
    """A factory for a linen module class: ``module(num_classes)``.

    Args:
        name: the model's name.
        module: ``module(num_classes) -> flax.linen.Module``.

    Returns:
        ``factory(num_classes, sample) -> Model`` with abstract parameters.
    """

    def factory(num_classes: int, sample: jax.ShapeDtypeStruct) -> Model:
        network = module(num_classes)
        variables = jax.eval_shape(
            lambda: network.init(jax.random.key(0), jnp.zeros(
                sample.shape, sample.dtype)))
        return from_linen(network, variables, sample=sample, name=name)

    return factory


_FACTORIES: dict[str, ModelFactory] = {
    "lenet5": linen_factory("lenet5", lambda k: networks.LeNet5(num_classes=k)),
    "mlp": linen_factory("mlp", lambda k: networks.MLP(num_classes=k)),
    "rescnn": linen_factory("rescnn", lambda k: networks.ResCNN(num_classes=k)),
    "vit": linen_factory("vit", lambda k: networks.ViT(num_classes=k)),
    "resnet18": linen_factory("resnet18",
                              lambda k: networks.ResNet18(num_classes=k)),
}
BUILT_IN = tuple(_FACTORIES)
"""The networks recovjax ships (``lenet5``, ``mlp``, ``rescnn``, ``vit``,
``resnet18``)."""


PretrainedLoader = Callable[..., Any]
"""``loader(model, *, seed, zoo_dir, data_dir, progress) -> path``: the
verified Orbax checkpoint of ``model``'s pretrained weights (pretraining it
on first use)."""

_PRETRAINED: dict[str, PretrainedLoader] = {}


def register_model(name: str, factory: ModelFactory, *,
                   overwrite: bool = False,
                   pretrained: PretrainedLoader | None = None) -> None:
    """Register a model under a name that configs and the CLI can use.

    Args:
        name: the name (letters, digits, ``_``, ``-``, ``.``).
        factory: ``factory(num_classes, sample) -> Model``; the returned
            model's parameters may be abstract (see :func:`get_model`).
        overwrite: replace an existing registration.
        pretrained: where a config naming this model without ``weights``
            gets its pretrained weights: ``pretrained(model, *, seed,
            zoo_dir, data_dir, progress) -> checkpoint directory`` for the
            definition ``model`` (built for the config's data). ``None``:
            the zoo pretrains it as an image classifier on the config's
            dataset.

    Raises:
        ValueError: for an empty or malformed name, or a name already
            registered (unless ``overwrite``); built-in names cannot be
            replaced.
        TypeError: if ``factory`` is not callable.
    """
    _check_name(name)
    if not callable(factory):
        raise TypeError(f"factory must be callable, got "
                        f"{type(factory).__name__}")
    if name in BUILT_IN or (name in _FACTORIES and not overwrite):
        raise ValueError(f"model {name!r} is already registered"
                         + ("" if name in BUILT_IN else
                            "; pass overwrite=True to replace it"))
    if pretrained is not None and not callable(pretrained):
        raise TypeError(f"pretrained must be callable, got "
                        f"{type(pretrained).__name__}")
    _FACTORIES[name] = factory
    _PRETRAINED.pop(name, None)
    if pretrained is not None:
        _PRETRAINED[name] = pretrained
    _cached_model.cache_clear()


def pretrained_loader(name: str) -> PretrainedLoader | None:
    """The pretrained-weights loader registered with ``name``, or None."""
    return _PRETRAINED.get(name)


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name or not all(
            ch.isalnum() or ch in "_-." for ch in name):
        raise ValueError(f"a model name must be a non-empty string of "
                         f"letters, digits, '_', '-' and '.', got {name!r}")


def model_names() -> tuple[str, ...]:
    """Names accepted by :func:`get_model`."""
    return tuple(_FACTORIES)


def get_model(name: str, num_classes: int = 10, *, sample: Any = None
              ) -> Model:
    """The definition of a registered model.

    Args:
        name: one of :func:`model_names` (``lenet5``, ``mlp`` =
            LeNet-300-100, ``rescnn`` = residual CNN with 4 blocks, ``vit``
            = small ViT, ``resnet18`` = ResNet-18 with batch norm, 11.2 M
            parameters, and any registered with :func:`register_model`).
        num_classes: size of the output layer.
        sample: an input batch or its shape struct (default: one 28x28
            grey image, :data:`DEFAULT_SAMPLE`).

    Returns:
        A :class:`Model` with abstract parameters (and abstract state, for
        a model with batch statistics such as ``resnet18``: give it the
        state trained with its weights, e.g. ``load_pretrained(...)
        .attach(model)``); the same object for the same arguments, so that
        programs compiled for its ``forward`` are compiled once per
        process.

    Raises:
        ValueError: for an unknown name (the message lists valid names) or
            a non-positive ``num_classes``.
    """
    if name not in _FACTORIES:
        raise ValueError(f"unknown model {name!r}; valid names: "
                         f"{', '.join(model_names())}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or (
            num_classes < 1):
        raise ValueError(f"num_classes must be a positive int, got "
                         f"{num_classes!r}")
    sample = DEFAULT_SAMPLE if sample is None else as_sample(sample)
    sample = jax.ShapeDtypeStruct((1,) + tuple(sample.shape[1:]),
                                  sample.dtype)
    return _cached_model(name, int(num_classes), sample)


@functools.lru_cache(maxsize=None)
def _cached_model(name: str, num_classes: int,
                  sample: jax.ShapeDtypeStruct) -> Model:
    model = _FACTORIES[name](num_classes, sample)
    if not isinstance(model, Model):
        raise TypeError(f"the factory of model {name!r} returned "
                        f"{type(model).__name__}, not a recovjax Model")
    return model
