"""Data: the embedded MNIST digits and catalogue datasets through TFDS."""

from recovjax.data.batching import batch_split, num_batches, shuffled_batches
from recovjax.data.loading import dataset_names, load_dataset, normalize
from recovjax.data.mnist5k import Mnist5k

__all__ = [
    "Mnist5k",
    "batch_split",
    "dataset_names",
    "load_dataset",
    "normalize",
    "num_batches",
    "shuffled_batches",
]
