"""Knowledge distillation from a teacher's logits (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network").

The student learns the teacher's whole next-token distribution, not only the one token the data has:

    loss = (1 - alpha) * CE(student, labels) + alpha * T^2 * KL(teacher_T || student_T)

averaged over the positions the stage trains on (every token when pretraining, the assistant tokens of a chat),
where x_T = softmax(logits / T). A temperature T > 1 flattens both distributions, so the teacher's ranking of the
unlikely tokens carries signal too; the T^2 keeps the KL term's gradient the same size whatever T is. With
`--kd_topk K` only the teacher's K most likely tokens per position are kept, and all other tokens are lumped into one
"rest" outcome, for both models: the KL is then that of two distributions over K + 1 outcomes (the K tokens'
probabilities and 1 minus their sum), which is 0 when the student equals the teacher, never more than the full KL,
and the full KL when K is the vocabulary. The teacher's [tokens, vocab] logits shrink to [tokens, K + 1] before the
student runs: what is kept (or could be stored) is K log-probs and K ids per position.

The teacher is any checkpoint (it may be larger, or a mixture of experts) with the student's tokenizer, checked:
the two distributions are compared token id by token id. It is frozen, in eval mode, run on the same batch under
no_grad, and under --fsdp sharded like the student (as DPO's reference). Validation reports the student's own
cross-entropy as val_loss (so val_ppl stays a perplexity, comparable with a run without a teacher), plus val_kl.
"""

import argparse
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig

from dataset.chat import IGNORE_INDEX
from dataset.errors import UsageError
from dataset.tokenizer import load_tokenizer
from model import LM

from .fsdp import shard_model
from .runtime import Runtime


def add_kd_flags(p: argparse.ArgumentParser) -> None:
    """--teacher and its settings (the pretraining and chat stages)."""
    p.add_argument("--teacher", help="distil from this checkpoint's logits (same tokenizer; frozen; may be larger)")
    p.add_argument("--kd_alpha", type=float, default=0.5,
                   help="weight of the distillation term: (1 - a) * CE(labels) + a * T^2 * KL(teacher || student)")
    p.add_argument("--kd_temperature", type=float, default=2.0, help="softmax temperature T of both models")
    p.add_argument("--kd_topk", type=int, default=0,
                   help="keep only the teacher's K most likely tokens per position, the others lumped into one (0: "
                        "the whole distribution)")


