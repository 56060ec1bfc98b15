"""metrics.jsonl (one JSON object per event) and loss.png, written by rank 0."""

import json
import math
from dataclasses import asdict
from pathlib import Path

from dataset.errors import UsageError
from dataset.io import atomic_path, atomic_write_text


class MetricsLog:
    def __init__(self, out_dir: str | Path, enabled: bool = True, resume: bool = False, wandb_run=None):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.plot_path = Path(out_dir) / "loss.png"
        self.enabled = enabled
        self.wandb_run = wandb_run
        self.rows: list[dict] = []
        if enabled and resume and self.path.exists():
            self.rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        elif enabled:
            self.path.write_text("")

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        row = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
        self.rows.append(row)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in row.items() if isinstance(v, int | float)}, step=row.get("step"))

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint we restart from (they will be redone)."""
        if not self.enabled:
            return
        self.rows = [r for r in self.rows if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.rows))

    def plot(self, title: str) -> None:
        if not self.enabled:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [(r["step"], r["loss"]) for r in self.rows if "loss" in r and math.isfinite(r["loss"])]
        val = [(r["step"], r["val_loss"]) for r in self.rows if "val_loss" in r]
        if not train and not val:
            return
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        if train:
            ax.plot(*zip(*train), label="train loss", linewidth=1)
        if val:
            ax.plot(*zip(*val), "o-", label="val loss", markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        with atomic_path(self.plot_path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)


def start_wandb(config):
    """A Weights & Biases run logging the same rows as metrics.jsonl (--wandb)."""
    try:
        import wandb
    except ImportError:
        raise UsageError("--wandb needs the wandb package: pip install wandb") from None
    return wandb.init(project="danlu", name=config.stage, config=asdict(config))
