"""The training engine every train_*.py shares: flags, runtime, the loop and its parts, checkpoints, logs, losses."""

from dataset.errors import UsageError, exit_cleanly_on_bad_input

from .cli import above, at_least, between, parse_args, require_checkpoint, require_vocab_fits
from .config import TrainConfig
from .loop import evaluate, train
from .progress import format_summary
from .runtime import Runtime, setup, teardown
from .sampling import make_sample_fn

__all__ = ["UsageError", "above", "at_least", "between", "exit_cleanly_on_bad_input", "parse_args",
           "require_checkpoint", "require_vocab_fits", "TrainConfig", "evaluate", "format_summary", "train",
           "Runtime", "setup", "teardown", "make_sample_fn"]
