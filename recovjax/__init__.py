"""recovjax: measure how well pretrained networks recover from damage.

The pipeline, in the order of its modules::

    data -> models -> damage -> evaluate -> recovery -> sweep -> results/report

Everything here is re-exported from those modules. ``recovjax.evaluate``
and ``recovjax.sweep`` name the functions here; import the modules of the
same name with ``from recovjax.sweep import ...``.
"""

from recovjax._gc import freeze_import_objects
from recovjax._types import (Batches, Damage, DataDamage, Dataset, Params,
                             PRNGKey, Split)
from recovjax.checkpoints import (CheckpointCorruptedError, CheckpointError,
                                  CheckpointMismatchError,
                                  CheckpointNotFoundError, restore_checkpoint,
                                  save_checkpoint)
from recovjax.config import ConfigError, ExperimentConfig, load_config
from recovjax.damage import damage_names, get_damage
from recovjax.data import batch_split, dataset_names, load_dataset
from recovjax.evaluate import Metrics, evaluate, evaluate_stack
from recovjax.experiment import run_experiment
from recovjax.models import Model, get_model, model_names
from recovjax.pretrain import Pretrained, load_pretrained
from recovjax.recovery import (RecoveryTask, finetune, get_strategy,
                               make_task, recovery_ratio, strategy_names)
from recovjax.results import ResultsTable, read_csv, read_json, summarize
from recovjax.sweep import SweepResult, damage_point, sweep

__version__ = "0.1.0"

__all__ = [
    "Batches",
    "CheckpointCorruptedError",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "ConfigError",
    "Damage",
    "DataDamage",
    "Dataset",
    "ExperimentConfig",
    "Metrics",
    "Model",
    "PRNGKey",
    "Params",
    "Pretrained",
    "RecoveryTask",
    "ResultsTable",
    "Split",
    "SweepResult",
    "batch_split",
    "damage_names",
    "damage_point",
    "dataset_names",
    "evaluate",
    "evaluate_stack",
    "finetune",
    "get_damage",
    "get_model",
    "get_strategy",
    "load_config",
    "load_dataset",
    "load_pretrained",
    "make_task",
    "model_names",
    "read_csv",
    "read_json",
    "recovery_ratio",
    "restore_checkpoint",
    "run_experiment",
    "save_checkpoint",
    "strategy_names",
    "summarize",
    "sweep",
]

# Last: everything imported above is long-lived (see recovjax._gc).
freeze_import_objects()
