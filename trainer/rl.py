"""The RL loop GRPO and PPO share: sample completions of prompts, score them, then several clipped updates on them.

One step of `train_rl`:

  1. rollout   this rank's share of the step's prompts (batch_size per rank), group_size completions each, sampled
               by model/generation.py (KV cache, per-row stop), all groups in one batch. Each group has its own
               generator, seeded by (seed, step, prompt), so the rollouts are the same under any number of ranks
               and after --resume (up to the bf16 rounding of a different batch).
  2. rewards   a weighted sum of reward functions of (prompt record, completion): a task's reward from evals/, a
               format check, a reward model ... (the stage script builds them)
  3. prepare   the algorithm adds what its loss needs, without gradients: advantages, the rollout policy's
               log-probs, the reference's, values (GRPO: train_grpo.py, PPO: train_ppo.py)
  4. updates   ppo_epochs passes over the rollouts, each in num_mini_batches optimizer steps of micro-batches
               (trainer/step.py's optimizer_step: the algorithm's loss, weighted exactly across micro-batches and
               ranks); from the second update on the policy differs from the one that sampled, so the ratio and
               its clip act
  5. the shared parts for the rest: metrics rows, samples, validation on held-out prompts, checkpoints, resume,
     SIGTERM.

The same parts as trainer/loop.py's supervised train(): training_parts (prepare_model, build_optimizer), start_run
(sampler, --resume, metrics log, checkpointer), lr_at, optimizer_step, LogWindow, StopRequest.
"""

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from dataset.chat import IGNORE_INDEX, render_chat
from dataset.errors import SkipCounter, SuspectCounter, UsageError
from dataset.formats import iter_records
from model.generation import Completion, generate_batch

from .chat_stage import anchored_chat_loss, assistant_loss
from .checkpoint import check_free_space, model_shape
from .config import TrainConfig
from .loop import PLAIN_EVERY, count_skipped, save_or_stop, start_run, summarize, training_parts
from .optim import lr_at
from .progress import LogWindow, ProgressBar, StopRequest
from .runtime import Runtime
from .step import optimizer_step, unpack

# ---------------------------------------------------------------------------------------------------------------------
# Prompts and rewards


@dataclass
class Prompt:
    """One RL prompt: its token ids (the chat up to `<|im_start|>assistant\\n`) and its canonical record
    ({"messages", "meta"}: meta holds task, answer, label, ... for the reward functions)."""

    ids: list[int]
    record: dict


