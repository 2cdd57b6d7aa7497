"""shardprop's maths: a numpy MLP with backpropagation, its optimizers, data
sets cut into logical shards, the job spec and the single-process reference
trainer. Nothing here knows about Ray."""

from core.data import DataError, Dataset, load_dataset
from core.mlp import MLP
from core.optim import Optimizer, learning_rate, make_optimizer
from core.shards import Shard, make_shards
from core.spec import JobSpec, SpecError, load_spec, parse_spec
from core.trainer import TrainingError, train

__all__ = [
    "MLP", "train", "JobSpec", "SpecError", "load_spec", "parse_spec", "DataError", "Dataset",
    "load_dataset", "Optimizer", "make_optimizer", "learning_rate", "Shard", "make_shards",
    "TrainingError",
]
