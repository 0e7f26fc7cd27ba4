"""A byte-level text corpus: the Python standard library's own source.

The text is read at build time from the running interpreter's standard
library (``sysconfig.get_paths()["stdlib"]``); nothing is copied into this
repository and nothing is downloaded. The builder writes ``array_record``
files with plain ``Tensor`` features, so building and reading need no
TensorFlow.

**Selection.** The files are ``<stdlib>/<module>.py`` for the modules of
:data:`MODULES`: 40 pure-Python top-level modules present in every CPython
from 3.9 to 3.13, in sorted order. Each contributes its first
``max_file_bytes`` bytes (default 8 KiB, about 300 KB in all; ``None``
takes whole files).

**Split by file.** In that sorted order, every fifth file starting with the
third (positions 2, 7, 12, ...) is a test file, the others train files:
8 test and 32 train files by default. No window of a test file is seen in
training.

**Windows.** A file's bytes ``b[0:n]`` are cut into windows of
``sequence_length + 1`` bytes starting at offsets ``0, L, 2L, ...``
(``L = sequence_length``), for every offset with ``offset + 1 < n``. Windows
overlap by one byte, so that with ``inputs = window[:-1]`` and ``targets =
window[1:]`` every byte of a file but its first is a target exactly once.
A file's last window is padded with :data:`PAD_ID` (256) and its ``mask``
is ``False`` on the padding; windows never cross files. Tokens are the
byte values 0..255, so the vocabulary is :data:`VOCAB_SIZE` = 257 ids.

**Determinism.** The same files give the same dataset. The builder
metadata records every file used (name, size, SHA-256, bytes used, split),
and the prepared directory's config name carries a digest of them
(``seq128_max8192_<digest>``): a changed standard library (another Python,
an upgrade) is detected and prepared into a directory of its own, and a
prepared copy whose recorded files disagree with its name is rebuilt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import pathlib
import sys
import sysconfig
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds

from recovjax import _paths
from recovjax._checks import check_batch_size
from recovjax._io import move_aside
from recovjax._types import Array, PRNGKey
from recovjax.data.batching import num_batches
from recovjax.data.loading import DatasetCorruptedError, prepared_builder

logger = logging.getLogger(__name__)

NAME = "pysource"
"""The dataset's name (its directory under the data directory)."""

BYTE_VALUES = 256
PAD_ID = 256
"""Token id of padding (one past the byte values)."""
VOCAB_SIZE = 257
"""Token ids: the 256 byte values and :data:`PAD_ID`."""

DEFAULT_SEQUENCE_LENGTH = 128
DEFAULT_MAX_FILE_BYTES = 8192

TEST_EVERY = 5
TEST_FIRST = 2
"""Position ``i`` of the sorted selection is a test file when ``i %
TEST_EVERY == TEST_FIRST``."""

MODULES = (
    "abc", "argparse", "ast", "base64", "bisect", "calendar", "cmd", "code",
    "codecs", "colorsys", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "difflib", "enum", "filecmp", "fnmatch", "fractions",
    "functools", "getopt", "glob", "gzip", "heapq", "hmac", "inspect",
    "ipaddress", "linecache", "numbers", "operator", "optparse", "pprint",
    "queue", "random", "reprlib", "shlex", "shutil", "statistics",
    "textwrap",
)
"""The default selection: top-level pure-Python stdlib modules (sorted)."""


class SourceFile(NamedTuple):
    """One source file of the corpus, as recorded in the builder metadata.

    Attributes:
        name: file name relative to the source directory (``"abc.py"``).
        split: ``"train"`` or ``"test"``.
        size: the whole file's size in bytes.
        sha256: hex SHA-256 of the whole file.
        bytes_used: how many of its leading bytes the corpus holds.
    """

    name: str
    split: str
    size: int
    sha256: str
    bytes_used: int


class TextSplit(NamedTuple):
    """One split of a token corpus, held in memory.

    Attributes:
        tokens: ``int32[N, sequence_length + 1]`` windows (bytes 0..255,
            :data:`PAD_ID` on padding).
        mask: ``bool[N, sequence_length + 1]``: ``True`` on real bytes.
        file: ``int32[N]``: index of each window's file in
            :attr:`TextDataset.files`.
        offset: ``int32[N]``: byte offset of each window in its file.

    Windows are in corpus order: by file, then by offset.
    """

    tokens: np.ndarray
    mask: np.ndarray
    file: np.ndarray
    offset: np.ndarray

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


