"""TrainConfig: every hyperparameter the training parts read, named once (no part reads the command line)."""

import argparse
from dataclasses import dataclass, fields


@dataclass
class TrainConfig:
    stage: str
    out_dir: str
    batch_size: int = 16  # sequences (or pairs) per micro-batch per process
    accumulation_steps: int = 1  # micro-batches per optimizer step
    epochs: int = 1
    max_steps: int = 0  # > 0 overrides epochs
    learning_rate: float = 5e-4
    min_lr: float = 5e-5
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0: off
    seed: int = 42
    num_workers: int = 0
    log_every: int = 10
    eval_every: int = 200  # 0: only at the end
    eval_batches: int = 50
    sample_every: int = 0  # 0: only at the end
    save_every: int = 500  # always at the end too
    resume: bool = False
    val_split: float = 0.0  # with no validation data: the share of the training samples (the last ones) held out
    compile: bool = False
    fsdp: bool = False
    skip_nonfinite: bool = False
    wandb: bool = False
    optimizer: str = "adamw"  # adamw | muon (trainer/optim.py)
    muon_lr: float = 0.02  # --optimizer muon: the Muon matrices' peak learning rate
    lr_find: bool = False  # a learning-rate range test instead of training (trainer/lr_find.py)
    lr_find_steps: int = 100

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainConfig":
        """The fields of a parsed command line (trainer.cli.parse_args) that training reads."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})
