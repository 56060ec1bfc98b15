"""The one training loop every stage shares.

A stage hands over its model, its dataset and a loss function `loss_fn(model, batch)` returning
the loss (or `(loss, {name: tensor})` of extra metrics); this file does the rest: DDP, mixed
precision, gradient accumulation and clipping, the LR schedule, validation, samples, logging,
checkpoints and --resume.
"""

import contextlib
import json
import math
import signal
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .checkpoint import (
    atomic_write_text,
    check_free_space,
    export_model,
    load_train_state,
    save_sharded_train_state,
    save_train_state,
    set_rng_state,
)
from .cli import UsageError
from .data import ResumableSampler, make_loader, move_to
from .fsdp import FullModel, is_sharded, load_sharded, local, shard_model
from .metrics import MetricsLog
from .optim import build_optimizer, lr_at
from .runtime import Runtime


class NonFiniteLoss(UsageError):
    """The loss became NaN or inf: reported as one line naming the step, exit code 2."""


def unpack(out) -> tuple[torch.Tensor, dict]:
    return out if isinstance(out, tuple) else (out, {})


def count_tokens(batch: dict) -> torch.Tensor | int:
    """Real (non-padding) tokens in a batch: nonzero attention-mask entries, else every input id."""
    if "attention_mask" in batch:
        return (batch["attention_mask"] != 0).sum()
    return batch["input_ids"].numel()


def all_reduce_mean(values: dict[str, float], run: Runtime) -> dict[str, float]:
    if not run.distributed or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=run.device)
    dist.all_reduce(t)
    return dict(zip(values, (t / run.world_size).tolist()))


def micro_batches(dataset, sampler: ResumableSampler, epoch: int, start: int, loader_kwargs: dict):
    """Endless micro-batches across epochs; each comes with (epoch, samples consumed in it)."""
    while True:
        sampler.set_epoch(epoch, start)
        for batch in make_loader(dataset, sampler, **loader_kwargs):
            start += sampler.global_batch
            yield batch, epoch, start
        epoch, start = epoch + 1, 0