class TextDataset(NamedTuple):
    """A token corpus with its train and test splits.

    Attributes:
        name: ``"pysource"``.
        train: the training windows.
        test: the evaluation windows (from other files).
        vocab_size: :data:`VOCAB_SIZE`.
        pad_id: :data:`PAD_ID`; ``None`` for windows from arrays, whose
            padding is only masked.
        sequence_length: model input length ``L`` (windows hold ``L + 1``).
        files: the files used, in selection order.
        source_dir: where the files were read.
    """

    name: str
    train: TextSplit
    test: TextSplit
    vocab_size: int
    pad_id: int | None
    sequence_length: int
    files: tuple[SourceFile, ...]
    source_dir: str


# --------------------------------------------------------------------------
# Reading the sources.
# --------------------------------------------------------------------------


def stdlib_dir() -> pathlib.Path:
    """The running interpreter's standard library directory."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def split_of(position: int) -> str:
    """``"test"`` or ``"train"`` for position ``position`` of the selection."""
    return "test" if position % TEST_EVERY == TEST_FIRST else "train"


def _check_options(sequence_length: int, max_file_bytes: int | None,
                   modules: Sequence[str]) -> tuple[str, ...]:
    if isinstance(sequence_length, bool) or not isinstance(
            sequence_length, (int, np.integer)) or sequence_length < 1:
        raise ValueError(f"sequence_length: must be a positive int, got "
                         f"{sequence_length!r}")
    if max_file_bytes is not None and (
            isinstance(max_file_bytes, bool)
            or not isinstance(max_file_bytes, (int, np.integer))
            or max_file_bytes < 2):
        raise ValueError(f"max_file_bytes: must be an int of at least 2 or "
                         f"None (whole files), got {max_file_bytes!r}")
    if isinstance(modules, str) or not all(
            isinstance(m, str) and m for m in modules):
        raise TypeError(f"modules: must be a sequence of module names, got "
                        f"{modules!r}")
    selection = tuple(sorted(set(modules)))
    splits = {split_of(i) for i in range(len(selection))}
    if splits != {"train", "test"}:
        raise ValueError(
            f"modules: {len(selection)} module(s) leave a split empty; the "
            f"split by file needs at least {TEST_FIRST + 1} (every "
            f"{TEST_EVERY}th file from position {TEST_FIRST} is a test file)")
    return selection


def read_sources(modules: Sequence[str] = MODULES, *,
                 source_dir: str | os.PathLike[str] | None = None,
                 max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES
                 ) -> list[tuple[SourceFile, bytes]]:
    """Read the selected source files and record what was read.

    Args:
        modules: module names; ``<source_dir>/<name>.py`` is read. They are
            sorted (and deduplicated) first, which fixes the split.
        source_dir: where the files are; default :func:`stdlib_dir`.
        max_file_bytes: bytes kept from the start of each file; ``None``
            keeps whole files.

    Returns:
        ``(record, data)`` per file in sorted order: the metadata record and
        the bytes used.

    Raises:
        FileNotFoundError: if a file is missing (the message names it; some
            installations ship only compiled ``.pyc`` files).
        ValueError: for a file shorter than 2 bytes, or options as
            :func:`load_text`.
    """
    selection = _check_options(1, max_file_bytes, modules)
    root = pathlib.Path(source_dir) if source_dir is not None else (
        stdlib_dir())
    out = []
    for position, module in enumerate(selection):
        path = root / f"{module}.py"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"modules: the source of {module!r} is not at {path}; the "
                "text corpus needs the standard library as .py files "
                f"(source_dir={str(root)!r})") from None
        used = data if max_file_bytes is None else data[:max_file_bytes]
        if len(used) < 2:
            raise ValueError(f"modules: {path} holds {len(used)} byte(s); "
                             "a file needs at least 2 for one target")
        out.append((SourceFile(name=path.name, split=split_of(position),
                               size=len(data),
                               sha256=hashlib.sha256(data).hexdigest(),
                               bytes_used=len(used)), used))
    return out


def manifest_digest(files: Sequence[SourceFile]) -> str:
    """Hex SHA-256 of the recorded files (names, digests, bytes, splits)."""
    text = "\n".join(f"{f.name} {f.split} {f.size} {f.sha256} {f.bytes_used}"
                     for f in files)
    return hashlib.sha256(text.encode()).hexdigest()


def windows(data: bytes, sequence_length: int
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut one file's bytes into padded windows (see the module docstring).

    Args:
        data: the file's bytes (at least 2).
        sequence_length: ``L``; windows hold ``L + 1`` tokens.

    Returns:
        ``(tokens, lengths, offsets)``: ``int32[W, L + 1]`` (padded with
        :data:`PAD_ID`), ``int32[W]`` real bytes per window, ``int32[W]``
        start offsets ``0, L, 2L, ...``.
    """
    values = np.frombuffer(data, np.uint8).astype(np.int32)
    offsets = np.arange(0, len(values) - 1, sequence_length, dtype=np.int32)
    padded = np.concatenate([values, np.full(sequence_length + 1, PAD_ID,
                                             np.int32)])
    index = offsets[:, None] + np.arange(sequence_length + 1)
    lengths = np.minimum(sequence_length + 1, len(values) - offsets)
    return padded[index], lengths.astype(np.int32), offsets


