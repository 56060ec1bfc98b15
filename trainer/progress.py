"""What a run shows and how it stops: the log window behind each metrics row, the end-of-run summary, and
SIGTERM / Ctrl-C handling (finish the step, save, exit)."""

import signal
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from dataset.io import atomic_write_json

from .runtime import Runtime
from .step import StepResult


def all_reduce_mean(values: dict[str, float], run: Runtime) -> dict[str, float]:
    """The mean over ranks of each value (one collective for all of them)."""
    if not run.distributed or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=run.device)
    dist.all_reduce(t)
    return dict(zip(values, (t / run.world_size).tolist()))


class LogWindow:
    """The steps since the last metrics row, summed on the device (no host sync until `row`)."""

    def __init__(self):
        self.loss, self.steps, self.tokens, self.extras, self.start = 0.0, 0, 0, {}, time.time()

    def add(self, result: StepResult) -> None:
        self.tokens = self.tokens + result.tokens
        for k, v in result.extras.items():
            self.extras[k] = self.extras.get(k, 0.0) + v
        if result.applied:
            self.loss = self.loss + result.loss
            self.steps += 1

    def row(self, step: int, lr: float, run: Runtime, progress: dict, start_time: float,
            steps_per_epoch: int) -> dict:
        """Average the window into a metrics row (mean over ranks); advances progress' tokens and elapsed."""
        steps = max(self.steps, 1)
        values = {"loss": float(self.loss) / steps, "tokens": float(self.tokens),
                  **{k: float(v) / steps for k, v in self.extras.items()}}
        values = all_reduce_mean(values, run)
        tokens = values.pop("tokens") * run.world_size
        now = time.time()
        progress["tokens"] += int(tokens)
        progress["elapsed"] = now - start_time
        return {"step": step, "loss": values.pop("loss"), "lr": lr,
                "tokens_per_sec": tokens / max(now - self.start, 1e-9), "elapsed": round(progress["elapsed"], 2),
                "epoch": round(step / steps_per_epoch, 3), **values}


def format_summary(summary: dict) -> str:
    """The one-screen report every stage prints at the end."""
    lines = [f"\n== {summary['stage']} done: {summary['steps']} steps ({summary['epochs']} epochs), "
             f"{summary['tokens']:,} tokens in {summary['seconds']:.0f}s = {summary['tokens_per_sec']:,} tokens/s"]
    if summary.get("final_loss") is not None:
        lines.append(f"   train loss {summary['final_loss']:.4f}")
    if "val_ppl" in summary:
        lines.append(f"   val loss {summary['val_loss']:.4f}   val perplexity {summary['val_ppl']:.2f}")
    elif "val_loss" in summary:
        lines.append(f"   val loss {summary['val_loss']:.4f}")
    lines.append(f"   checkpoint: {summary['out_dir']}  (metrics.jsonl, loss.png, train_state/)")
    return "\n".join(lines)


class StopRequest:
    """SIGTERM / Ctrl-C: finish the current step, save a checkpoint, then exit."""

    def __init__(self):
        self.signal = None
        self.previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, self.handle)
            except ValueError:  # not the main thread
                pass

    def handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def requested(self, run: Runtime) -> bool:
        """Whether any rank got SIGTERM/SIGINT (all ranks must agree to save together)."""
        flag = self.signal is not None
        if run.distributed:
            t = torch.tensor([float(flag)], device=run.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
            if flag:
                self.signal = self.signal or "SIGTERM"  # another rank was signalled
        return flag

    @property
    def exit_code(self) -> int:
        return 130 if self.signal == "SIGINT" else 143

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class ProgressBar:
    """A tqdm bar on a terminal; in a file or pipe, where every redraw would be another line, a plain line every
    `plain_every` seconds (and at the end) instead. Only rank 0 shows anything."""

    def __init__(self, run: Runtime, stage: str, total: int, initial: int = 0, plain_every: float = 30.0):
        self.stage, self.total, self.plain_every = stage, total, plain_every
        self.plain = run.is_main and not sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, disable=not run.is_main or self.plain, desc=stage,
                        dynamic_ncols=True, mininterval=1.0)
        self.last_plain = 0.0

    def update(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def show(self, row: dict, keys: tuple[str, ...] = ("loss",)) -> None:
        """The latest metrics row (`keys` of it, and tokens/s): the bar's postfix, or (plain) a line when one is
        due."""
        self.bar.set_postfix({**{k: f"{row[k]:.3f}" for k in keys}, "tok_s": f"{row['tokens_per_sec']:.0f}"})
        if self.plain and (time.time() - self.last_plain >= self.plain_every or row["step"] == self.total):
            values = "  ".join(f"{k} {row[k]:.4f}" for k in keys)
            print(f"{self.stage}: step {row['step']}/{self.total}  {values}  lr {row['lr']:.2e}  "
                  f"{row['tokens_per_sec']:.0f} tokens/s  {row['elapsed']:.0f}s", flush=True)
            self.last_plain = time.time()

    def close(self) -> None:
        self.bar.close()


def log_sample(sample_fn, model, step: int, metrics) -> None:
    """Generate the sample text on rank 0 (`model` is None elsewhere), print it and put it in metrics.jsonl."""
    if model is None:
        return
    try:
        text = sample_fn(model)
    except RuntimeError as err:  # e.g. NaN weights after --skip_nonfinite: report, keep training
        text = f"(sampling failed: {err})"
    tqdm.write(f"[step {step}] sample: {text}")
    metrics.log({"step": step, "sample": text})


def write_summary(summary: dict, out_dir: str, run: Runtime) -> dict:
    """summary.json beside the checkpoint (rank 0); returns the summary."""
    if run.is_main:
        atomic_write_json(f"{out_dir}/summary.json", summary, indent=1)
    return summary
