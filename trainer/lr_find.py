"""--lr_find: the learning-rate range test (Smith 2017, "Cyclical Learning Rates for Training Neural Networks"; fastai's
lr_find), for every stage that trains through trainer.loop.train.

From the stage's starting weights, the learning rate grows exponentially from LR_START to LR_END over
--lr_find_steps optimizer steps (the stage's own data, loss, batch, accumulation and optimizer), and each step's
training loss is recorded. The loss first barely moves (the rate is too small), then falls, then blows up (too
large). The sweep stops early once the smoothed loss passes DIVERGE x its minimum.

The suggestion is the rate where the smoothed loss (a forward-backward moving average: no lag) falls fastest: the
minimum of d(loss)/d(log lr), searched only before the loss's minimum. `min/10` (a tenth of the rate at the lowest
smoothed loss) is printed and plotted too: the other common rule. Both
are peak rates for the usual warmup + cosine run.

Writes out_dir/lr_find.png (loss against lr, log scale, both suggestions marked) and out_dir/lr_find.json (the
points and the suggestions); no checkpoint, no metrics.jsonl. With --optimizer muon the Muon matrices sweep at
lr x (--muon_lr / --learning_rate): their ratio stays as configured, so the suggestion is for --learning_rate
(multiply --muon_lr by suggestion / --learning_rate to keep the ratio).
"""

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from dataset.errors import UsageError
from dataset.io import atomic_path, atomic_write_text

from .config import TrainConfig
from .data import ResumableSampler, make_loader
from .optim import build_optimizer
from .progress import all_reduce_mean
from .runtime import Runtime, prepare_model
from .step import optimizer_step

LR_START, LR_END = 1e-6, 1.0
DIVERGE = 4.0  # stop once the smoothed loss exceeds this multiple of its minimum
SMOOTHING = 0.9  # exponential moving average of the loss (bias-corrected), as fastai's 0.98 but for ~100 steps


def sweep_lrs(steps: int, start: float = LR_START, end: float = LR_END) -> list[float]:
    """`steps` rates growing geometrically from start to end (both included)."""
    if steps < 2:
        raise UsageError(f"--lr_find_steps {steps}: a sweep needs at least 2 steps")
    return [start * (end / start) ** (i / (steps - 1)) for i in range(steps)]


def smooth(losses: list[float], beta: float = SMOOTHING) -> list[float]:
    """Bias-corrected exponential moving average: a flat start stays flat instead of rising from 0."""
    average, out = 0.0, []
    for i, loss in enumerate(losses, 1):
        average = beta * average + (1 - beta) * loss
        out.append(average / (1 - beta ** i))
    return out


def smooth_centered(losses: list[float], beta: float = SMOOTHING) -> list[float]:
    """The moving average run forward then backward: as smooth as smooth(), without its lag of ~beta / (1 - beta)
    steps (which would move every suggestion to a later, larger rate: x3.5 at 100 steps over six decades)."""
    return smooth(smooth(losses, beta)[::-1], beta)[::-1]


def suggest(lrs: list[float], losses: list[float]) -> dict[str, float]:
    """{"steepest": rate of the fastest fall of the smoothed loss before its minimum, "min_10": a tenth of the rate at
    the minimum, "min": that rate}, on the lag-free smoothing. Steepest falls back to min_10 when the minimum is among
    the first 3 points."""
    smoothed = smooth_centered(losses)
    best = min(range(len(smoothed)), key=smoothed.__getitem__)
    result = {"min": lrs[best], "min_10": lrs[best] / 10}
    if best < 3:
        result["steepest"] = result["min_10"]
        return result
    logs = [math.log(lr) for lr in lrs]
    slopes = [(smoothed[i + 1] - smoothed[i - 1]) / (logs[i + 1] - logs[i - 1]) for i in range(1, best)]
    result["steepest"] = lrs[1 + min(range(len(slopes)), key=slopes.__getitem__)]
    return result


