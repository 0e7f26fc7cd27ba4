"""The PyTorch baseline: the seed's LeNet-5 and its seed loops.

Shared by the benchmarks (W1 here in ``bench_sweep.py``, the recovery
benchmark W2 imports it too). PyTorch is optional (the ``bench`` extra:
``pip install -e '.[bench]'``); nothing in ``recovjax/`` imports this file.

Weights come from recovjax parameters, so both sides evaluate the same
network on the same data:

* conv kernels are ``HWIO`` in recovjax and ``OIHW`` in PyTorch;
* recovjax flattens the last feature map in NHWC order ``(h, w, c)``,
  PyTorch in NCHW order ``(c, h, w)``. The rows of ``fc1`` are permuted
  once at load time, so the PyTorch model stays the plain seed model
  (``x.flatten(1)`` on NCHW) and pays no transpose per batch.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class TorchLeNet5(nn.Module):
    """conv 6@5x5 - pool - conv 16@5x5 - pool - 120 - 84 - classes (ReLU)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 4 * 4, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def _tensor(array: Any) -> torch.Tensor:
    return torch.from_numpy(np.array(array, dtype=np.float32, copy=True))


def lenet_from_params(params: Mapping[str, Any]) -> TorchLeNet5:
    """A :class:`TorchLeNet5` holding recovjax LeNet-5 parameters.

    Args:
        params: recovjax ``lenet5`` parameters (``conv1/kernel`` HWIO, ...),
            JAX or NumPy arrays.

    Returns:
        The PyTorch model in eval mode; its logits equal recovjax's up to
        float rounding.
    """
    num_classes = int(np.shape(params["fc3"]["bias"])[0])
    model = TorchLeNet5(num_classes)
    fc1 = np.asarray(params["fc1"]["kernel"])  # [(h, w, c), out]
    height = width = 4
    channels = fc1.shape[0] // (height * width)
    fc1_nchw = fc1.reshape(height, width, channels, -1).transpose(
        2, 0, 1, 3).reshape(fc1.shape[0], -1)  # [(c, h, w), out]
    state = {
        "conv1.weight": _tensor(np.asarray(params["conv1"]["kernel"])
                                .transpose(3, 2, 0, 1)),
        "conv1.bias": _tensor(params["conv1"]["bias"]),
        "conv2.weight": _tensor(np.asarray(params["conv2"]["kernel"])
                                .transpose(3, 2, 0, 1)),
        "conv2.bias": _tensor(params["conv2"]["bias"]),
        "fc1.weight": _tensor(fc1_nchw.T),
        "fc1.bias": _tensor(params["fc1"]["bias"]),
        "fc2.weight": _tensor(np.asarray(params["fc2"]["kernel"]).T),
        "fc2.bias": _tensor(params["fc2"]["bias"]),
        "fc3.weight": _tensor(np.asarray(params["fc3"]["kernel"]).T),
        "fc3.bias": _tensor(params["fc3"]["bias"]),
    }
    model.load_state_dict(state)
    return model.eval()


def torch_data(images: np.ndarray, labels: np.ndarray
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """NHWC float32 images and int labels as NCHW / int64 torch tensors."""
    x = torch.from_numpy(np.ascontiguousarray(
        np.asarray(images, np.float32).transpose(0, 3, 1, 2)))
    y = torch.from_numpy(np.asarray(labels, np.int64))
    return x, y


@torch.no_grad()
def evaluate_torch(model: nn.Module, images: torch.Tensor,
                   labels: torch.Tensor, batch_size: int = 100
                   ) -> tuple[float, float]:
    """Accuracy and mean cross-entropy over all examples, in batches.

    Args:
        model: the network.
        images: ``[N, C, H, W]``.
        labels: ``int64[N]``.
        batch_size: examples per forward pass (the last batch may be short).

    Returns:
        ``(accuracy, loss)``.
    """
    correct, loss = 0, 0.0
    for start in range(0, len(labels), batch_size):
        logits = model(images[start:start + batch_size])
        target = labels[start:start + batch_size]
        correct += int((logits.argmax(1) == target).sum())
        loss += float(F.cross_entropy(logits, target, reduction="sum"))
    return correct / len(labels), loss / len(labels)


@torch.no_grad()
def zero_fraction_(model: nn.Module, ratio: float,
                   generator: torch.Generator) -> nn.Module:
    """Zero exactly ``floor(n * ratio)`` random entries of every tensor.

    Args:
        model: modified in place.
        ratio: fraction in ``[0, 1]``.
        generator: the random source (one per seed).

    Returns:
        ``model``.
    """
    for tensor in model.parameters():
        count = int(math.floor(tensor.numel() * ratio))
        chosen = torch.randperm(tensor.numel(), generator=generator)[:count]
        tensor.view(-1)[chosen] = 0.0
    return model


def zero_seed_loop(model: nn.Module, ratios: Iterable[float],
                   seeds: Iterable[int], images: torch.Tensor,
                   labels: torch.Tensor, batch_size: int = 100
                   ) -> list[tuple[float, int, float, float]]:
    """The seed's loop: copy, damage, evaluate, for every (ratio, seed).

    Args:
        model: the pretrained network (left untouched).
        ratios: damage ratios.
        seeds: seeds (one ``torch.Generator`` seeded with each).
        images: evaluation images ``[N, C, H, W]``.
        labels: evaluation labels.
        batch_size: evaluation batch size.

    Returns:
        ``[(ratio, seed, accuracy, loss), ...]`` in loop order.
    """
    seeds = list(seeds)
    out = []
    for ratio in ratios:
        for seed in seeds:
            generator = torch.Generator().manual_seed(int(seed))
            damaged = zero_fraction_(copy.deepcopy(model), float(ratio),
                                     generator)
            accuracy, loss = evaluate_torch(damaged, images, labels,
                                            batch_size)
            out.append((float(ratio), int(seed), accuracy, loss))
    return out
