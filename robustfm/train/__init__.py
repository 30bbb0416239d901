"""The training engine: stages of a task trained with DDP or DeepSpeed ZeRO, on Ray Train or locally.

Importing this package imports torch but never ray or deepspeed (they load inside the launcher and the workers).
"""

from robustfm.train.capabilities import CAPABILITIES, check_capabilities
from robustfm.train.config import OptimizerConfig, StageConfig, StrategyConfig, TrainConfig
from robustfm.train.fit import TrainResult, fit
from robustfm.train.task import BatchSource, StageSpec, Task

__all__ = [
    "CAPABILITIES",
    "BatchSource",
    "OptimizerConfig",
    "StageConfig",
    "StageSpec",
    "StrategyConfig",
    "Task",
    "TrainConfig",
    "TrainResult",
    "check_capabilities",
    "fit",
]
