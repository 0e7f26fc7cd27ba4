"""Data: the embedded MNIST digits, catalogue datasets through TFDS, and
the user's own (arrays on disk, registered loaders)."""

from recovjax.data.arrays import ArraysError, load_arrays, register_dataset
from recovjax.data.batching import batch_split, num_batches, shuffled_batches
from recovjax.data.loading import dataset_names, load_dataset, normalize
from recovjax.data.mnist5k import Mnist5k
from recovjax.data.stream import BatchStream, stream_dataset

__all__ = [
    "ArraysError",
    "BatchStream",
    "Mnist5k",
    "batch_split",
    "dataset_names",
    "load_arrays",
    "load_dataset",
    "normalize",
    "num_batches",
    "register_dataset",
    "shuffled_batches",
    "stream_dataset",
]
