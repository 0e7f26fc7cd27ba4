"""Models as pure ``init``/``apply`` pairs, and the registry of names."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import flax.linen as nn
import jax

from recovjax._types import Array, Params, PRNGKey
from recovjax.models import networks


@dataclasses.dataclass(frozen=True)
class Model:
    """A network as a pair of pure functions.

    Attributes:
        name: registry name.
        init: ``init(key, sample) -> params``; ``sample`` is a batch of inputs
            (``[N, H, W, C]``) that fixes shapes.
        apply: ``apply(params, x) -> logits``.
        num_classes: size of the output layer.
    """

    name: str
    init: Callable[[PRNGKey, Array], Params]
    apply: Callable[[Params, Array], Array]
    num_classes: int

    def abstract_params(self, sample: Array | jax.ShapeDtypeStruct
                        ) -> Params:
        """Shapes and dtypes of the parameters, without computing them.

        Args:
            sample: an input batch, or its ``jax.ShapeDtypeStruct``.

        Returns:
            The parameter tree with ``jax.ShapeDtypeStruct`` leaves. Nothing
            is computed or compiled: the initialiser (key included) is only
            traced.
        """
        sample = jax.ShapeDtypeStruct(sample.shape, sample.dtype)
        return jax.eval_shape(
            lambda x: self.init(jax.random.key(0), x), sample)


def _from_module(name: str, module: nn.Module, num_classes: int) -> Model:
    def init(key: PRNGKey, sample: Array) -> Params:
        return module.init(key, sample)["params"]

    def apply(params: Params, x: Array) -> Array:
        return module.apply({"params": params}, x)

    init.__doc__ = f"Initialise {name} parameters from ``key``."
    apply.__doc__ = f"Logits of {name} for a batch ``x``."
    return Model(name=name, init=init, apply=apply, num_classes=num_classes)


_FACTORIES: dict[str, Callable[[int], nn.Module]] = {
    "lenet5": lambda k: networks.LeNet5(num_classes=k),
    "mlp": lambda k: networks.MLP(num_classes=k),
    "rescnn": lambda k: networks.ResCNN(num_classes=k),
    "vit": lambda k: networks.ViT(num_classes=k),
}


def model_names() -> tuple[str, ...]:
    """Names accepted by :func:`get_model`."""
    return tuple(_FACTORIES)


def get_model(name: str, num_classes: int = 10) -> Model:
    """Look up a model by name.

    Args:
        name: one of :func:`model_names` (``lenet5``, ``mlp`` = LeNet-300-100,
            ``rescnn`` = residual CNN with 4 blocks, ``vit`` = small ViT).
        num_classes: size of the output layer.

    Returns:
        A :class:`Model`. The same object for the same arguments, so that
        every ``jax.jit`` keyed on its functions compiles once per process.

    Raises:
        ValueError: for an unknown name (the message lists valid names) or a
            non-positive ``num_classes``.
    """
    if name not in _FACTORIES:
        raise ValueError(f"unknown model {name!r}; valid names: "
                         f"{', '.join(model_names())}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    return _cached_model(name, int(num_classes))


@functools.lru_cache(maxsize=None)
def _cached_model(name: str, num_classes: int) -> Model:
    return _from_module(name, _FACTORIES[name](num_classes), num_classes)