# --------------------------------------------------------------------------
# The TFDS builder.
# --------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class PysourceConfig(tfds.core.BuilderConfig):
    """What a prepared ``pysource`` copy holds; made by :func:`make_config`.

    Attributes:
        sequence_length: ``L``; examples hold ``L + 1`` tokens.
        max_file_bytes: bytes used per file (``None``: whole files).
        modules: the sorted module selection.
        source_dir: where the files are read.
        digest: :func:`manifest_digest` of the files when the config was
            made; the build checks the files still match it.
    """

    sequence_length: int = DEFAULT_SEQUENCE_LENGTH
    max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES
    modules: tuple[str, ...] = MODULES
    source_dir: str = ""
    digest: str = ""


def make_config(*, sequence_length: int = DEFAULT_SEQUENCE_LENGTH,
                max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES,
                modules: Sequence[str] = MODULES,
                source_dir: str | os.PathLike[str] | None = None
                ) -> PysourceConfig:
    """The builder config for these options and the files as they are now.

    Reads and hashes the selected files (a few hundred KB by default), so
    that the config's name, ``seq<L>_max<bytes>_<digest>``, identifies the
    exact text.

    Raises:
        ValueError, TypeError, FileNotFoundError: as :func:`load_text`.
    """
    selection = _check_options(sequence_length, max_file_bytes, modules)
    root = str(pathlib.Path(source_dir) if source_dir is not None
               else stdlib_dir())
    files = [record for record, _ in read_sources(
        selection, source_dir=root, max_file_bytes=max_file_bytes)]
    digest = manifest_digest(files)
    size = "all" if max_file_bytes is None else str(int(max_file_bytes))
    return PysourceConfig(
        name=f"seq{int(sequence_length)}_max{size}_{digest[:16]}",
        description=(f"{len(files)} stdlib files, windows of "
                     f"{int(sequence_length) + 1} bytes"),
        sequence_length=int(sequence_length),
        max_file_bytes=None if max_file_bytes is None else int(max_file_bytes),
        modules=selection, source_dir=root, digest=digest)


class _QuietCustomConfig(logging.Filter):
    """Drops TFDS's warning that a config is not among BUILDER_CONFIGS:
    every pysource config is made at run time, from the files' digest."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "custom data configuration" not in record.getMessage()


@contextlib.contextmanager
def _quiet_config_warning() -> Iterator[None]:
    quiet, absl = _QuietCustomConfig(), logging.getLogger("absl")
    absl.addFilter(quiet)
    try:
        yield
    finally:
        absl.removeFilter(quiet)


class Pysource(tfds.core.GeneratorBasedBuilder):
    """Byte windows of Python standard library source, split by file.

    Build it through :func:`load_text`, or directly::

        builder = Pysource(config=make_config(), data_dir=root,
                           file_format="array_record")
        builder.download_and_prepare()
        source = builder.as_data_source(split="train")

    Features: ``tokens`` (``int32[L + 1]``), ``length`` (real bytes of the
    window), ``file`` (index into ``metadata["files"]``) and ``offset``.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Byte windows of 40 stdlib modules, split by "
                              "file."}

    def __init__(self, *, config: PysourceConfig | None = None, **kwargs):
        with _quiet_config_warning():
            super().__init__(config=config or make_config(), **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        width = self.builder_config.sequence_length + 1
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "tokens": tfds.features.Tensor(shape=(width,),
                                               dtype=np.int32),
                "length": tfds.features.Scalar(dtype=np.int32),
                "file": tfds.features.Scalar(dtype=np.int32),
                "offset": tfds.features.Scalar(dtype=np.int32),
            }),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing is downloaded: the text ships with Python.
        config = self.builder_config
        sources = read_sources(config.modules, source_dir=config.source_dir,
                               max_file_bytes=config.max_file_bytes)
        records = [record for record, _ in sources]
        if manifest_digest(records) != config.digest:
            raise RuntimeError(
                f"the source files under {config.source_dir} changed while "
                "the text corpus was being prepared; load it again")
        self.info.metadata.update({
            "digest": config.digest,
            "source_dir": config.source_dir,
            "python_version": sys.version.split()[0],
            "sequence_length": config.sequence_length,
            "max_file_bytes": config.max_file_bytes,
            "files": [record._asdict() for record in records],
        })
        return {split: self._generate_examples(sources, split)
                for split in ("train", "test")}

    def _generate_examples(self, sources, split: str
                           ) -> Iterator[tuple[str, dict]]:
        length = self.builder_config.sequence_length
        for index, (record, data) in enumerate(sources):
            if record.split != split:
                continue
            tokens, lengths, offsets = windows(data, length)
            for row in range(len(offsets)):
                yield f"{record.name}:{int(offsets[row])}", {
                    "tokens": tokens[row], "length": int(lengths[row]),
                    "file": index, "offset": int(offsets[row])}


