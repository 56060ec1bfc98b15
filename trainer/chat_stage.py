"""What the chat stages (SFT, LoRA, reasoning distillation) share: packed chat data, the previous stage's model,
the assistant-token loss, and `run_chat_stage`, which wires them into `train()`.

A chat stage script is then its flags, its data's weights (or its change to the model), and one call:

    run_chat_stage(args)                                        # SFT (with --teacher: knowledge distillation)
    run_chat_stage(args)                                        # distillation: its tags in args.token_weight
    run_chat_stage(args, adapt_model=add_adapters, export_fn=save_adapter)   # LoRA: another model
"""

import argparse
import copy
import functools
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from dataset.chat import ENDOFTEXT, IGNORE_INDEX
from dataset.errors import UsageError
from dataset.lm_dataset import SFTDataset
from dataset.prepared import once_per_node
from dataset.tokenizer import load_tokenizer
from model import LM

from .cli import at_least, between, require_vocab_fits
from .config import TrainConfig
from .fsdp import shard_model
from .kd import distillation
from .loop import train
from .losses import label_logps, logps_at
from .progress import format_summary
from .runtime import Runtime, setup, teardown
from .sampling import make_sample_fn


def add_chat_flags(p: argparse.ArgumentParser) -> None:
    """The flags of every chat stage's data."""
    p.add_argument("--system_prompt_ratio", type=between(0, 1), default=0.0,
                   help="share of conversations without a system turn that get a random one")
    p.add_argument("--no_pack", action="store_true", help="one conversation per row, padded (for comparison)")
    p.add_argument("--prompt_loss_weight", type=between(0, 1), default=0.0,
                   help="loss weight of the prompt's tokens (system and user turns, template headers) against the "
                        "answer's 1: 0 trains on answers only; a little keeps the language model (the demo: 0.1)")
    p.add_argument("--token_weight", type=token_weight_list, default=[],
                   help="answer tokens that count more in the loss, TEXT:W[,TEXT:W...], each TEXT one token of the "
                        "tokenizer: 正:4,负:4 counts the sentiment verdict 4 times (the demo's SFT); replayed "
                        "documents' tokens too; validation stays unweighted")
    p.add_argument("--replay_kl", type=at_least(0, float), default=0.0,
                   help="on the documents ({\"text\"} records) mixed into the data, add this times KL(starting model "
                        "|| model) to each position's cross-entropy: the model keeps its own next-token distribution "
                        "on plain text, not only the text's tokens (0: off; the demo: 4 in SFT, 1 in LoRA, 10 in "
                        "distillation)")


def token_weight_list(value: str) -> list[tuple[str, float]]:
    """--token_weight's TEXT:W[,TEXT:W...], each W above 0."""
    pairs = []
    for item in value.split(","):
        text, _, weight = item.rpartition(":")
        try:
            number = float(weight)
        except ValueError:
            number = 0.0
        if not text or not number > 0:
            raise argparse.ArgumentTypeError(f"{item!r} is not TEXT:WEIGHT with a weight above 0 (e.g. 正:4)")
        pairs.append((text, number))
    return pairs


def token_weight_ids(pairs: list[tuple[str, float]], tokenizer) -> dict[int, float]:
    """--token_weight's texts as token ids; a text that is not one token of the tokenizer is a usage error."""
    ids = {}
    for text, weight in pairs:
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) != 1:
            pieces = " ".join(repr(tokenizer.decode([i])) for i in encoded)
            raise UsageError(f"--token_weight {text}:{weight:g}: {text!r} is {len(encoded)} tokens of this tokenizer "
                             f"({pieces}), not one; weight one of them")
        ids[encoded[0]] = weight
    return ids


def packing(batch: dict, rows: torch.Tensor | slice = slice(None)) -> dict:
    """The model's keyword arguments for a batch of packed rows (or some of its rows): each conversation attends only
    to itself (segment_ids) and its positions restart at 0 (position_ids)."""
    return dict(segment_ids=batch["segment_ids"][rows], position_ids=batch["position_ids"][rows])


def packed_logits(model, batch: dict) -> torch.Tensor:
    """Logits of a batch of packed rows."""
    return model(batch["input_ids"], **packing(batch)).logits