def load_prompts(path: str, tokenizer, max_prompt_tokens: int, skip_bad: bool = False,
                 log: Callable = print) -> list[Prompt]:
    """Every prompt of `path` (dataset/formats.py's "rl" records), rendered with the chat template and tokenized in
    memory. A prompt longer than max_prompt_tokens keeps its last tokens (the question and the assistant header).

    The one place RL reads data: when prepared token files (dataset/prepared.py) carry the records' reward fields,
    this becomes a read of those."""
    skipped, suspect = SkipCounter(), SuspectCounter()
    prompts, cut = [], 0
    for record in iter_records(path, "rl", skip_bad, skipped, suspect):
        text = render_chat(record["messages"], add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_prompt_tokens:
            ids, cut = ids[-max_prompt_tokens:], cut + 1
        prompts.append(Prompt(ids, record))
    if skipped.total:
        log(f"{path}: {skipped.summary()}")
    if suspect.total:
        log(f"{path}: {suspect.summary()}")
    if cut:
        log(f"{path}: {cut} prompt(s) longer than {max_prompt_tokens} tokens kept their last {max_prompt_tokens}")
    if not prompts:
        raise UsageError(f"{path} holds no usable prompts")
    return prompts


@dataclass
class Reward:
    """A reward function and its weight: fn(prompts, completions) -> one reward per completion."""

    name: str
    fn: Callable[[list[Prompt], list[Completion]], list[float] | torch.Tensor]
    weight: float = 1.0


def score(rewards: list[Reward], prompts: list[Prompt], completions: list[Completion],
          device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(weighted sum of the rewards [N], each reward [N] by name) of N completions, prompts[i] answered by
    completions[i]."""
    parts = {r.name: torch.as_tensor(r.fn(prompts, completions), dtype=torch.float32, device=device)
             for r in rewards}
    total = sum(r.weight * parts[r.name] for r in rewards)
    return total, parts


# ---------------------------------------------------------------------------------------------------------------------
# Rollouts


@dataclass
class RLConfig:
    """The RL hyperparameters the loop reads (the optimiser's and the schedule's are TrainConfig's)."""

    group_size: int = 8  # completions per prompt
    max_new_tokens: int = 96
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    ppo_epochs: int = 2  # passes over each batch of rollouts
    num_mini_batches: int = 2  # optimizer steps per pass
    micro_batch_size: int = 16  # rows per forward/backward
    mask_truncated: bool = False  # completions cut at max_new_tokens count for nothing in the loss
    pass_reward: str = "task"  # the reward whose value 1.0 means "solved" (pass@1)
    stop_token_ids: list[int] | None = None  # None: the model's generation_config eos ids
    val_max_batch_rows: int = 64
    pass_at_k: int = 0  # > 0: before and after training, sample this many answers per held-out prompt

    @classmethod
    def from_args(cls, args, **overrides) -> "RLConfig":
        names = cls.__dataclass_fields__
        return cls(**{**{k: getattr(args, k) for k in names if hasattr(args, k)}, **overrides})


def group_seed(seed: int, step: int, index: int) -> int:
    """A generator seed for prompt `index` at `step`: independent of rank, world size and batch layout."""
    digest = hashlib.sha256(f"{seed}/{step}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@torch.no_grad()
def rollout(policy: nn.Module, prompts: list[Prompt], indices: list[int], rl: RLConfig, run: Runtime, seed: int,
            step: int) -> tuple[list[Prompt], list[Completion]]:
    """group_size sampled completions of each prompt: (the prompt of each row, the completions), prompt i's group at
    rows i*G ... i*G+G-1. The groups are sampled together (generate_batch, about rl.val_max_batch_rows rows at a time,
    never splitting a group), each group's rows drawing from the group's own generator."""
    was_training = policy.training
    policy.eval()
    rows = [prompt for prompt in prompts for _ in range(rl.group_size)]
    generators = [torch.Generator(device=run.device).manual_seed(group_seed(seed, step, index)) for index in indices]
    per_call = max(1, rl.val_max_batch_rows // rl.group_size) * rl.group_size
    completions = []
    for start in range(0, len(rows), per_call):
        end = min(start + per_call, len(rows))
        with run.autocast():  # generate_batch sorts rows by length, stably: a group's rows stay together, in order
            completions += generate_batch(policy, [prompt.ids for prompt in rows[start:end]], rl.max_new_tokens,
                                          stop_token_ids=rl.stop_token_ids, do_sample=True,
                                          temperature=rl.temperature, top_p=rl.top_p, top_k=rl.top_k,
                                          generator=[generators[i // rl.group_size] for i in range(start, end)])
    policy.train(was_training)
    return rows, completions


def rollout_batch(prompts: list[Prompt], completions: list[Completion], mask_truncated: bool, pad_id: int,
                  device: torch.device) -> dict[str, torch.Tensor]:
    """The rollouts as training rows, right-padded: input_ids [N, L] (prompt + completion, without its last token),
    labels [N, L] (the next token on completion positions, IGNORE_INDEX elsewhere and on every position of a cut
    completion under mask_truncated), attention_mask [N, L], truncated [N]."""
    sequences = [p.ids + c.tokens for p, c in zip(prompts, completions)]
    width = max(len(s) for s in sequences) - 1
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (prompt, completion, ids) in enumerate(zip(prompts, completions, sequences)):
        n = len(ids) - 1
        input_ids[row, :n], attention_mask[row, :n] = torch.tensor(ids[:-1]), 1
        if not (mask_truncated and completion.finish_reason == "length"):
            start = len(prompt.ids) - 1  # position that predicts the first completion token
            labels[row, start:n] = torch.tensor(ids[start + 1:])
    truncated = torch.tensor([c.finish_reason == "length" for c in completions], dtype=torch.float32)
    return {k: v.to(device) for k, v in dict(input_ids=input_ids, labels=labels, attention_mask=attention_mask,
                                               truncated=truncated).items()}


def take(batch: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The given rows of a batch, with the columns after the longest of them dropped (per-row tensors [N] stay)."""
    width = int(batch["attention_mask"][rows].sum(-1).max())
    length = batch["attention_mask"].shape[1]
    return {k: (v[rows][:, :width] if v.dim() == 2 and v.shape[1] == length else v[rows]) for k, v in batch.items()}


def chunked(fn: Callable[[dict], torch.Tensor], batch: dict[str, torch.Tensor], rows_per_chunk: int) -> torch.Tensor:
    """fn(rows) -> [n, w] over the batch in chunks of rows, reassembled to [N, L] (zero past each chunk's width)."""
    n, length = batch["attention_mask"].shape
    out = None
    for start in range(0, n, rows_per_chunk):
        rows = torch.arange(start, min(start + rows_per_chunk, n), device=batch["attention_mask"].device)
        part = fn(take(batch, rows))
        if out is None:
            out = torch.zeros((n, length), dtype=part.dtype, device=part.device)
        out[rows, :part.shape[1]] = part
    return out


class Algorithm(Protocol):
    """What a stage hands the loop: the module that samples, what its loss needs, and its loss."""

    def policy(self, model: nn.Module) -> nn.Module:
        """The language model inside the trained module (the module itself for GRPO, the actor for PPO)."""

    def prepare(self, model: nn.Module, batch: dict[str, torch.Tensor], run: Runtime) -> dict[str, float]:
        """Add to the batch, without gradients, what loss() reads; return rank-local metrics of the rollouts."""

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """The loss of a micro-batch and its metrics."""

    def loss_items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | int:
        """How many items loss() averages over (rows or tokens): optimizer_step weighs micro-batches and ranks by it."""


@dataclass
class Replay:
    """Replay of earlier chats beside the RL loss (InstructGPT's PPO-ptx, Ouyang et al. 2022): every micro-batch of an
    update also carries `rows` packed rows of `data` (an SFTDataset), and its loss becomes

        RL loss + coef * mean cross-entropy of those rows' assistant tokens
                + kl * mean KL(start || policy) over the same tokens        (with `start`, --replay_kl)

    so that RL on one task does not erase what the policy learnt on others (in the demo, GRPO on sentiment prompts
    alone wiped out the reasoning tasks' <think>/<answer> format: 0.52 -> 0.01). The cross-entropy pulls the policy
    towards the replayed answers; the KL holds its whole next-token distribution on them where the starting policy
    had it (Learning without Forgetting, as the chat stages' --replay_kl on documents). In the demo the KL alone
    kept the distilled model's format (0.996 -> 0.996, against 0.982 with the cross-entropy, whose answers teach
    longer entity lists than the model can end), and seed 42's sentiment gain tripled (docs/demo_experiments.md).
    The rows are drawn at random with one generator per (seed, step, rank): a resumed run draws the same ones. Each
    rank draws its own rows per micro-batch, so with replay 2 ranks no longer follow 1 rank x double batch step for
    step (the RL part does)."""

    data: object
    coef: float
    rows: int
    kl: float = 0.0
    start: nn.Module | None = None  # the starting policy, frozen: the KL's anchor

    def draws(self, seed: int, step: int, rank: int) -> torch.Generator:
        return torch.Generator().manual_seed(group_seed(seed, step, -1_000_000 - rank))

    def attach(self, micro: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The micro-batch with `rows` replay rows under keys replay_input_ids, replay_labels, ..."""
        picks = torch.randint(len(self.data), (self.rows,), generator=generator).tolist()
        items = [self.data[i] for i in picks]
        return {**micro, **{f"replay_{k}": torch.stack([item[k] for item in items]) for k in items[0]}}

    def wrap(self, loss_fn: Callable, policy: nn.Module) -> Callable:
        """loss_fn plus the replay rows' loss under `policy` (the unwrapped module: its gradients are the DDP module's
        parameters' too, reduced once by the one backward); logged as replay_ce (and replay_kl)."""
        def loss(model, batch):
            value, extras = unpack(loss_fn(model, batch))
            replay = {k.removeprefix("replay_"): v for k, v in batch.items() if k.startswith("replay_")}
            if self.start is None:
                ce = assistant_loss(policy, replay)
                return value + self.coef * ce, {**extras, "replay_ce": ce.detach()}
            ce, kl = anchored_chat_loss(policy, self.start, replay)
            return value + self.coef * ce + self.kl * kl, {**extras, "replay_ce": ce.detach(), "replay_kl": kl.detach()}
        return loss


# ---------------------------------------------------------------------------------------------------------------------
# What a metrics row reports about the rollouts


@dataclass
class RolloutStats:
    """Sums over the rollouts since the last metrics row, all-reduced over ranks when the row is made."""

    sums: dict[str, float] = field(default_factory=dict)

    def add(self, **values: float) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)

    def add_rollouts(self, total: torch.Tensor, parts: dict[str, torch.Tensor], completions: list[Completion],
                     group_size: int, pass_reward: str, prepared: dict[str, float]) -> None:
        n = len(completions)
        self.add(n=n, reward=total.sum(), reward_sq=(total ** 2).sum(), steps=1,
                 completion_len=sum(len(c.tokens) for c in completions),
                 truncated=sum(c.finish_reason == "length" for c in completions))
        for name, values in parts.items():
            self.add(**{f"reward/{name}": values.sum(), f"reward_sq/{name}": (values ** 2).sum()})
        groups = total.view(-1, group_size)
        if group_size > 1:  # with one answer per prompt (PPO's default) there are no groups to speak of
            self.add(groups=len(groups), zero_std_groups=(groups.max(1).values == groups.min(1).values).sum())
        if pass_reward in parts:
            solved = (parts[pass_reward] >= 1.0).float()
            self.add(passed=solved.sum(), groups_solved=solved.view(-1, group_size).max(1).values.sum())
        self.add(**{f"prep/{k}": v for k, v in prepared.items()})

    def row(self, run: Runtime, group_size: int) -> dict[str, float]:
        names = sorted(self.sums)
        values = torch.tensor([self.sums[k] for k in names], dtype=torch.float64, device=run.device)
        if run.distributed:
            dist.all_reduce(values)
        s = dict(zip(names, values.tolist()))
        n, steps = max(s["n"], 1), max(s["steps"], 1)

        def std(total: float, squares: float) -> float:
            return math.sqrt(max(squares / n - (total / n) ** 2, 0.0))

        row = {"reward": s["reward"] / n, "reward_std": std(s["reward"], s["reward_sq"])}
        for name in (k.split("/", 1)[1] for k in names if k.startswith("reward/")):
            row[f"reward/{name}"] = s[f"reward/{name}"] / n
            row[f"reward_std/{name}"] = std(s[f"reward/{name}"], s[f"reward_sq/{name}"])
        if "groups" in s:
            row["zero_std_groups"] = s["zero_std_groups"] / max(s["groups"], 1)
        if "passed" in s:
            row["pass@1"] = s["passed"] / n
            if group_size > 1:
                row[f"pass@{group_size}"] = s["groups_solved"] / max(s["groups"], 1)
        row["completion_len"] = s["completion_len"] / n
        row["truncated"] = s["truncated"] / n
        for key in (k for k in names if k.startswith("prep/")):  # one rank-local mean per rank and step
            row[key.split("/", 1)[1]] = s[key] / steps
        # Each rank times its own work; the rate is all ranks' tokens over one rank's (mean) time.
        for what in ("rollout", "update"):
            seconds = s.get(f"{what}_seconds", 0.0) / run.world_size
            row[f"{what}_tokens_per_sec"] = s.get(f"{what}_tokens", 0.0) / max(seconds, 1e-9)
        return row


# ---------------------------------------------------------------------------------------------------------------------
# Held-out prompts


@torch.no_grad()
def evaluate_prompts(policy: nn.Module, prompts: list[Prompt], rewards: list[Reward], rl: RLConfig,
                     run: Runtime) -> dict[str, float]:
    """Mean reward (each and weighted) and pass@1 of greedy answers to held-out prompts, sharded over ranks."""
    mine = prompts[run.rank::run.world_size]
    was_training = policy.training
    policy.eval()
    with run.autocast():
        completions = generate_batch(policy, [p.ids for p in mine], rl.max_new_tokens,
                                     stop_token_ids=rl.stop_token_ids, max_batch_rows=rl.val_max_batch_rows)
    policy.train(was_training)
    total, parts = score(rewards, mine, completions, run.device)
    sums = {"n": float(len(mine)), "val_reward": float(total.sum()),
            **{f"val_reward/{k}": float(v.sum()) for k, v in parts.items()},
            "val_completion_len": float(sum(len(c.tokens) for c in completions))}
    if rl.pass_reward in parts:
        sums["val_pass@1"] = float((parts[rl.pass_reward] >= 1.0).sum())
    names = list(sums)
    values = torch.tensor([sums[k] for k in names], dtype=torch.float64, device=run.device)
    if run.distributed:
        dist.all_reduce(values)
    out = dict(zip(names, values.tolist()))
    n = max(out.pop("n"), 1)
    return {k: v / n for k, v in out.items()}


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from n samples of which c are right (Chen et al. 2021, "Evaluating Large
    Language Models Trained on Code"): 1 - C(n - c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


@torch.no_grad()
def measure_pass_at_k(policy: nn.Module, prompts: list[Prompt], rewards: list[Reward], rl: RLConfig, run: Runtime,
                      k: int, seed: int, prefix: str = "start",
                      before: list[float] | None = None) -> tuple[dict[str, float], list[float]]:
    """How often the policy solves held-out prompts when sampled (rl.temperature, ...): pass@1 with its 95%
    confidence half-width over prompts, and pass@k, from k answers per prompt; sharded over ranks. RL can only raise
    what the policy sometimes finds, so this says whether a task suits RL before training on it; measured again
    after training (same prompts, same seeds) with `before` (this rank's per-prompt pass@1 of the first
    measurement), it adds the paired change `gain_pass@1` and its 95% half-width. Returns the metrics and this
    rank's per-prompt pass@1."""
    mine = list(range(run.rank, len(prompts), run.world_size))
    config = RLConfig(**{**rl.__dict__, "group_size": k})
    rows, completions = rollout(policy, [prompts[i] for i in mine], mine, config, run, seed, step=0)
    _, parts = score(rewards, rows, completions, run.device)
    if rl.pass_reward not in parts:
        return {}, []
    solved = (parts[rl.pass_reward] >= 1.0).view(-1, k).sum(1).tolist()
    rates = [c / k for c in solved]
    gains = [b - a for a, b in zip(before, rates)] if before else []
    sums = torch.tensor([len(rates), sum(rates), sum(r * r for r in rates),
                         sum(pass_at_k(k, int(c), k) for c in solved), sum(gains), sum(g * g for g in gains)],
                        dtype=torch.float64, device=run.device)
    if run.distributed:
        dist.all_reduce(sums)
    n, total, squares, total_k, gain, gain_squares = sums.tolist()

    def mean_and_half_width(total: float, squares: float) -> tuple[float, float]:
        mean = total / max(n, 1)
        std = math.sqrt(max(squares / max(n, 1) - mean ** 2, 0.0) * n / max(n - 1, 1))
        return mean, 1.96 * std / math.sqrt(max(n, 1))

    mean, half = mean_and_half_width(total, squares)
    out = {f"{prefix}_pass@1": mean, f"{prefix}_pass@1_ci95": half, f"{prefix}_pass@{k}": total_k / max(n, 1),
           f"{prefix}_prompts": n}
    if before:
        out["gain_pass@1"], out["gain_pass@1_ci95"] = mean_and_half_width(gain, gain_squares)
    return out, rates


# ---------------------------------------------------------------------------------------------------------------------
# The loop


def update_order(seed: int, step: int, epoch: int, n: int, device: torch.device) -> torch.Tensor:
    """The order of a rollout batch's rows in one pass: seeded, so a resumed run repeats it."""
    generator = torch.Generator().manual_seed(group_seed(seed, step, -1 - epoch))
    return torch.randperm(n, generator=generator).to(device)


def train_rl(model: nn.Module, prompts: list[Prompt], rewards: list[Reward], algorithm: Algorithm, run: Runtime,
             config: TrainConfig, rl: RLConfig, *, val_prompts: list[Prompt] | None = None, tokenizer=None,
             export_fn: Callable | None = None, replay: Replay | None = None) -> dict:
    """Train `model` with `algorithm` on rollouts of `prompts` scored by `rewards`; checkpoints in config.out_dir.
    config.batch_size is prompts per rank per step (each answered rl.group_size times); `replay` adds earlier chats'
    SFT loss to every micro-batch. Returns the summary."""
    c = config
    if c.fsdp and run.distributed:
        raise UsageError("--fsdp is not supported by the RL stages yet (rollouts need the whole policy on every "
                         "rank); use DDP (no --fsdp)")
    if c.lr_find:
        raise UsageError("--lr_find runs on the supervised stages (trainer/lr_find.py), not yet on the RL stages; "
                         "drop it here")
    if c.accumulation_steps != 1:
        raise UsageError("the RL stages split each batch of rollouts by --num_mini_batches and --micro_batch_size; "
                         "leave --accumulation_steps at 1")
    val_split = getattr(c, "val_split", 0.0)
    if val_prompts is None and val_split > 0 and len(prompts) > 1:
        k = max(1, int(len(prompts) * val_split))
        prompts, val_prompts = prompts[:-k], prompts[-k:]
        run.print(f"validation: the last {k} of {len(prompts) + k} prompts are held out (--val_split {val_split:g})")
    if run.is_main:
        check_free_space(c.out_dir, model)
    trainable, optimizer, scaler = training_parts(model, run, c, fsdp=False)
    policy = algorithm.policy(trainable.raw)  # PPO trains a policy and a critic: the policy is saved
    sampler, steps_per_epoch, total_steps, progress, metrics, checkpointer = start_run(
        c, run, trainable, optimizer, scaler, len(prompts), "prompts", tokenizer=tokenizer, export_fn=export_fn,
        shape=model_shape(policy.config))
    pad_id = policy.config.pad_token_id or 0
    check_finite = c.skip_nonfinite or run.device.type == "cpu"
    decode = (lambda ids: tokenizer.decode(ids, skip_special_tokens=True)) if tokenizer else str
    loss_fn = replay.wrap(algorithm.loss, policy) if replay else algorithm.loss

    def prompt_batches():
        epoch, position = progress["epoch"], progress["position"]
        while True:
            sampler.set_epoch(epoch, position)
            indices = list(iter(sampler))
            for start in range(0, len(indices), c.batch_size):
                position += sampler.global_batch
                yield indices[start:start + c.batch_size], epoch, position
            epoch, position = epoch + 1, 0

    def log_eval(step: int) -> dict:
        if not val_prompts:
            return {}
        result = evaluate_prompts(policy, val_prompts, rewards, rl, run)
        metrics.log({"step": step, **result})
        if run.is_main:
            tqdm.write(f"[step {step}] " + "  ".join(f"{k} {v:.4f}" for k, v in result.items()))
        return result

    def log_pass_at_k(step: int, prefix: str, before: list[float] | None = None) -> tuple[dict, list[float]]:
        measured, rates = measure_pass_at_k(policy, val_prompts, rewards, rl, run, rl.pass_at_k, c.seed, prefix, before)
        if measured:
            metrics.log({"step": step, **measured})
            run.print(f"the {'starting' if prefix == 'start' else 'trained'} policy on the held-out prompts: "
                      + "  ".join(f"{k} {v:.3f}" for k, v in measured.items() if not k.endswith("prompts"))
                      + f" ({measured[prefix + '_prompts']:.0f} prompts, {rl.pass_at_k} samples each)")
        return measured, rates

    start, start_rates = {}, None  # before training (not after a resume: then no paired gain is reported)
    if rl.pass_at_k and val_prompts and progress["step"] == 0:
        start, start_rates = log_pass_at_k(0, "start")
    stream = prompt_batches()
    stop = StopRequest()
    bar = ProgressBar(run, c.stage, total_steps, initial=progress["step"], plain_every=PLAIN_EVERY)
    window, stats, last_log, last_eval, skipped_nonfinite = LogWindow(), RolloutStats(), {}, {}, 0
    start_time = time.time() - progress["elapsed"]
    trainable.model.train()
    try:
        while progress["step"] < total_steps:
            step = progress["step"] + 1
            lr = lr_at(progress["step"], total_steps, c.learning_rate, c.min_lr, c.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            indices, epoch, position = next(stream)

            t0 = time.time()
            rows, completions = rollout(policy, [prompts[i] for i in indices], indices, rl, run, c.seed, step)
            stats.add(rollout_tokens=sum(len(x.tokens) for x in completions), rollout_seconds=time.time() - t0)
            total, parts = score(rewards, rows, completions, run.device)
            batch = rollout_batch(rows, completions, rl.mask_truncated, pad_id, run.device)
            batch["rewards"] = total
            with run.autocast():
                prepared = algorithm.prepare(trainable.raw, batch, run)
            stats.add_rollouts(total, parts, completions, rl.group_size, rl.pass_reward, prepared)
            if run.is_main and c.sample_every and step % c.sample_every == 0:
                text = f"{decode(rows[0].ids)} → {decode(completions[0].tokens)} (reward {float(total[0]):.3f})"
                tqdm.write(f"[step {step}] sample: {text}")
                metrics.log({"step": step, "sample": text})

            t1 = time.time()
            draws = replay.draws(c.seed, step, run.rank) if replay else None
            for pass_index in range(rl.ppo_epochs):
                order = update_order(c.seed, step, pass_index, len(total), run.device)
                for mini in order.chunk(rl.num_mini_batches):
                    micro = [take(batch, rows_) for rows_ in mini.split(rl.micro_batch_size)]
                    if replay:
                        micro = [replay.attach(m, draws) for m in micro]
                    result = optimizer_step(trainable.model, trainable.raw, optimizer, scaler, micro, loss_fn,
                                            run, grad_clip=c.grad_clip, loss_items=algorithm.loss_items,
                                            check_finite=check_finite)
                    skipped_nonfinite = count_skipped(result, c, step, skipped_nonfinite)
                    window.add(result)
                    stats.add(update_tokens=float(result.tokens))
            stats.add(update_seconds=time.time() - t1)
            progress.update(step=step, epoch=epoch, position=position)
            bar.update(1)

            if step % c.log_every == 0 or step == total_steps:
                last_log = {**window.row(step, lr, run, progress, start_time, steps_per_epoch),
                            **stats.row(run, rl.group_size)}
                metrics.log(last_log)
                bar.show(last_log, keys=("reward", "loss"))
                window, stats = LogWindow(), RolloutStats()
            if c.eval_every and step % c.eval_every == 0 and step < total_steps:
                last_eval = log_eval(step)
            save_or_stop(step, c, stop, checkpointer, progress, run)
    finally:
        bar.close()
        stop.restore()

    last_eval = log_eval(total_steps) or last_eval
    if rl.pass_at_k and val_prompts:
        end, _ = log_pass_at_k(total_steps, "end", start_rates)
        last_eval = {**last_eval, **{k: v for k, v in {**start, **end}.items() if not k.endswith("prompts")}}
    checkpointer.save(progress)
    return summarize(c, total_steps, steps_per_epoch, progress, last_log, last_eval, skipped_nonfinite, run,
                     **{k: last_log[k] for k in ("reward", "pass@1") if k in last_log})