# --------------------------------------------------------------------------
# Loading.
# --------------------------------------------------------------------------


def text_names() -> tuple[str, ...]:
    """Names accepted by :func:`load_text`."""
    return (NAME,)


def load_text(name: str = NAME, *,
              sequence_length: int = DEFAULT_SEQUENCE_LENGTH,
              max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES,
              modules: Sequence[str] = MODULES,
              source_dir: str | os.PathLike[str] | None = None,
              data_dir: str | os.PathLike[str] | None = None) -> TextDataset:
    """Load the byte-level source corpus, preparing it on first use.

    It is built once with TFDS into the data directory and read back with
    ``as_data_source``; later loads with the same options and the same
    files reuse the prepared copy.

    Args:
        name: one of :func:`text_names` (``"pysource"``).
        sequence_length: model input length ``L``; windows hold ``L + 1``
            tokens.
        max_file_bytes: bytes used from the start of each file (at least
            2); ``None`` uses whole files (about 1.3 MB for the default
            modules).
        modules: the module selection (see :data:`MODULES`).
        source_dir: where the ``.py`` files are; default the interpreter's
            standard library.
        data_dir: where prepared datasets live; default
            ``$RECOVJAX_DATA_DIR`` or ``~/.cache/recovjax/datasets``.

    Returns:
        A :class:`TextDataset`. A damaged prepared copy is moved aside to
        ``<its directory>.corrupt-<UTC time>`` and prepared again, with a
        warning on the ``recovjax.data.text`` logger.

    Raises:
        ValueError: for an unknown name (the message lists the valid ones),
            a non-positive ``sequence_length``, a ``max_file_bytes`` below
            2, or a selection that leaves a split empty.
        TypeError: if ``modules`` is not a sequence of names.
        FileNotFoundError: if a selected file is missing.

    Example::

        corpus = load_text(sequence_length=64)
        batches = batch_tokens(corpus.test, 32)
        metrics = evaluate_task(language_model(corpus.vocab_size), apply,
                                params, batches)
    """
    if name not in text_names():
        raise ValueError(f"unknown text dataset {name!r}; valid names: "
                         f"{', '.join(text_names())}")
    config = make_config(sequence_length=sequence_length,
                         max_file_bytes=max_file_bytes, modules=modules,
                         source_dir=source_dir)
    root = _paths.data_dir(data_dir)
    try:
        return _load(root, config)
    except DatasetCorruptedError as error:
        # Our own cache, built from files on this machine: move the damaged
        # copy aside (never delete it) and prepare it again.
        try:
            moved = move_aside(root / NAME / config.name)
        except FileNotFoundError:
            moved = None  # Another process moved it first.
        if moved is not None:
            logger.warning("prepared text corpus %s is unreadable (%s); "
                           "moved it to %s and preparing it again",
                           root / NAME / config.name,
                           " ".join(str(error).split()), moved)
        return _load(root, config)


def _load(root: pathlib.Path, config: PysourceConfig) -> TextDataset:
    prepared = root / NAME / config.name / str(Pysource.VERSION)
    builder = prepared_builder(Pysource, root, prepared, "corpus",
                               config=config)
    files = tuple(record for record, _ in read_sources(
        config.modules, source_dir=config.source_dir,
        max_file_bytes=config.max_file_bytes))
    recorded = builder.info.metadata.get("files")
    if recorded != [record._asdict() for record in files]:
        raise DatasetCorruptedError(
            prepared / "metadata.json",
            "the recorded source files differ from the files it was named "
            f"after (digest {config.digest[:16]})")
    splits = {}
    for split in ("train", "test"):
        try:
            source = builder.as_data_source(split=split)
            splits[split] = _read_split(source, config.sequence_length)
        except (RuntimeError, OSError, ValueError, KeyError,
                IndexError) as error:
            raise DatasetCorruptedError(
                prepared, f"cannot read the {split!r} split; the file is "
                f"truncated or corrupted ({' '.join(str(error).split())})"
                ) from error
        # Exact: every byte of a file but its first is one target.
        expected = sum(f.bytes_used - 1 for f in files if f.split == split)
        targets = int(splits[split].mask[:, 1:].sum())
        if targets != expected:
            raise DatasetCorruptedError(
                prepared, f"the {split!r} split holds {targets} target bytes,"
                f" not the {expected} of its files")
    return TextDataset(name=NAME, train=splits["train"], test=splits["test"],
                       vocab_size=VOCAB_SIZE, pad_id=PAD_ID,
                       sequence_length=config.sequence_length, files=files,
                       source_dir=config.source_dir)


