"""The training loop and its parts, one small module each: device and seeding, precision (autocast
and the fp16 GradScaler), optimiser and schedule, the one training step, epoch batches, inf/NaN
handling, stop signals, the run's log, checkpointed training state, and `fit`, which puts them in
order."""
from .batches import BatchSource, EpochBatches, FeatureEncoding, steps_per_epoch
from .device import epoch_generator, resolve_device, seed_everything
from .loop import TrainResult, fit
from .optim import build_optimizer, epoch_lr, set_epoch_lr
from .precision import PRECISION_DTYPES, Precision, autocast_context
from .run_log import RunLogger, progress_bar
from .signals import StopSignals, TrainingInterrupted
from .step import PHASES, no_phase, step_forward, train_step

__all__ = [
    "BatchSource", "EpochBatches", "FeatureEncoding", "steps_per_epoch", "epoch_generator", "resolve_device",
    "seed_everything", "TrainResult", "fit", "build_optimizer", "epoch_lr", "set_epoch_lr", "PRECISION_DTYPES",
    "Precision", "autocast_context", "RunLogger", "progress_bar", "StopSignals", "TrainingInterrupted", "PHASES",
    "no_phase", "step_forward", "train_step",
]
