"""The supervised loop every stage shares, composed from the trainer's parts.

A stage hands over its model, its dataset and a loss function `loss_fn(model, batch)` returning the loss (or
`(loss, {name: tensor})` of extra metrics); `train()` does the rest with the parts an RL loop composes too:
`prepare_model` (device, DDP / FSDP, compile), `build_optimizer` + `lr_at`, `start_run` (the sampler, `restore` under
--resume, `MetricsLog`, `Checkpointer`), `optimizer_step` (accumulation, token-weighted loss across ranks, clipping),
`evaluate`, `LogWindow` (metrics.jsonl, loss.png, the progress bar), `StopRequest` (SIGTERM / Ctrl-C).
"""

import math
import time
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Subset
from tqdm import tqdm

from dataset.errors import UsageError

from .checkpoint import Checkpointer, check_free_space, new_progress, restore
from .config import TrainConfig
from .data import ResumableSampler, make_loader, move_to
from .lr_find import lr_find
from .metrics import MetricsLog, start_wandb
from .optim import build_optimizer, lr_at
from .progress import LogWindow, ProgressBar, StopRequest, all_reduce_mean, log_sample, write_summary
from .runtime import Runtime, prepare_model
from .step import optimizer_step, unpack


class NonFiniteLoss(UsageError):
    """The loss became NaN or inf: reported as one line naming the step, exit code 2."""


def count_skipped(result, config: TrainConfig, step: int, skipped: int) -> int:
    """A step whose loss or gradient was not finite: stop naming the step, or (--skip_nonfinite) count it."""
    if result.applied:
        return skipped
    if not config.skip_nonfinite:
        raise NonFiniteLoss(f"loss is {result.loss.item()} (gradient norm {result.grad_norm.item()}) at step {step}; "
                            f"the last good checkpoint is in {config.out_dir}/train_state/ (--skip_nonfinite skips "
                            "such steps)")
    return skipped + 1


def save_or_stop(step: int, config: TrainConfig, stop: StopRequest, checkpointer: Checkpointer, progress: dict,
                 run: Runtime) -> None:
    """Checkpoint every --save_every steps, and when SIGTERM / Ctrl-C arrived on any rank: then exit."""
    stop_now = stop.requested(run)
    if (config.save_every and step % config.save_every == 0) or stop_now:
        checkpointer.save(progress)
    if stop_now:
        run.print(f"\n{stop.signal}: saved a checkpoint at step {step}; continue with --resume")
        raise SystemExit(stop.exit_code)


def summarize(config: TrainConfig, total_steps: int, steps_per_epoch: int, progress: dict, last_log: dict,
              last_eval: dict, skipped: int, run: Runtime, **extra) -> dict:
    """The run's summary (printed by format_summary), written to summary.json."""
    return write_summary({
        "stage": config.stage, "steps": total_steps, "epochs": round(total_steps / steps_per_epoch, 2),
        "tokens": progress["tokens"], "seconds": round(progress["elapsed"], 1),
        "tokens_per_sec": round(progress["tokens"] / max(progress["elapsed"], 1e-9)),
        "final_loss": last_log.get("loss"), **extra, **last_eval,
        "skipped_nonfinite_steps": skipped, "out_dir": config.out_dir,
    }, config.out_dir, run)


def micro_batches(dataset, sampler: ResumableSampler, epoch: int, start: int, loader_kwargs: dict) -> Iterator:
    """Endless micro-batches across epochs; each comes with (epoch, samples consumed in it)."""
    while True:
        sampler.set_epoch(epoch, start)
        for batch in make_loader(dataset, sampler, **loader_kwargs):
            start += sampler.global_batch
            yield batch, epoch, start
        epoch, start = epoch + 1, 0


def hold_out(train_data, share: float, run: Runtime) -> tuple:
    """(training samples, validation samples): the last `share` of the samples (at least one) held out, so the
    split is the same on every run and rank; said once."""
    n = len(train_data)
    k = min(max(1, round(n * share)), n - 1)
    if k < 1:
        run.print(f"validation: none (the training data has {n} sample; --val_data_path names held-out data)")
        return train_data, None
    run.print(f"validation: the last {k} of {n} training samples ({k / n:.1%}; --val_split {share:g}) are held out "
              "(--val_data_path names other held-out data, '' none)")
    return Subset(train_data, range(n - k)), Subset(train_data, range(n - k, n))