def _read_split(source, sequence_length: int) -> TextSplit:
    records = source.__getitems__(range(len(source)))
    width = sequence_length + 1
    tokens = np.stack([np.asarray(r["tokens"], np.int32) for r in records]
                      ) if records else np.zeros((0, width), np.int32)
    lengths = np.asarray([r["length"] for r in records], np.int32)
    file = np.asarray([r["file"] for r in records], np.int32)
    offset = np.asarray([r["offset"] for r in records], np.int32)
    # TFDS stores examples in an order hashed from their keys; restore the
    # corpus order.
    order = np.lexsort((offset, file))
    mask = np.arange(width) < lengths[order, None]
    tokens = tokens[order]
    if tokens.shape[1:] != (width,) or np.any(
            np.where(mask, tokens >= BYTE_VALUES, tokens != PAD_ID)) or (
            np.any(tokens < 0)):
        raise ValueError("tokens are not bytes followed by padding")
    return TextSplit(tokens=tokens, mask=mask, file=file[order],
                     offset=offset[order])


# --------------------------------------------------------------------------
# Batching.
# --------------------------------------------------------------------------


def batch_tokens(split: TextSplit, batch_size: int, *,
                 pad_id: int = PAD_ID) -> dict[str, Array]:
    """Cut a token split into fixed-shape batches, padding the last one.

    Like :func:`recovjax.data.batch_split`: nothing is dropped, and the
    padding windows are all ``pad_id`` with a ``False`` mask, so they count
    for nothing.

    Args:
        split: the windows (``tokens`` and ``mask``).
        batch_size: windows per batch.
        pad_id: token of the padding windows.

    Returns:
        ``{"tokens": int32[num_batches, batch_size, L + 1], "mask":
        bool[num_batches, batch_size, L + 1]}``, the batches of
        :func:`recovjax.tasks.language_model`.

    Raises:
        ValueError: if ``batch_size`` is not positive or the split is empty.
    """
    count = num_batches(len(split), batch_size)
    pad = count * batch_size - len(split)
    width = split.tokens.shape[1]
    tokens = np.concatenate([np.asarray(split.tokens, np.int32),
                             np.full((pad, width), pad_id, np.int32)])
    mask = np.concatenate([np.asarray(split.mask, bool),
                           np.zeros((pad, width), bool)])
    shape = (count, batch_size, width)
    return {"tokens": jnp.asarray(tokens.reshape(shape)),
            "mask": jnp.asarray(mask.reshape(shape))}


def shuffled_token_batches(key: PRNGKey, tokens: Array, mask: Array,
                           batch_size: int) -> dict[str, Array]:
    """One epoch of shuffled fixed-shape token batches, traceable in ``jit``.

    As :func:`recovjax.data.shuffled_batches`: the order is a permutation
    drawn from ``key``, and the tail is padded with copies whose mask is
    ``False``, so shapes stay fixed and every window is used once.

    Args:
        key: the epoch's order.
        tokens: ``int32[N, L + 1]``.
        mask: ``[N, L + 1]``.
        batch_size: static windows per batch (at most ``N``).

    Returns:
        ``{"tokens": int32[B, batch_size, L + 1], "mask": bool[B,
        batch_size, L + 1]}`` with ``B = ceil(N / batch_size)``.

    Raises:
        ValueError: if ``batch_size`` is not positive or exceeds ``N``.
    """
    n = tokens.shape[0]
    check_batch_size(batch_size, n)
    count = -(-n // batch_size)
    pad = count * batch_size - n
    order = jax.random.permutation(key, n)
    order = jnp.concatenate([order, order[:pad]])
    real = (jnp.arange(count * batch_size) < n)[:, None]
    shape = (count, batch_size, tokens.shape[1])
    return {"tokens": tokens[order].reshape(shape),
            "mask": ((mask[order] > 0) & real).reshape(shape)}
