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
from recovjax.cores import use_all_cores
from recovjax.damage import damage_names, get_damage, register_damage
from recovjax.data import (BatchStream, batch_split, dataset_names,
                           load_arrays, load_dataset, register_dataset,
                           stream_dataset)
from recovjax.evaluate import (Metrics, evaluate, evaluate_stack,
                               evaluate_stream)
from recovjax.formulations import (Formulations, current_formulations,
                                   reset_formulations, set_formulations,
                                   use_formulations)
from recovjax._malloc import tune_malloc
from recovjax.experiment import run_experiment
from recovjax.language import load_pretrained_lm, pretrain_lm
from recovjax.models import (LeafInfo, Model, from_apply, from_equinox,
                             from_linen, from_nnx, get_model, model_names,
                             register_model)
from recovjax.models.saving import load_weights, save_pretrained
from recovjax.pretrain import Pretrained, load_pretrained
from recovjax.recovery import (RecoveryTask, finetune, get_strategy,
                               make_task, recover_damage, recovery_ratio,
                               register_strategy, strategy_names)
from recovjax import stats
from recovjax.results import ResultsTable, read_csv, read_json, summarize
from recovjax.sensitivity import SensitivityResult, sensitivity
from recovjax.sweep import SweepResult, damage_point, sweep

__version__ = "0.1.0"

__all__ = [
    "BatchStream",
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
    "Formulations",
    "LeafInfo",
    "Metrics",
    "Model",
    "PRNGKey",
    "Params",
    "Pretrained",
    "RecoveryTask",
    "ResultsTable",
    "SensitivityResult",
    "Split",
    "SweepResult",
    "batch_split",
    "current_formulations",
    "damage_names",
    "damage_point",
    "dataset_names",
    "evaluate",
    "evaluate_stack",
    "evaluate_stream",
    "finetune",
    "from_apply",
    "from_equinox",
    "from_linen",
    "from_nnx",
    "get_damage",
    "get_model",
    "get_strategy",
    "load_arrays",
    "load_config",
    "load_dataset",
    "load_pretrained",
    "load_pretrained_lm",
    "load_weights",
    "make_task",
    "model_names",
    "pretrain_lm",
    "read_csv",
    "read_json",
    "recover_damage",
    "recovery_ratio",
    "register_damage",
    "register_dataset",
    "register_model",
    "register_strategy",
    "reset_formulations",
    "restore_checkpoint",
    "run_experiment",
    "save_checkpoint",
    "save_pretrained",
    "stats",
    "strategy_names",
    "stream_dataset",
    "summarize",
    "sensitivity",
    "set_formulations",
    "sweep",
    "tune_malloc",
    "use_all_cores",
    "use_formulations",
]

# Last: everything imported above is long-lived (see recovjax._gc).
freeze_import_objects()