def top_and_rest(logps: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Log-probs [N, K + 1] of the K tokens `ids` and of all the others together, from log-probs [N, vocab]."""
    rest = torch.logsumexp(logps.scatter(-1, ids, float("-inf")), dim=-1, keepdim=True)
    return torch.cat([logps.gather(-1, ids), rest], dim=-1)


def teacher_distribution(teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float,
                         topk: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher's log-probs at temperature T over the scored positions (labels not IGNORE_INDEX), fp32:
    [N, vocab]; or with `topk`, those of its K most likely tokens and of the rest [N, K + 1], and the K ids."""
    logps = F.log_softmax(teacher_logits[labels != IGNORE_INDEX].float() / temperature, dim=-1)
    if not topk or topk >= logps.shape[-1]:
        return logps, None
    ids = logps.topk(min(topk, logps.shape[-1]), dim=-1).indices
    return top_and_rest(logps, ids), ids


def distill_loss(student_logits: torch.Tensor, labels: torch.Tensor, teacher_logps: torch.Tensor,
                 teacher_ids: torch.Tensor | None, alpha: float,
                 temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce, kl), each a mean over the scored positions, given teacher_distribution()'s output."""
    scored = labels != IGNORE_INDEX
    student = student_logits[scored].float()
    n = max(student.shape[0], 1)
    ce = F.cross_entropy(student, labels[scored], reduction="sum") / n
    student_logps = F.log_softmax(student / temperature, dim=-1)
    if teacher_ids is not None:
        student_logps = top_and_rest(student_logps, teacher_ids)
    p = teacher_logps.exp()
    kl = torch.where(p > 0, p * (teacher_logps - student_logps), 0.0).sum() / n  # 0 log 0 = 0
    return (1 - alpha) * ce + alpha * temperature**2 * kl, ce, kl


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, alpha: float,
            temperature: float, topk: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(1 - alpha) * CE + alpha * T^2 * KL(teacher_T || student_T) on logits [..., vocab] against labels [...]
    (already the next tokens; IGNORE_INDEX positions count for nothing): (loss, ce, kl)."""
    teacher_logps, teacher_ids = teacher_distribution(teacher_logits.detach(), labels, temperature, topk)
    return distill_loss(student_logits, labels, teacher_logps, teacher_ids, alpha, temperature)


def make_kd_loss(teacher: LM, logits_fn: Callable, alpha: float, temperature: float, topk: int = 0) -> Callable:
    """loss_fn(model, batch) -> (loss, {"ce", "kl"}) for the trainer. `logits_fn(model, batch)` is how the stage
    runs a model on its batch (the same call for the teacher); labels are batch["labels"]. In eval mode the loss is
    the student's cross-entropy alone (validation perplexity)."""

    def loss_fn(model, batch: dict):
        labels = batch["labels"]
        with torch.no_grad():  # the teacher first: its full logits are gone before the student's are made
            teacher_logps, teacher_ids = teacher_distribution(logits_fn(teacher, batch), labels, temperature, topk)
        loss, ce, kl = distill_loss(logits_fn(model, batch), labels, teacher_logps, teacher_ids, alpha, temperature)
        return (loss if model.training else ce), {"ce": ce.detach(), "kl": kl.detach()}

    return loss_fn


def require_same_tokenizer(teacher_dir: str, student: LM, tokenizer, tokenizer_dir: str) -> str:
    """Stop with one line unless the teacher reads and writes the student's token ids: the same vocab_size, and,
    when the teacher's directory has tokenizer files, the same vocabulary. Returns what was checked."""
    teacher_vocab = PretrainedConfig.get_config_dict(teacher_dir)[0].get("vocab_size")
    if teacher_vocab != student.config.vocab_size:
        raise UsageError(f"--teacher {teacher_dir} has vocab_size {teacher_vocab}, the student "
                         f"{student.config.vocab_size}: distillation compares the two next-token distributions id by "
                         "id, so the teacher must use the student's tokenizer")
    if not os.path.isfile(os.path.join(teacher_dir, "tokenizer.json")):
        return "vocab_size (the teacher's directory has no tokenizer.json)"
    theirs, ours = load_tokenizer(teacher_dir).get_vocab(), tokenizer.get_vocab()
    if theirs != ours:
        differ = len(set(theirs.items()) ^ set(ours.items()))
        raise UsageError(f"--teacher {teacher_dir}: its tokenizer differs from {tokenizer_dir}'s ({differ} "
                         "token-id pairs in one but not the other): distillation compares the two next-token "
                         "distributions id by id, so the teacher must use the student's tokenizer")
    return "same tokenizer"


def distillation(args: argparse.Namespace, student: LM, tokenizer, run: Runtime, logits_fn: Callable) -> Callable:
    """The stage's loss with --teacher: load, check and freeze the teacher (sharded under --fsdp), say so in one
    line, and return make_kd_loss's loss_fn."""
    if not 0 <= args.kd_alpha <= 1:
        raise UsageError(f"--kd_alpha must be between 0 and 1, got {args.kd_alpha}")
    if args.kd_temperature <= 0:
        raise UsageError(f"--kd_temperature must be positive, got {args.kd_temperature}")
    if args.kd_topk < 0:
        raise UsageError(f"--kd_topk must be 0 (all tokens) or positive, got {args.kd_topk}")
    if not os.path.isfile(os.path.join(args.teacher, "config.json")):
        what = "is not a checkpoint directory (no config.json)" if os.path.exists(args.teacher) else "does not exist"
        raise UsageError(f"--teacher {args.teacher} {what}; point it at a trained model's directory")
    checked = require_same_tokenizer(args.teacher, student, tokenizer, args.tokenizer_dir)
    teacher = LM.from_pretrained(args.teacher).to(run.device).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in teacher.parameters())
    sharded = bool(args.fsdp and run.distributed)
    if sharded:
        shard_model(teacher)  # like the student: each rank keeps 1/world_size of it
    run.print(f"teacher: {n_params / 1e6:.2f}M parameters from {args.teacher} ({checked}; frozen"
              f"{', sharded' if sharded else ''}) | loss: {1 - args.kd_alpha:g} * CE + {args.kd_alpha:g} * "
              f"{args.kd_temperature:g}^2 * KL(teacher || student) at T {args.kd_temperature:g}"
              + (f", teacher's top {args.kd_topk} tokens" if args.kd_topk else ""))
    return make_kd_loss(teacher, logits_fn, args.kd_alpha, args.kd_temperature, args.kd_topk)
