"""Training LDOS networks on snapshot files.

One concept per module: ``config`` (TrainingConfig and its checks), ``dataset``
(snapshot sources, consistency, batches, scalers), ``physics_terms`` (energy, force and
stress terms of the loss and their QE targets), ``loop`` (``train``) and ``checkpoint``.
Export of a checkpoint is :mod:`mlsurrogate.export`.
"""

from mlsurrogate.training.checkpoint import CHECKPOINT_VERSION, load_checkpoint
from mlsurrogate.training.config import TrainingConfig
from mlsurrogate.training.dataset import SnapshotSource
from mlsurrogate.training.loop import train

__all__ = ["CHECKPOINT_VERSION", "SnapshotSource", "TrainingConfig", "load_checkpoint", "train"]