class TextAnchor:
    """--replay_kl: the stage's starting model, frozen, as the anchor of the model's distribution on plain text.

    Replaying pretraining documents with their tokens as targets slows the forgetting of the language model but
    does not stop it: in the demo, reasoning distillation with 5% documents still took the news perplexity from
    434 to 505. On those same documents each position's loss gets `weight * KL(start || model)` added to its
    cross-entropy, the KL from the starting model's next-token distribution to the model's: the whole distribution
    is the target, not one token, which is Learning without Forgetting (Li & Hoiem 2016) applied to the replayed
    text alone (distillation from the same model at weight 10: 455, the format unharmed). The chats, where the stage
    is meant to change the model, are not anchored. The KL is summed per position into the loss's numerator, whose
    denominator stays the weights' sum, so micro-batches and ranks still add up to one larger batch exactly.
    """

    def __init__(self, model: LM, weight: float, document_start: int, sharded: bool = False):
        self.model, self.weight, self.document_start = model, weight, document_start
        self.sharded = sharded  # under FSDP every rank must run the starting model on every batch, documents or not

    def documents(self, batch: dict) -> torch.Tensor:
        """[B, T] bool: the scored positions of the packed segments that are documents, those that begin with
        <|endoftext|> (dataset/chat.py's document_segments; a chat begins with <|im_start|>)."""
        positions = batch["position_ids"]
        index = torch.arange(positions.shape[1], device=positions.device).expand_as(positions)
        segment_start = torch.where(positions == 0, index, 0).cummax(dim=1).values
        first_token = batch["input_ids"].gather(1, segment_start)
        return (first_token == self.document_start) & (batch["labels"] != IGNORE_INDEX)

    def kl_sum(self, batch: dict, documents: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """KL(start || model) summed over the document positions, given the model's logits there [N, V]."""
        # The starting model runs on the rows that hold a document (on all of them when sharded).
        return kl_sum_from(self.model, batch, documents, logits, rows=slice(None) if self.sharded else None)


def kl_sum_from(start: LM, batch: dict, at: torch.Tensor, logits: torch.Tensor, rows=None) -> torch.Tensor:
    """KL(start || model) summed over the positions `at` [B, T] of a packed batch, given the model's logits there
    [N, V]. The frozen `start` runs on `rows` of the batch (default: the rows with a position in `at`)."""
    rows = at.any(dim=1) if rows is None else rows
    with torch.no_grad():
        theirs = start(batch["input_ids"][rows], logits_at=at[rows], **packing(batch, rows)).logits
        theirs = F.log_softmax(theirs.float(), dim=-1)
    return F.kl_div(F.log_softmax(logits.float(), dim=-1), theirs, log_target=True, reduction="sum")


def assistant_loss(model, batch: dict, weights: torch.Tensor | None = None,
                   anchor: TextAnchor | None = None) -> torch.Tensor:
    """Mean cross-entropy over assistant tokens (labels are already the next tokens, IGNORE_INDEX elsewhere); with
    weights [B, T] (default: the batch's loss_weights under --prompt_loss_weight or --token_weight)
    sum(w * nll) / sum(w). The output layer runs only at the scored positions (trainer/losses.py's label_logps).
    With an anchor (--replay_kl), in training: (sum(w * nll) + anchor.weight * the KL summed over the documents'
    positions) / sum(w); validation stays the cross-entropy."""
    weights = batch.get("loss_weights") if weights is None else weights
    documents = anchor.documents(batch) if anchor is not None and model.training else None
    if documents is not None and (documents.any() or anchor.sharded):
        # The anchor needs the model's whole distribution at the documents' positions: one forward gives the logits
        # at every scored position, for the cross-entropy and, at the documents', the KL.
        scored = batch["labels"] != IGNORE_INDEX
        logits = model(batch["input_ids"], logits_at=scored, **packing(batch)).logits
        logps, mask = logps_at(logits, batch["labels"], scored)
        kl = anchor.weight * anchor.kl_sum(batch, documents, logits[documents[scored]])
    else:
        logps, mask = label_logps(model, batch["input_ids"], batch["labels"], **packing(batch))
        kl = 0.0
    if weights is not None:
        mask = mask * weights.to(mask.dtype)
    return (kl - (logps * mask).sum()) / mask.sum().clamp(min=1e-8)


def anchored_chat_loss(model, start: LM, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean cross-entropy over a batch's scored tokens and the mean KL(start || model) there, from one forward
    of the model: the RL stages' replay under --replay_kl, where every replayed token is anchored, chats and
    documents alike."""
    scored = batch["labels"] != IGNORE_INDEX
    logits = model(batch["input_ids"], logits_at=scored, **packing(batch)).logits
    logps, mask = logps_at(logits, batch["labels"], scored)
    count = mask.sum().clamp(min=1)
    return -(logps * mask).sum() / count, kl_sum_from(start, batch, scored, logits) / count


def assistant_tokens(batch: dict) -> torch.Tensor:
    """What assistant_loss averages over, the number of assistant tokens (or the weights' sum): the trainer weighs
    micro-batches and ranks by it."""
    scored = batch["labels"] != IGNORE_INDEX
    return scored.sum() if "loss_weights" not in batch else batch["loss_weights"][scored].sum()


def chat_rows(path: str, args: argparse.Namespace, tokenizer, run: Runtime, system_prompt_ratio: float = 0.0,
              pack: bool = True, prompt_loss_weight: float = 0.0,
              token_weights: dict[int, float] | None = None) -> SFTDataset:
    """The chats of `path` as rows of --max_seq_len tokens, prepared once per node into the `prepared` folder beside
    --out_dir (dataset/prepared.py); only rank 0 prints their stats."""
    return once_per_node(lambda: SFTDataset(
        path, tokenizer, args.max_seq_len, skip_bad=args.skip_bad, system_prompt_ratio=system_prompt_ratio,
        seed=args.seed, pack=pack, quiet=not run.is_main, cache_dir=Path(args.out_dir).parent / "prepared",
        prompt_loss_weight=prompt_loss_weight, token_weights=token_weights), run.local_rank, run.barrier)


def chat_data(args: argparse.Namespace, tokenizer, run: Runtime) -> tuple[SFTDataset, SFTDataset | None]:
    """The train and (optional) validation datasets of chat rows (packed unless --no_pack). Validation scores the
    answers alone whatever --prompt_loss_weight and --token_weight are, so val loss compares across runs."""
    train_data = chat_rows(args.data_path, args, tokenizer, run, args.system_prompt_ratio, pack=not args.no_pack,
                           prompt_loss_weight=args.prompt_loss_weight,
                           token_weights=token_weight_ids(args.token_weight, tokenizer))
    val_data = chat_rows(args.val_data_path, args, tokenizer, run, pack=not args.no_pack) if args.val_data_path \
        else None
    return train_data, val_data


def load_checkpoint(args: argparse.Namespace, tokenizer, run: Runtime) -> LM:
    """The previous stage's model (--init_from), checked against the tokenizer, with a one-line description."""
    model = LM.from_pretrained(args.init_from)
    require_vocab_fits(model, tokenizer, args.tokenizer_dir)
    n_params = sum(p.numel() for p in model.parameters())
    run.print(f"model: {n_params / 1e6:.2f}M parameters from {args.init_from} | {run.device} "
              f"{str(run.dtype).split('.')[-1]} x {run.world_size} process(es)")
    return model


def text_anchor(args: argparse.Namespace, start: LM, tokenizer, run: Runtime) -> TextAnchor:
    """--replay_kl's anchor: a frozen copy of the starting model as loaded (before LoRA's adapters; sharded under
    --fsdp, as the student is), with a one-line description."""
    model = copy.deepcopy(start).to(run.device).eval().requires_grad_(False)
    sharded = bool(args.fsdp and run.distributed)
    if sharded:
        shard_model(model)
    run.print(f"replay KL: {args.replay_kl:g} * KL({args.init_from} || model) added to each document token's "
              f"cross-entropy (the chats are not anchored{'; the starting model sharded' if sharded else ''})")
    return TextAnchor(model, args.replay_kl, tokenizer.convert_tokens_to_ids(ENDOFTEXT), sharded)


def run_chat_stage(args: argparse.Namespace, adapt_model: Callable[[LM, Runtime], None] | None = None,
                   export_fn: Callable | None = None) -> dict:
    """Everything a chat stage does: load data and model, train, report. Returns train()'s summary.

    The loss is assistant_loss (anchored under --replay_kl; --teacher's distillation instead), its mean over
    assistant_tokens, the batch's loss_weights' sum. `adapt_model(model, run)` changes the loaded model in
    place before training (LoRA adds its adapters); `export_fn(model, dir)` writes the output directory.
    """
    run = setup(args)
    tokenizer = load_tokenizer(args.tokenizer_dir)
    train_data, val_data = chat_data(args, tokenizer, run)
    model = load_checkpoint(args, tokenizer, run)
    anchor = text_anchor(args, model, tokenizer, run) if args.replay_kl else None
    if adapt_model is not None:
        adapt_model(model, run)
    if getattr(args, "teacher", None):  # --teacher (trainer/kd.py): CE and KL on the same assistant tokens
        if args.prompt_loss_weight:
            raise UsageError(f"{args.stage}: --teacher distils on the answers; it takes no --prompt_loss_weight")
        if anchor is not None:
            raise UsageError(f"{args.stage}: --teacher replaces the loss --replay_kl adds to; use one of the two")
        if args.token_weight:
            raise UsageError(f"{args.stage}: --teacher weighs every answer token alike; it takes no --token_weight")
        loss_fn = distillation(args, model, tokenizer, run, packed_logits)
    else:
        loss_fn = functools.partial(assistant_loss, anchor=anchor) if anchor is not None else assistant_loss
    sample_fn = make_sample_fn(tokenizer, args.sample_prompt, chat=True, max_new_tokens=args.sample_tokens,
                               autocast=run.autocast)
    summary = train(model, train_data, loss_fn, run, TrainConfig.from_args(args), val_data=val_data,
                    tokenizer=tokenizer, sample_fn=sample_fn, export_fn=export_fn, loss_items=assistant_tokens)
    run.print(format_summary(summary))
    teardown(run)
    return summary
