"""One optimisation step: micro-batches, token-weighted loss across ranks, backward, clipping, the update."""

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .data import move_to
from .fsdp import is_sharded, local
from .runtime import Runtime


def unpack(out) -> tuple[torch.Tensor, dict]:
    """A loss_fn returns the loss, or (loss, {name: tensor}) of extra metrics."""
    return out if isinstance(out, tuple) else (out, {})


def with_router_loss(raw_model, loss: torch.Tensor, extras: dict) -> tuple[torch.Tensor, dict]:
    """A mixture-of-experts model's load-balancing loss, from the forward pass the stage's loss_fn just ran
    (model/model.py keeps it in `last_aux_loss`), added with weight `router_aux_loss_coef` and logged as aux_loss:
    so every stage trains an MoE model without its loss knowing about experts. Dense models: unchanged."""
    aux = getattr(raw_model, "last_aux_loss", None)
    if aux is None:
        return loss, extras
    raw_model.last_aux_loss = None  # used once: a stale value must never be added to a later step's loss
    return loss + raw_model.config.router_aux_loss_coef * aux, {**extras, "aux_loss": aux.detach()}


def count_tokens(batch: dict) -> torch.Tensor | int:
    """Real (non-padding) tokens in a batch: nonzero mask / segment-id entries, else every input id."""
    for key in ("segment_ids", "attention_mask"):
        if key in batch:
            return (batch[key] != 0).sum()
    return batch["input_ids"].numel()


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


def gradient_sync(model, raw_model, enabled: bool):
    """Gradients are averaged across ranks only on a step's last micro-batch (accumulation needs no traffic)."""
    if is_sharded(raw_model):
        raw_model.set_requires_gradient_sync(enabled)
    if isinstance(model, DistributedDataParallel) and not enabled:
        return model.no_sync()
    return contextlib.nullcontext()


@dataclass
class StepResult:
    loss: torch.Tensor  # the step's loss (weighted mean over its micro-batches), on the device
    grad_norm: torch.Tensor  # before clipping
    extras: dict[str, torch.Tensor]  # loss_fn's extra metrics, averaged over micro-batches
    tokens: torch.Tensor | int  # real tokens the step read
    applied: bool  # False when the loss or gradient was not finite and the update was skipped


def optimizer_step(model, raw_model, optimizer, scaler, batches: list[dict], loss_fn: Callable, run: Runtime, *,
                   grad_clip: float, loss_items: Callable | None = None, check_finite: bool = False) -> StepResult:
    """Forward and backward every micro-batch of one step, then clip and update (skipped when `check_finite` finds
    a NaN/inf loss or gradient; the caller decides whether that stops the run).

    `model` is what runs the forward (compiled, DDP-wrapped); `raw_model` owns the parameters."""
    scales = loss_scales(batches, loss_items, run)
    step_loss = torch.zeros((), device=run.device)
    extras: dict[str, torch.Tensor] = {}
    tokens: torch.Tensor | int = 0
    for micro, batch in enumerate(batches):
        batch = move_to(batch, run.device)
        with gradient_sync(model, raw_model, enabled=micro == len(batches) - 1):
            with run.autocast():
                loss, batch_extras = with_router_loss(raw_model, *unpack(loss_fn(model, batch)))
            scaled = loss * scales[micro]
            (scaler.scale(scaled) if scaler else scaled).backward()
        step_loss += loss.detach() * scales[micro]
        tokens = tokens + count_tokens(batch)
        for k, v in batch_extras.items():
            extras[k] = extras.get(k, 0.0) + v.detach() / len(batches)
    if scaler:
        scaler.unscale_(optimizer)
    grad_norm = local(torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip or float("inf")))
    applied = not check_finite or bool(torch.isfinite(step_loss) and torch.isfinite(grad_norm))
    if applied:
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(step_loss, grad_norm, extras, tokens, applied)