PLAIN_EVERY = 30.0  # seconds between progress lines when stderr is not a terminal


@torch.no_grad()
def evaluate(model, dataset, loss_fn: Callable, run: Runtime, batch_size: int, collate_fn=None,
             max_batches: int = 50) -> dict:
    """Mean loss (and extra metrics) over the first `max_batches` batches of `dataset`, all ranks."""
    was_training = model.training
    model.eval()
    sampler = ResumableSampler(len(dataset), batch_size, seed=0, shuffle=False, rank=run.rank,
                               world_size=run.world_size)
    if sampler.batches_per_epoch() == 0:  # fewer samples than one global batch: one smaller batch each
        sampler = ResumableSampler(len(dataset), max(1, len(dataset) // run.world_size), seed=0, shuffle=False,
                                   rank=run.rank, world_size=run.world_size)
    totals: dict[str, float] = {}
    n = 0
    for batch in make_loader(dataset, sampler, collate_fn=collate_fn):
        with run.autocast():
            loss, extras = unpack(loss_fn(model, move_to(batch, run.device)))
        for k, v in {"val_loss": loss, **{f"val_{k}": v for k, v in extras.items()}}.items():
            totals[k] = totals.get(k, 0.0) + float(v)
        n += 1
        if n >= max_batches:
            break
    model.train(was_training)
    return all_reduce_mean({k: v / max(n, 1) for k, v in totals.items()}, run)


def training_parts(model: torch.nn.Module, run: Runtime, c: TrainConfig, fsdp: bool):
    """What every training loop starts from: the model on its device (DDP- or FSDP-wrapped, compiled), its optimizer
    (--optimizer, --learning_rate, --weight_decay) and the fp16 loss scaler (None in fp32 and bf16)."""
    trainable = prepare_model(model, run, fsdp=fsdp, compile=c.compile)
    optimizer = build_optimizer(trainable.raw, c.learning_rate, c.weight_decay, run.device,
                                optimizer=c.optimizer, muon_lr=c.muon_lr)
    scaler = torch.amp.GradScaler(run.device.type) if run.dtype == torch.float16 else None
    return trainable, optimizer, scaler


def start_run(c: TrainConfig, run: Runtime, trainable, optimizer, scaler, n_items: int, items: str, *,
              shuffle: bool = True, tokenizer=None, export_fn: Callable | None = None, shape: dict | None = None):
    """What every loop sets up before its first step, supervised or RL: the sampler over n_items (`items` names
    them in the error when they fill less than one global batch), the optimizer steps per epoch and in all, where
    the run stands (restored under --resume), the metrics log, and the checkpointer. Its states name this stage and
    the model's shape (`shape`: default the trainable model's), and in a fresh run its first save replaces an earlier
    run's states."""
    sampler = ResumableSampler(n_items, c.batch_size, c.seed, shuffle, run.rank, run.world_size)
    if sampler.batches_per_epoch() < 1:
        raise UsageError(f"the training data has {n_items} {items}, fewer than one global batch "
                         f"({sampler.global_batch} = batch_size x processes); lower --batch_size or add {items}")
    steps_per_epoch = max(1, sampler.batches_per_epoch() // c.accumulation_steps)
    total_steps = c.max_steps or c.epochs * steps_per_epoch
    progress = restore(c.out_dir, trainable, optimizer, scaler, run) if c.resume else new_progress()
    metrics = MetricsLog(c.out_dir, enabled=run.is_main, resume=c.resume and progress["step"] > 0,
                         wandb_run=start_wandb(c) if run.is_main and c.wandb else None)
    metrics.truncate_after(progress["step"])
    checkpointer = Checkpointer(c.out_dir, trainable, optimizer, scaler, run, tokenizer, export_fn, metrics,
                                title=f"{c.stage}: {c.out_dir}", stage=c.stage, fresh=progress["step"] == 0,
                                shape=shape)
    return sampler, steps_per_epoch, total_steps, progress, metrics, checkpointer


def train(model, train_data, loss_fn: Callable, run: Runtime, config: TrainConfig, *, val_data=None,
          collate_fn=None, tokenizer=None, sample_fn: Callable | None = None, export_fn: Callable | None = None,
          shuffle: bool = True, perplexity: bool = True, loss_items: Callable | None = None) -> dict:
    """Train `model` on `train_data` with `loss_fn`; write checkpoints to config.out_dir. Returns a summary.
    `sample_fn(model) -> str`: text generated during training. `export_fn(model, dir)`: what the model directory
    holds (default: save_pretrained). `perplexity`: whether exp(val_loss) means something (not for DPO).
    `loss_items(batch)`: how many items loss_fn's mean is over, when that varies by batch (see step.loss_scales)."""
    c = config
    if c.lr_find:  # the learning-rate range test instead of training: a plot and a suggestion, no checkpoint
        lr_find(model, train_data, loss_fn, run, c, collate_fn=collate_fn, shuffle=shuffle, loss_items=loss_items)
        raise SystemExit(0)
    if run.is_main:
        check_free_space(c.out_dir, model)
    if val_data is None and c.val_split > 0:
        train_data, val_data = hold_out(train_data, c.val_split, run)
    elif val_data is None:
        run.print("validation: none (no --val_data_path): val_loss is not measured")
    trainable, optimizer, scaler = training_parts(model, run, c, fsdp=c.fsdp)

    sampler, steps_per_epoch, total_steps, progress, metrics, checkpointer = start_run(
        c, run, trainable, optimizer, scaler, len(train_data), "samples", shuffle=shuffle, tokenizer=tokenizer,
        export_fn=export_fn)
    stream = micro_batches(train_data, sampler, progress["epoch"], progress["position"],
                           dict(collate_fn=collate_fn, num_workers=c.num_workers,
                                pin_memory=run.device.type == "cuda"))
    check_finite = c.skip_nonfinite or run.device.type == "cpu"  # a host sync every step; cheap on CPU

    def log_samples(step: int) -> None:
        if sample_fn is not None:
            log_sample(sample_fn, trainable.whole(run), step, metrics)

    def log_eval(step: int) -> dict:
        if val_data is None:
            return {}
        result = evaluate(trainable.raw, val_data, loss_fn, run, c.batch_size, collate_fn, c.eval_batches)
        if perplexity:
            result["val_ppl"] = math.exp(min(result["val_loss"], 50))
        metrics.log({"step": step, **result})
        if run.is_main:
            tqdm.write(f"[step {step}] " + "  ".join(f"{k} {v:.4f}" for k, v in result.items()))
        return result

    stop = StopRequest()
    bar = ProgressBar(run, c.stage, total_steps, initial=progress["step"], plain_every=PLAIN_EVERY)
    window, last_log, last_eval, skipped_nonfinite = LogWindow(), {}, {}, 0
    start_time = time.time() - progress["elapsed"]
    trainable.model.train()
    try:
        while progress["step"] < total_steps:
            lr = lr_at(progress["step"], total_steps, c.learning_rate, c.min_lr, c.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            pulled = [next(stream) for _ in range(c.accumulation_steps)]
            result = optimizer_step(trainable.model, trainable.raw, optimizer, scaler, [b for b, _, _ in pulled],
                                    loss_fn, run, grad_clip=c.grad_clip, loss_items=loss_items,
                                    check_finite=check_finite)
            step = progress["step"] + 1
            skipped_nonfinite = count_skipped(result, c, step, skipped_nonfinite)
            window.add(result)
            progress.update(step=step, epoch=pulled[-1][1], position=pulled[-1][2])
            bar.update(1)

            if step % c.log_every == 0 or step == total_steps:
                last_log = window.row(step, lr, run, progress, start_time, steps_per_epoch)
                if not math.isfinite(last_log["loss"]) and not c.skip_nonfinite:
                    raise NonFiniteLoss(f"loss became {last_log['loss']} between steps {step - c.log_every + 1} "
                                        f"and {step}; the last good checkpoint is in {c.out_dir}/train_state/")
                metrics.log(last_log)
                bar.show(last_log)
                window = LogWindow()
            if c.eval_every and step % c.eval_every == 0 and step < total_steps:
                last_eval = log_eval(step)
            if c.sample_every and step % c.sample_every == 0 and step < total_steps:
                log_samples(step)
            save_or_stop(step, c, stop, checkpointer, progress, run)
    finally:
        bar.close()
        stop.restore()

    last_eval = log_eval(total_steps) or last_eval
    checkpointer.save(progress)
    log_samples(total_steps)
    return summarize(c, total_steps, steps_per_epoch, progress, last_log, last_eval, skipped_nonfinite, run)
