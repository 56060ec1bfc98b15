"""The training engine every train_*.py shares: flags, runtime, loop, checkpoints, logs, losses."""

from .cli import UsageError, exit_cleanly_on_bad_input, parse_args, require_checkpoint, require_vocab_fits
from .loop import evaluate, format_summary, train
from .runtime import Runtime, setup, teardown
from .sampling import make_sample_fn

__all__ = ["UsageError", "exit_cleanly_on_bad_input", "parse_args", "require_checkpoint", "require_vocab_fits",
           "evaluate", "format_summary", "train", "Runtime", "setup", "teardown", "make_sample_fn"]