@torch.no_grad()
def evaluate(model, dataset, loss_fn: Callable, run: Runtime, collate_fn=None, max_batches: int = 50) -> dict:
    """Mean loss (and extra metrics) over the first `max_batches` batches of `dataset`, all ranks."""
    args = run.args
    was_training = model.training
    model.eval()
    sampler = ResumableSampler(len(dataset), args.batch_size, seed=0, shuffle=False, rank=run.rank,
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

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def loss_scales(batches: list[dict], loss_items: Callable | None, run: Runtime) -> list[torch.Tensor | float]:
    """What each micro-batch's mean loss is multiplied by before backward, so that a step's gradient is the one of
    the mean over all of the step's loss items (on every rank, in every micro-batch).

    Without `loss_items` every micro-batch weighs the same (1 / accumulation_steps; DDP averages over ranks). With
    it, a micro-batch weighs by how many items its loss averages over (SFT: assistant tokens), so 2 ranks x batch b
    and accumulation both train exactly like 1 rank x batch 2b even when rows hold different numbers of tokens.
    """
    if loss_items is None:
        return [1.0 / len(batches)] * len(batches)
    counts = torch.stack([torch.as_tensor(loss_items(b), dtype=torch.float64) for b in batches]).to(run.device)
    total = counts.sum()
    if run.distributed:
        dist.all_reduce(total)
    scales = counts * run.world_size / total.clamp(min=1)  # DDP divides gradients by world_size again
    return list(scales.float().unbind())


def train(model, train_data, loss_fn: Callable, run: Runtime, *, val_data=None, collate_fn=None, tokenizer=None,
          sample_fn: Callable | None = None, export_fn: Callable | None = None, shuffle: bool = True,
          perplexity: bool = True, loss_items: Callable | None = None) -> dict:
    """Train `model` on `train_data` with `loss_fn`; write checkpoints to args.out_dir. Returns a summary.
    `perplexity`: whether exp(val_loss) means something (a language-model loss; not DPO's).
    `loss_items(batch)`: how many items loss_fn's mean is over, when that varies by batch (see loss_scales)."""
    args = run.args
    if run.is_main:
        check_free_space(args.out_dir, model)
    raw_model = model.to(run.device)
    full_model = None
    fsdp = args.fsdp and run.distributed
    if args.fsdp and not run.distributed:
        run.print("--fsdp: a single process has nothing to shard with; training unsharded (start with torchrun)")
    if fsdp:
        if run.dtype == torch.float16:
            raise UsageError("--fsdp trains in bf16 or fp32; use --dtype bf16 (fp16 needs a sharded grad scaler)")
        full_model = FullModel(raw_model, run.is_main)
        shard_model(raw_model)
    optimizer = build_optimizer(raw_model, args.learning_rate, args.weight_decay, run.device)
    scaler = torch.amp.GradScaler(run.device.type) if run.dtype == torch.float16 else None

    sampler = ResumableSampler(len(train_data), args.batch_size, args.seed, shuffle, run.rank, run.world_size)
    micro_per_epoch = sampler.batches_per_epoch()
    if micro_per_epoch < 1:
        raise UsageError(f"the training data has {len(train_data)} samples, fewer than one global batch "
                         f"({sampler.global_batch} = batch_size x processes); lower --batch_size or add data")
    steps_per_epoch = max(1, micro_per_epoch // args.accumulation_steps)
    total_steps = args.max_steps or args.epochs * steps_per_epoch

    progress = {"step": 0, "epoch": 0, "position": 0, "tokens": 0, "elapsed": 0.0}
    if args.resume:
        state = load_train_state(args.out_dir, log=run.print,
                                 load_sharded=lambda path: load_sharded(path, raw_model, optimizer))
        if state is None:
            run.print(f"--resume: no checkpoint in {args.out_dir}/train_state/, starting from step 0")
        else:
            if fsdp and "sharded" not in state:
                raise UsageError(f"{state['path']} was written without --fsdp; resume it without --fsdp (a state "
                                 "written with --fsdp resumes either way)")
            if "model" in state:  # a sharded state went straight into raw_model and optimizer
                raw_model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"]["optimizer"])
                if scaler and state["optimizer"]["scaler"]:
                    scaler.load_state_dict(state["optimizer"]["scaler"])
            set_rng_state(state["rng"])
            progress.update(state["progress"])
            run.print(f"resumed from {state['path']} at step {progress['step']}")

    model = raw_model
    if args.compile:
        t0 = time.time()
        model = torch.compile(model)
        run.print(f"torch.compile: wrapped in {time.time() - t0:.1f}s (kernels compile on the first steps)")
    if run.distributed and not fsdp:
        model = DistributedDataParallel(model, device_ids=[run.device.index] if run.device.type == "cuda" else None)

    metrics = MetricsLog(args.out_dir, enabled=run.is_main, resume=args.resume and progress["step"] > 0,
                         wandb_run=start_wandb(args) if run.is_main and args.wandb else None)
    metrics.truncate_after(progress["step"])
    if run.is_main:
        atomic_write_text(f"{args.out_dir}/args.json", json.dumps(vars(args), indent=1, ensure_ascii=False,
                                                                 default=str))

    loader_kwargs = dict(collate_fn=collate_fn, num_workers=args.num_workers, pin_memory=run.device.type == "cuda")
    stream = micro_batches(train_data, sampler, progress["epoch"], progress["position"], loader_kwargs)
    check_every_step = args.skip_nonfinite or run.device.type == "cpu"  # a host sync; cheap on CPU

    def unsharded_model():
        """The model as one module on rank 0 (None elsewhere); under --fsdp, collective: gathers the shards."""
        if full_model is not None:
            return full_model.refresh()
        return raw_model if run.is_main else None

    def save():
        whole = unsharded_model()
        if run.is_main:
            export_model(whole, args.out_dir, tokenizer, export_fn)
            metrics.plot(f"{args.stage}: {args.out_dir}")
        if fsdp:
            save_sharded_train_state(args.out_dir, raw_model, optimizer, progress, run)
        elif run.is_main:
            save_train_state(args.out_dir, raw_model, optimizer, scaler, progress)
        run.barrier()

    def log_samples(step):
        if sample_fn is None:
            return
        whole = unsharded_model()
        if run.is_main:
            try:
                text = sample_fn(whole)
            except RuntimeError as err:  # e.g. NaN weights after --skip_nonfinite: report, keep training
                text = f"(sampling failed: {err})"
            tqdm.write(f"[step {step}] sample: {text}")
            metrics.log({"step": step, "sample": text})

    def log_eval(step) -> dict:
        if val_data is None:
            return {}
        result = evaluate(raw_model, val_data, loss_fn, run, collate_fn, args.eval_batches)
        if perplexity:
            result["val_ppl"] = math.exp(min(result["val_loss"], 50))
        metrics.log({"step": step, **result})
        if run.is_main:
            tqdm.write(f"[step {step}] " + "  ".join(f"{k} {v:.4f}" for k, v in result.items()))
        return result

    stop = StopRequest()
    bar = tqdm(total=total_steps, initial=progress["step"], disable=not run.is_main, desc=args.stage,
               dynamic_ncols=True, mininterval=1.0)
    window = {"loss": 0.0, "steps": 0, "tokens": 0, "time": time.time(), "extras": {}}
    skipped_nonfinite, last_log, last_eval = 0, {}, {}
    start_time = time.time() - progress["elapsed"]
    model.train()
    try:
        while progress["step"] < total_steps:
            step = progress["step"]
            lr = lr_at(step, total_steps, args.learning_rate, args.min_lr, args.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = torch.zeros((), device=run.device)
            micro_batches_of_step = [next(stream) for _ in range(args.accumulation_steps)]
            scales = loss_scales([b for b, _, _ in micro_batches_of_step], loss_items, run)
            _, epoch, position = micro_batches_of_step[-1]
            for micro, (batch, _, _) in enumerate(micro_batches_of_step):
                batch = move_to(batch, run.device)
                with gradient_sync(model, raw_model, enabled=micro == args.accumulation_steps - 1):
                    with run.autocast():
                        loss, extras = unpack(loss_fn(model, batch))
                    scaled = loss * scales[micro]
                    (scaler.scale(scaled) if scaler else scaled).backward()
                step_loss += loss.detach() * scales[micro]
                window["tokens"] += count_tokens(batch)
                for k, v in extras.items():
                    window["extras"][k] = window["extras"].get(k, 0.0) + v.detach() / args.accumulation_steps
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = local(torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip or float("inf")))
            if check_every_step and not (torch.isfinite(step_loss) and torch.isfinite(grad_norm)):
                if not args.skip_nonfinite:
                    raise NonFiniteLoss(f"loss is {step_loss.item()} (gradient norm {grad_norm.item()}) at step "
                                        f"{step + 1}; the last good checkpoint is in {args.out_dir}/train_state/ "
                                        "(--skip_nonfinite skips such steps)")
                skipped_nonfinite += 1
                optimizer.zero_grad(set_to_none=True)
            else:
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                window["loss"] = window["loss"] + step_loss
                window["steps"] += 1
            progress.update(step=step + 1, epoch=epoch, position=position)
            step += 1
            bar.update(1)

            if step % args.log_every == 0 or step == total_steps:
                last_log = log_window(window, step, lr, run, args, progress, start_time, steps_per_epoch)
                if not math.isfinite(last_log["loss"]) and not args.skip_nonfinite:
                    raise NonFiniteLoss(f"loss became {last_log['loss']} between steps {step - args.log_every + 1} "
                                        f"and {step}; the last good checkpoint is in {args.out_dir}/train_state/")
                metrics.log(last_log)
                bar.set_postfix(loss=f"{last_log['loss']:.3f}", tok_s=f"{last_log['tokens_per_sec']:.0f}")
                window = {"loss": 0.0, "steps": 0, "tokens": 0, "time": time.time(), "extras": {}}
            if args.eval_every and step % args.eval_every == 0 and step < total_steps:
                last_eval = log_eval(step)
            if args.sample_every and step % args.sample_every == 0 and step < total_steps:
                log_samples(step)
            stop_now = stop_requested(stop, run)
            if (args.save_every and step % args.save_every == 0) or stop_now:
                save()
            if stop_now:
                run.print(f"\n{stop.signal}: saved a checkpoint at step {step}; continue with --resume")
                raise SystemExit(130 if stop.signal == "SIGINT" else 143)
    finally:
        bar.close()
        stop.restore()

    last_eval = log_eval(total_steps) or last_eval
    save()
    log_samples(total_steps)
    summary = {
        "stage": args.stage, "steps": total_steps, "epochs": round(total_steps / steps_per_epoch, 2),
        "tokens": progress["tokens"], "seconds": round(progress["elapsed"], 1),
        "tokens_per_sec": round(progress["tokens"] / max(progress["elapsed"], 1e-9)),
        "final_loss": last_log.get("loss"), **last_eval,
        "skipped_nonfinite_steps": skipped_nonfinite, "out_dir": args.out_dir,
    }
    if run.is_main:
        atomic_write_text(f"{args.out_dir}/summary.json", json.dumps(summary, indent=1, ensure_ascii=False))
    return summary


def gradient_sync(model, raw_model, enabled: bool):
    """Gradients are averaged across ranks only on a step's last micro-batch (accumulation needs no traffic)."""
    if is_sharded(raw_model):
        raw_model.set_requires_gradient_sync(enabled)
    if isinstance(model, DistributedDataParallel) and not enabled:
        return model.no_sync()
    return contextlib.nullcontext()


def log_window(window: dict, step: int, lr: float, run: Runtime, args, progress: dict, start_time: float,
               steps_per_epoch: int) -> dict:
    """Average the steps since the last log (one host sync) into a metrics row."""
    steps = max(window["steps"], 1)
    values = {"loss": float(window["loss"]) / steps, "tokens": float(window["tokens"]),
              **{k: float(v) / steps for k, v in window["extras"].items()}}
    values = all_reduce_mean(values, run)
    tokens = values.pop("tokens") * run.world_size
    now = time.time()
    progress["tokens"] += int(tokens)
    progress["elapsed"] = now - start_time
    return {"step": step, "loss": values.pop("loss"), "lr": lr,
            "tokens_per_sec": tokens / max(now - window["time"], 1e-9), "elapsed": round(progress["elapsed"], 2),
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


def stop_requested(stop: StopRequest, run: Runtime) -> bool:
    """Whether any rank got SIGTERM/SIGINT (all ranks must agree to save together)."""
    flag = stop.signal is not None
    if run.distributed:
        t = torch.tensor([float(flag)], device=run.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        flag = bool(t.item())
        if flag:
            stop.signal = stop.signal or "SIGTERM"  # another rank was signalled
    return flag


def start_wandb(args):
    try:
        import wandb
    except ImportError:
        raise UsageError("--wandb needs the wandb package: pip install wandb") from None
    return wandb.init(project="danlu", name=f"{args.stage}", config=vars(args))
