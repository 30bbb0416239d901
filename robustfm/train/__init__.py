"""The training engine: stages of a task trained with DDP or DeepSpeed ZeRO, on Ray Train or locally.

Importing this package imports torch but never ray or deepspeed (they load inside the launcher and the workers).
"""

from robustfm.train.config import OptimizerConfig, StageConfig, StrategyConfig, TrainConfig
from robustfm.train.fit import TrainResult, fit
from robustfm.train.task import BatchSource, Task

__all__ = [
    "BatchSource",
    "OptimizerConfig",
    "StageConfig",
    "StrategyConfig",
    "Task",
    "TrainConfig",
    "TrainResult",
    "fit",
]