def micro_batches(dataset, sampler: ResumableSampler, collate_fn) -> Iterator[dict]:
    """Micro-batches, epoch after epoch (a sweep may outrun a small data set)."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch, 0)
        yield from make_loader(dataset, sampler, collate_fn=collate_fn)
        epoch += 1


def plot(lrs: list[float], losses: list[float], suggestion: dict[str, float], title: str, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(lrs, losses, linewidth=0.8, alpha=0.4, label="loss")
    ax.plot(lrs, smooth_centered(losses), linewidth=1.5, label="smoothed")
    ax.axvline(suggestion["steepest"], color="C2", linestyle="--", label=f"steepest {suggestion['steepest']:.2g}")
    ax.axvline(suggestion["min_10"], color="C3", linestyle=":", label=f"min/10 {suggestion['min_10']:.2g}")
    ax.set_xscale("log")
    finite = [x for x in losses if math.isfinite(x)]
    if finite:  # the divergence at the end would squash the interesting part
        ax.set_ylim(min(finite) - 0.05 * abs(min(finite)), min(max(finite), DIVERGE * min(smooth(finite))))
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def lr_find(model, train_data, loss_fn: Callable, run: Runtime, config: TrainConfig, *, collate_fn=None,
            shuffle: bool = True, loss_items: Callable | None = None) -> dict:
    """Run the range test on `model` (its weights are changed; nothing is saved but the plot and the points) and
    return {"lr_find": out_dir/lr_find.json's content}."""
    c = config
    lrs = sweep_lrs(c.lr_find_steps)
    trainable = prepare_model(model, run, fsdp=c.fsdp, compile=c.compile)
    optimizer = build_optimizer(trainable.raw, c.learning_rate, c.weight_decay, run.device, optimizer=c.optimizer,
                                muon_lr=c.muon_lr)
    scaler = torch.amp.GradScaler(run.device.type) if run.dtype == torch.float16 else None
    sampler = ResumableSampler(len(train_data), c.batch_size, c.seed, shuffle, run.rank, run.world_size)
    if sampler.batches_per_epoch() < 1:
        raise UsageError(f"the training data has {len(train_data)} samples, fewer than one global batch "
                         f"({sampler.global_batch}); lower --batch_size or add data")
    stream = micro_batches(train_data, sampler, collate_fn)
    trainable.model.train()
    tried, losses, best = [], [], math.inf
    for step, lr in enumerate(lrs):
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = [next(stream) for _ in range(c.accumulation_steps)]
        result = optimizer_step(trainable.model, trainable.raw, optimizer, scaler, batches, loss_fn, run,
                                grad_clip=c.grad_clip, loss_items=loss_items)
        loss = all_reduce_mean({"loss": float(result.loss)}, run)["loss"]
        tried.append(lr)
        losses.append(loss)
        smoothed = smooth(losses)[-1]
        best = min(best, smoothed)
        if run.is_main and (step % max(1, len(lrs) // 10) == 0 or step == len(lrs) - 1):
            print(f"lr_find: step {step + 1}/{len(lrs)}  lr {lr:.2e}  loss {loss:.4f}", flush=True)
        if not math.isfinite(loss) or smoothed > DIVERGE * best:
            if run.is_main:
                print(f"lr_find: the loss diverged at lr {lr:.2e} (step {step + 1}); stopping the sweep", flush=True)
            break
    finite = [i for i, x in enumerate(losses) if math.isfinite(x)]
    if len(finite) < 2:
        raise UsageError(f"lr_find: the loss was not finite from the first steps (lr {LR_START:g}); check the data "
                         "and --dtype")
    tried, losses = [tried[i] for i in finite], [losses[i] for i in finite]
    suggestion = suggest(tried, losses)
    found = {"stage": c.stage, "optimizer": c.optimizer, "steps": len(tried), "suggestion": suggestion["steepest"],
             "steepest": suggestion["steepest"], "min_10": suggestion["min_10"], "min_loss_lr": suggestion["min"],
             "lrs": [float(f"{lr:.6g}") for lr in tried], "losses": [round(x, 6) for x in losses]}
    if run.is_main:
        out = Path(c.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "lr_find.json", json.dumps(found, indent=1) + "\n")
        plot(tried, losses, suggestion, f"{c.stage}: learning-rate range test ({c.optimizer})", out / "lr_find.png")
        print(f"lr_find: suggested --learning_rate {suggestion['steepest']:.2g} (steepest descent of the smoothed "
              f"loss; min/10 rule: {suggestion['min_10']:.2g}); plot in {out / 'lr_find.png'}; no checkpoint written",
              flush=True)
    return {"lr_find": found}
