"""Models: one adapter (:class:`Model`) for any JAX model, and the registry.

Build a :class:`Model` from your own network with :func:`from_linen`,
:func:`from_nnx`, :func:`from_equinox` (the ``equinox`` extra) or
:func:`from_apply`; the built-in networks (:func:`get_model`) are linen
modules wrapped the same way.
"""

from recovjax.models._equinox import from_equinox
from recovjax.models._linen import from_linen
from recovjax.models._nnx import from_nnx
from recovjax.models.adapter import Model, TreeLayout, check_params, from_apply
from recovjax.models.info import (ROLES, InfoError, LeafInfo, info_tree,
                                  register_layer)
from recovjax.models.layers import (conv2d, conv_relu_pool,
                                    conv_relu_pool_stack, extract_patches,
                                    max_pool_2x2)
from recovjax.models.registry import (BUILT_IN, get_model, model_names,
                                      pretrained_loader, register_model)

__all__ = [
    "BUILT_IN",
    "InfoError",
    "LeafInfo",
    "Model",
    "ROLES",
    "TreeLayout",
    "check_params",
    "conv2d",
    "conv_relu_pool",
    "conv_relu_pool_stack",
    "extract_patches",
    "from_apply",
    "from_equinox",
    "from_linen",
    "from_nnx",
    "get_model",
    "info_tree",
    "max_pool_2x2",
    "model_names",
    "register_layer",
    "pretrained_loader",
    "register_model",
]
