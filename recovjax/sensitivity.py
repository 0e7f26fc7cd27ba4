"""Sensitivity maps: which layer is fragile, at which amount of damage.

:func:`sensitivity` damages one layer at a time, at each amount and seed,
and evaluates the model: a layer x amount table of the metric, in the shape
of NNI's ``SensitivityAnalysis`` but vectorised. Every (layer, amount,
seed) point is a *one-hot amount tree*, the amount on the layer's leaves
and ``0.0`` on every other leaf (the damage operators' per-leaf amounts,
see :mod:`recovjax.damage.params`), so all points share one compiled
program and run on the one runner of :mod:`recovjax.runner`; each is
damaged from its key inside the program.

Keys: point ``(layer, amount index, seed)`` uses the sweep's key of
``(damage, amount index, seed)`` (:func:`recovjax.sweep.point_key`), the
same for every layer, so the layers are compared on common random numbers:
a point damages its layer exactly as the whole-model sweep's point of that
amount and seed damages that layer (the same entries, the same draws) and
leaves every other layer intact.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recovjax import runner
from recovjax._types import PRNGKey, Params
from recovjax.damage.scope import leaf_paths
from recovjax.models.adapter import check_params, require_model
from recovjax.results import ResultsTable
from recovjax.sweep import api as sweep_api
from recovjax.sweep.keys import _root, point_keys
from recovjax.sweep.program import point_fn


@dataclasses.dataclass
class SensitivityResult:
    """What :func:`sensitivity` returns.

    Attributes:
        table: the tidy :class:`~recovjax.results.ResultsTable`: stage
            ``damaged`` rows with a ``layer`` column, and the clean model's
            rows (layer ``""``).
        layers: the layers, in the order of the map's rows.
        amounts: the amounts, in the order of its columns.
        seconds: wall time (compilation included).
    """

    table: ResultsTable
    layers: list[str]
    amounts: list[float]
    seconds: float

    def grid(self, metric: str = "accuracy") -> np.ndarray:
        """``float64[layers, amounts]``: the metric's mean over seeds.

        Raises:
            KeyError: for a metric the rows do not have.
        """
        values: dict[tuple[str, float], list[float]] = {}
        for row in self.table.rows:
            if row["stage"] == "damaged" and row["metric"] == metric:
                values.setdefault((row["layer"], row["ratio"]), []).append(
                    row["value"])
        if not values:
            raise KeyError(f"metric {metric!r} is not in the results")
        return np.asarray([[np.mean(values[(layer, amount)])
                            for amount in self.amounts]
                           for layer in self.layers])


def model_layers(model) -> list[str]:
    """The layers holding a kernel, in the order of the parameter leaves."""
    layers: list[str] = []
    for path, info in model.infos.items():
        if info.role == "kernel" and info.layer not in layers:
            layers.append(info.layer)
    return layers


def _layer_leaves(model, params: Params, layers: Sequence[str]
                  ) -> dict[str, list[str]]:
    infos = model.infos
    paths = leaf_paths(params)
    known = {infos[path].layer for path in paths}
    unknown = [layer for layer in layers if layer not in known]
    if unknown:
        raise ValueError(f"layers: {unknown[0]!r} is not a layer of the "
                         f"model; its layers: {', '.join(sorted(known))}")
    return {layer: [path for path in paths if infos[path].layer == layer]
            for layer in layers}


def sensitivity(model, params: Params, damage: Any, amounts: Sequence[float],
                *, layers: Sequence[str] | None = None,
                seeds: int | Sequence[int] = 1, data: Any,
                root_key: PRNGKey | int = 0, damage_name: str | None = None,
                batch_size: int = sweep_api.DEFAULT_BATCH_SIZE,
                group_size: int = 1, devices: Sequence | None = None
                ) -> SensitivityResult:
    """Damage one layer at a time and evaluate: a layer x amount map.

    Args:
        model: a :class:`~recovjax.models.Model`.
        params: its (pretrained) parameters.
        damage: a parameter-damage operator name (``"gaussian_noise"``) or
            an operator that takes per-leaf amounts.
        amounts: the amounts of the map's columns.
        layers: layer ids (``LeafInfo.layer``, e.g. ``"Conv_0"``); default
            every layer holding a kernel (:func:`model_layers`).
        seeds: a count or the seed values, as for :func:`recovjax.sweep`.
        data: evaluation data, as for :func:`recovjax.sweep`.
        root_key: the root key, or its int seed.
        damage_name: the name in results and keys (default: ``damage`` when
            it is a name, else required).
        batch_size: evaluation batch size.
        group_size: points per ``vmap`` group on a device.
        devices: devices to spread the points over; default all.

    Returns:
        :class:`SensitivityResult`; ``result.grid("accuracy")`` is the map.

    Raises:
        ValueError: an unknown layer (the message lists the model's), an
            operator without per-leaf amounts, bad amounts or seeds (as
            :func:`recovjax.sweep`), a missing ``damage_name``.
    """
    start = time.perf_counter()
    require_model(model)
    check_params(model, params)
    if isinstance(damage, str):
        damage_name = damage_name or damage
        damage = sweep_api._registered(damage)
    if damage_name is None:
        raise ValueError("damage_name is needed when damage is an operator")
    damage = getattr(damage, "unchecked", damage)
    if not getattr(damage, "per_leaf_amounts", False):
        raise ValueError(f"damage: {damage_name!r} takes one scalar amount; "
                         "a sensitivity map needs a parameter-damage "
                         "operator with per-leaf amounts")
    root, root_seed = _root(root_key)
    values = sweep_api._ratios(amounts)
    sweep_api._check_fractions({damage_name: damage}, values)
    seed_values = sweep_api._seeds(seeds)
    batches = sweep_api._batches(data, batch_size)
    sweep_api._check_data(model, batches)
    chosen = model_layers(model) if layers is None else list(layers)
    if not chosen:
        raise ValueError("layers: the model has no layer with a kernel; "
                         "name the layers")
    members = _layer_leaves(model, params, chosen)
    paths = leaf_paths(params)

    grid = [(layer, index, seed) for layer in chosen
            for index in range(len(values)) for seed in seed_values]
    keys = point_keys(root, damage_name, [index for _, index, _ in grid],
                      [seed for _, _, seed in grid])
    one_hot = {path: np.asarray(
        [values[index] if path in members[layer] else 0.0
         for layer, index, _ in grid], np.float32) for path in paths}
    # The clean model rides along as one more point, flagged.
    clean = np.zeros((len(grid) + 1,), np.bool_)
    clean[-1] = True
    keys = jnp.concatenate([keys, keys[-1:]])
    one_hot = {path: np.concatenate([column, column[-1:]])
               for path, column in one_hot.items()}
    device_list = runner.devices_of(devices)
    program = runner.map_points(point_fn(model, damage, None),
                                group_size=group_size, devices=device_list)
    _, replicated = runner.shardings(device_list)
    shared = runner.place((params, batches), replicated)
    host = jax.tree.map(np.asarray, jax.device_get(
        program((keys, one_hot, clean), shared)))

    rows = []
    for position, (layer, index, seed) in enumerate(grid):
        one = jax.tree.map(lambda x: x[position], host)
        rows.extend(dict(row, layer=layer) for row in sweep_api._rows(
            one, damage=damage_name, ratio=values[index], seed=seed,
            stage="damaged"))
    rows.extend(sweep_api._rows(jax.tree.map(lambda x: x[len(grid)], host),
                                damage=sweep_api.CLEAN, ratio=0.0, seed=0,
                                stage="clean"))
    table = ResultsTable(
        rows=rows, config={"kind": "sensitivity", "damage": damage_name,
                           "layers": chosen, "amounts": values,
                           "seeds": seed_values, "model": model.name},
        root_seed=root_seed, versions=sweep_api.library_versions(),
        device_kind=sweep_api.device_description(device_list))
    return SensitivityResult(table=table, layers=chosen, amounts=values,
                             seconds=time.perf_counter() - start)


__all__ = ["SensitivityResult", "model_layers", "sensitivity"]
