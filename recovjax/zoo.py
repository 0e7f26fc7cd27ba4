"""Check and repair the zoo of pretrained checkpoints.

The zoo (``~/.cache/recovjax/zoo`` or ``$RECOVJAX_CACHE_DIR/zoo``) holds one
Orbax checkpoint per (model, dataset, seed, recipe version), named
``<model>-<dataset>-seed<seed>-r<recipe>`` and written by
:func:`recovjax.pretrain.load_pretrained`. It is a cache: a damaged entry
can always be pretrained again, with the same seed and so the same weights
on the same machine. :func:`verify_zoo` lists the damaged entries;
:func:`repair_zoo` moves each aside (to ``<entry>.corrupt-<UTC time>``,
never deleting it) and rebuilds it.

Example::

    from recovjax.zoo import repair_zoo, verify_zoo

    for path, problem in verify_zoo():
        print(path, problem)
    repair_zoo()

On the command line: ``recovjax zoo verify`` and ``recovjax zoo repair``
(exit status 2 when any entry was damaged, with one line per entry).
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
from typing import NamedTuple

from recovjax import _paths, checkpoints
from recovjax._io import move_aside
from recovjax.models import get_model, model_names
from recovjax.pretrain import RECIPE_VERSION, load_pretrained, zoo_sample

logger = logging.getLogger(__name__)

ENTRY_NAME = re.compile(r"^(?P<model>[A-Za-z0-9_]+)-(?P<dataset>[A-Za-z0-9_]+)"
                        r"-seed(?P<seed>[0-9]+)-r(?P<recipe>[0-9]+)$")
"""How :func:`recovjax.pretrain.zoo_path` names an entry."""

_SAMPLE_FREE = ("mnist5k", "mnist", "fashion_mnist")
"""Datasets whose input shape is known without reading them."""


class ZooProblem(NamedTuple):
    """A zoo entry that cannot be used, and why.

    Attributes:
        path: the entry's checkpoint directory.
        problem: one line saying what is wrong.
    """

    path: pathlib.Path
    problem: str


class ZooRepair(NamedTuple):
    """What :func:`repair_zoo` did with one damaged entry.

    Attributes:
        path: the entry's checkpoint directory.
        problem: what was wrong with it.
        moved_to: where the damaged checkpoint now is.
        rebuilt: whether the entry was pretrained again (entries of an older
            recipe version are only moved aside: nothing reads them).
    """

    path: pathlib.Path
    problem: str
    moved_to: pathlib.Path
    rebuilt: bool


def zoo_entries(zoo_dir: os.PathLike[str] | str | None = None
                ) -> list[pathlib.Path]:
    """The entries of the zoo, sorted by name.

    Entries moved aside (``*.corrupt-*``), unfinished saves (hidden
    ``.<name>.*.tmp`` directories) and anything not named like an entry are
    left out.

    Args:
        zoo_dir: zoo root (default ``~/.cache/recovjax/zoo``).

    Returns:
        The entry directories; empty when the zoo does not exist yet.
    """
    root = _paths.zoo_dir(zoo_dir)
    if not root.is_dir():
        return []
    return sorted(child for child in root.iterdir()
                  if child.is_dir() and ENTRY_NAME.match(child.name))


def _reason(error: Exception, path: pathlib.Path) -> str:
    text = " ".join(str(error).split())
    prefix = f"{path}: "
    return text[len(prefix):] if text.startswith(prefix) else text


def check_entry(path: os.PathLike[str] | str, *, data_dir=None) -> str | None:
    """What is wrong with one zoo entry, or ``None`` if it is intact.

    Every file is checked against the size and SHA-256 in the checkpoint's
    file list (see :func:`recovjax.checkpoints.file_problems`), the stored
    tree against the model's parameters and, for a model with state (batch
    statistics), the stored state against the model's, every leaf against
    its SHA-256 and the metadata against the entry's name.

    Args:
        path: the entry directory.
        data_dir: data directory, for datasets whose input shape is only
            known from their files.

    Returns:
        One line describing the problem, or ``None``.
    """
    path = pathlib.Path(path).expanduser().absolute()
    match = ENTRY_NAME.match(path.name)
    if match is None:
        return ("not named like a zoo entry "
                "(<model>-<dataset>-seed<seed>-r<recipe>)")
    model, dataset = match["model"], match["dataset"]
    if model not in model_names():
        return f"unknown model {model!r}"
    try:
        checkpoints.verify_files(path, contents=True)
        if dataset in _SAMPLE_FREE:
            definition = get_model(model, sample=zoo_sample(dataset))
            expected = definition.abstract_params()
            expected_state = definition.state
        else:  # Integrity only: the input shape would need the dataset.
            expected = checkpoints.stored_structure(path)
            expected_state = checkpoints.stored_structure(path, state=True)
        _, metadata = checkpoints.restore_checkpoint(path, expected)
        checkpoints.restore_state(path, expected_state)
    except checkpoints.CheckpointError as error:
        return _reason(error, path)
    named = {"model": model, "dataset": dataset, "seed": int(match["seed"]),
             "recipe_version": int(match["recipe"])}
    for key, value in named.items():
        if metadata.get(key) != value:
            return (f"metadata says {key} {metadata.get(key)!r}, the name "
                    f"says {value!r}")
    return None


def verify_zoo(zoo_dir: os.PathLike[str] | str | None = None, *,
               data_dir=None) -> list[ZooProblem]:
    """Every damaged entry of the zoo, with what is wrong with it.

    Reads every entry in full (see :func:`check_entry`); changes nothing.

    Args:
        zoo_dir: zoo root (default ``~/.cache/recovjax/zoo``).
        data_dir: data directory (see :func:`check_entry`).

    Returns:
        ``[(path, problem), ...]`` as :class:`ZooProblem`, sorted by path;
        empty when every entry is intact (or the zoo is empty).
    """
    problems = []
    for path in zoo_entries(zoo_dir):
        problem = check_entry(path, data_dir=data_dir)
        if problem is not None:
            problems.append(ZooProblem(path, problem))
    return problems


def repair_zoo(zoo_dir: os.PathLike[str] | str | None = None, *,
               data_dir=None, progress: bool = False) -> list[ZooRepair]:
    """Move every damaged entry aside and pretrain it again.

    Each damaged entry is renamed to ``<entry>.corrupt-<UTC time>`` next to
    it (nothing is deleted) and, if it belongs to the current recipe
    version, rebuilt by :func:`~recovjax.pretrain.load_pretrained` with its
    seed. Each move is logged on the ``recovjax.zoo`` logger in one line
    naming both paths. Intact entries saved before checkpoints listed their
    files get their file list.

    Args:
        zoo_dir: zoo root (default ``~/.cache/recovjax/zoo``).
        data_dir: data directory for pretraining.
        progress: show progress bars while pretraining.

    Returns:
        One :class:`ZooRepair` per damaged entry; empty when all were intact.

    Raises:
        Whatever pretraining raises (e.g. a dataset that is not prepared);
        the damaged entry has then already been moved aside.
    """
    problems = {problem.path: problem.problem
                for problem in verify_zoo(zoo_dir, data_dir=data_dir)}
    for path in zoo_entries(zoo_dir):
        if path not in problems and not (
                path / checkpoints.FILES_MANIFEST).is_file():
            checkpoints.record_files(path)
    repairs = []
    for path, problem in sorted(problems.items()):
        moved = move_aside(path)
        match = ENTRY_NAME.match(path.name)
        rebuild = (match is not None and int(match["recipe"]) ==
                   RECIPE_VERSION and match["model"] in model_names())
        logger.warning("zoo checkpoint %s is unusable (%s); moved "
                       "it to %s%s", path, problem, moved,
                       " and pretraining it again" if rebuild else "")
        if rebuild:
            model, dataset, seed = (match["model"], match["dataset"],
                                    int(match["seed"]))
            load_pretrained(model, dataset, seed=seed, zoo_dir=zoo_dir,
                            data_dir=data_dir, progress=progress)
        repairs.append(ZooRepair(path, problem, moved, rebuild))
    return repairs
