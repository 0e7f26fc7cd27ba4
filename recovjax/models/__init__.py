"""Models: Flax networks exposed as pure ``init``/``apply`` pairs."""

from recovjax.models.layers import (conv2d, conv_relu_pool,
                                    conv_relu_pool_stack, extract_patches,
                                    max_pool_2x2)
from recovjax.models.registry import Model, get_model, model_names

__all__ = [
    "Model",
    "conv2d",
    "conv_relu_pool",
    "conv_relu_pool_stack",
    "extract_patches",
    "get_model",
    "max_pool_2x2",
    "model_names",
]
