"""What the RL stages (GRPO, PPO) share besides the loop: their flags, the reward functions a command line names,
the frozen reference, and loading the policy and the prompts. trainer/rl.py is the loop; the scripts are their
algorithms.

Reward functions (--reward_funcs, each in [0, 1] unless said):
  task          the reward function of the task a prompt's record names (evals/: arith exact answer, sentiment
                label, entity F1, ...), scored against the record's fields; 0 for a prompt without a known task
  think_format  1 for an answer in the <think>/<answer> format
  repetition    distinct character bigrams / bigrams of the answer (1: nothing repeats)
  length        DAPO's soft overlong penalty: 0 up to max_new_tokens - buffer, then linearly down to -1
  reward_model  (--reward_model DIR) a train_reward.py model's score of prompt + answer
"""

import copy

import torch

from dataset.chat import load_tokenizer
from dataset.errors import UsageError
from evals import TASKS
from evals.base import Task
from model import LM
from model.heads import ScalarModel

from .chat_stage import chat_rows
from .cli import require_checkpoint, require_vocab_fits
from .losses import token_logps
from .rl import Prompt, Replay, Reward, chunked, load_prompts

REWARD_FUNCS = ("task", "think_format", "repetition", "length")


def add_rl_flags(p, group_size: int, beta: float) -> None:
    """The flags GRPO and PPO share: sampling, updates per rollout batch, rewards."""
    p.add_argument("--group_size", "--num_generations", type=int, default=group_size,
                   help="sampled answers per prompt")
    p.add_argument("--max_new_tokens", type=int, default=96, help="answer budget per completion")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--ppo_epochs", "--num_iterations", type=int, default=2,
                   help="passes over each batch of rollouts (more than one update: the ratio and the clip act)")
    p.add_argument("--num_mini_batches", type=int, default=2, help="optimizer steps per pass")
    p.add_argument("--micro_batch_size", type=int, default=16, help="rows per forward/backward")
    p.add_argument("--clip_eps", type=float, default=0.2, help="the ratio is clipped to [1 - eps, 1 + eps_high]")
    p.add_argument("--clip_eps_high", type=float, default=None, help="upper clip (default: --clip_eps; DAPO: 0.28)")
    p.add_argument("--beta", "--kl_coef", type=float, default=beta,
                   help="weight of the KL to the frozen starting model (GRPO: in the loss; PPO: a penalty in the "
                        "reward); 0: no reference model at all")
    p.add_argument("--pass_at_k", type=int, default=0,
                   help="before training, sample K answers per held-out prompt: the starting policy's pass@1 (with "
                        "a 95%% interval) and pass@K (RL raises what the policy sometimes solves)")
    p.add_argument("--mask_truncated", action="store_true",
                   help="answers cut at --max_new_tokens count for nothing in the loss")
    p.add_argument("--reward_funcs", default="task",
                   help=f"comma-separated, from {', '.join(REWARD_FUNCS)} (task: each prompt's task from evals/; "
                        "length: DAPO's soft penalty near the budget); empty for none")
    p.add_argument("--reward_model", help="a train_reward.py directory whose score is one more reward")
    p.add_argument("--reward_weights", help="one weight per reward (the reward model last); default all 1")
    p.add_argument("--overlong_buffer", type=int, default=0,
                   help="length reward: 0 up to max_new_tokens - buffer, then down to -1 at the budget "
                        "(default: a quarter of max_new_tokens)")
    p.add_argument("--replay_data",
                   help="chats of earlier stages (SFT's formats; a.jsonl:0.7,b.jsonl:0.3 mixes) whose loss "
                        "(--replay_coef, --replay_kl) is added to every update, so RL on one task does not erase "
                        "others (PPO-ptx)")
    p.add_argument("--replay_coef", type=float, default=1.0, help="weight of the replay rows' cross-entropy")
    p.add_argument("--replay_kl", type=float, default=0.0,
                   help="weight of KL(starting policy || policy) on the replay rows' tokens: holds the policy's "
                        "distribution on earlier stages' chats where it started (0: off; with --replay_coef 0 the "
                        "replay is this anchor alone, as the demo runs it)")
    p.add_argument("--replay_rows", type=int, default=1,
                   help="packed rows of --max_seq_len tokens of replay chats per micro-batch")


def task_of(name: str | None) -> Task | None:
    """The task of evals/ a record's "task" field names (by its record_task, else its name)."""
    for task in TASKS.values():
        if name is not None and name in (getattr(task, "record_task", None), task.name):
            return task if hasattr(task, "reward") else None
    return None


def build_rewards(args, tokenizer, prompts: list[Prompt], device: torch.device, run_print=print) -> list[Reward]:
    """The weighted reward functions --reward_funcs / --reward_model / --reward_weights name."""
    names = [n.strip() for n in (args.reward_funcs or "").split(",") if n.strip()]
    unknown = [n for n in names if n not in REWARD_FUNCS]
    if unknown:
        raise UsageError(f"--reward_funcs: unknown {', '.join(unknown)}; choose from {', '.join(REWARD_FUNCS)}")
    if not names and not args.reward_model:
        raise UsageError("no reward: give --reward_funcs and/or --reward_model")
    if "task" in names:
        missing = sorted({str(p.record["meta"].get("task")) for p in prompts if task_of(p.record["meta"].get("task"))
                          is None})
        if missing and not args.reward_model:
            raise UsageError(f"prompts of task(s) {', '.join(missing)} have no reward function in evals/ (tasks: "
                             f"{', '.join(t.name for t in TASKS.values())}); give them a \"task\" field or add "
                             "--reward_model")
        for number, prompt in enumerate(prompts, 1):  # a field a reward reads, missing, fails now, not hours in
            task = task_of(prompt.record["meta"].get("task"))
            if task is None:
                continue
            try:
                task.reward("", prompt.record)
            except (KeyError, TypeError, ValueError) as exc:
                raise UsageError(f"{args.data_path}: prompt {number} (task {task.name}) lacks what its reward "
                                 f"reads: {type(exc).__name__} {exc}; its task's records carry it (e.g. "
                                 "\"answer\" for arith, \"label\" for sentiment)") from None

    def texts(completions) -> list[str]:
        return [tokenizer.decode(c.tokens, skip_special_tokens=True) for c in completions]

    def task_reward(prompts, completions):
        out = []
        for prompt, text in zip(prompts, texts(completions)):
            task = task_of(prompt.record["meta"].get("task"))
            out.append(task.reward(text, prompt.record) if task is not None else 0.0)
        return out

    budget = args.max_new_tokens
    buffer = args.overlong_buffer or max(1, budget // 4)

    def length_reward(prompts, completions):  # DAPO's soft overlong punishment
        return [min(0.0, (budget - buffer - len(c.tokens)) / buffer) for c in completions]

    functions = {
        "task": task_reward,
        "think_format": lambda prompts, completions: [TASKS["think_format"].reward(t) for t in texts(completions)],
        "repetition": lambda prompts, completions: [TASKS["repetition"].reward(t) for t in texts(completions)],
        "length": length_reward,
    }
    rewards = [Reward(name, functions[name]) for name in names]
    if args.reward_model:
        rewards.append(Reward("reward_model", reward_model_fn(args.reward_model, device)))
    if args.reward_weights:
        weights = [float(w) for w in args.reward_weights.split(",")]
        if len(weights) != len(rewards):
            raise UsageError(f"--reward_weights has {len(weights)} weights for {len(rewards)} rewards "
                             f"({', '.join(r.name for r in rewards)})")
        for reward, weight in zip(rewards, weights):
            reward.weight = weight
    run_print("rewards: " + " + ".join(f"{r.weight:g} x {r.name}" for r in rewards))
    return rewards


def reward_model_fn(path: str, device: torch.device, batch_rows: int = 32):
    """A reward function scoring prompt + answer with a reward model (model/heads.py), frozen."""
    require_checkpoint(path, "python train_reward.py")
    model = ScalarModel.from_pretrained(path).to(device).eval().requires_grad_(False)
    pad = model.config.pad_token_id

    @torch.no_grad()
    def fn(prompts, completions):
        scores = []
        sequences = [p.ids + c.tokens for p, c in zip(prompts, completions)]
        for start in range(0, len(sequences), batch_rows):
            chunk = sequences[start:start + batch_rows]
            width = max(len(s) for s in chunk)
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in chunk], device=device)
            scores += model.sequence_scores(ids).tolist()
        return scores

    return fn


def frozen_copy(policy: LM, device: torch.device) -> LM:
    """A frozen copy of the starting policy."""
    return copy.deepcopy(policy).to(device).eval().requires_grad_(False)


def frozen_reference(policy: LM, beta: float, device: torch.device) -> LM | None:
    """A frozen copy of the starting policy when beta > 0 (else None: no reference kept)."""
    return frozen_copy(policy, device) if beta > 0 else None


def chunked_logps(model, rows_per_chunk: int):
    """fn(batch) -> the log-probs [N, L] of the batch's labels under `model`, computed in chunks of rows."""
    def fn(batch):
        return chunked(lambda b: token_logps(model(b["input_ids"]).logits, b["labels"])[0], batch, rows_per_chunk)
    return fn


def check_rl_args(args) -> None:
    """Refuse RL flag values that cannot work, before anything is loaded."""
    if min(args.group_size, args.max_new_tokens, args.ppo_epochs, args.num_mini_batches, args.micro_batch_size) < 1:
        raise UsageError("--group_size, --max_new_tokens, --ppo_epochs, --num_mini_batches and --micro_batch_size must "
                         "be at least 1")
    if args.pass_at_k < 0:
        raise UsageError("--pass_at_k must be 0 (off) or more")
    if args.max_new_tokens >= args.max_seq_len:
        raise UsageError(f"--max_new_tokens {args.max_new_tokens} leaves no room for the prompt in --max_seq_len "
                         f"{args.max_seq_len}")
    if args.beta < 0:
        raise UsageError("--beta must be 0 or more")
    if args.replay_data and (args.replay_rows < 1 or args.replay_coef < 0 or args.replay_kl < 0):
        raise UsageError("--replay_rows must be at least 1, --replay_coef and --replay_kl 0 or more")
    if args.replay_data and args.replay_coef == args.replay_kl == 0:
        raise UsageError("--replay_coef 0 and --replay_kl 0 give the replay rows no weight: raise one, or drop "
                         "--replay_data")
    if args.replay_kl and not args.replay_data:
        raise UsageError("--replay_kl anchors the replay rows: give --replay_data too")
    if not args.data_path:
        raise UsageError("give --data_path: RL prompts as JSONL ({\"prompt\", \"task\", \"answer\"} or chats ending "
                         "with the user's turn)")


def load_replay(args, tokenizer, run, policy: LM, reference: LM | None) -> Replay | None:
    """--replay_data as packed chat rows (prepared once per node beside --out_dir, as the chat stages do), or None.
    Under --replay_kl the anchor is the starting policy: the reference model when there is one, else a frozen copy."""
    if not args.replay_data:
        return None
    data = chat_rows(args.replay_data, args, tokenizer, run)
    start = (reference if reference is not None else frozen_copy(policy, run.device)) if args.replay_kl else None
    run.print(f"replay: {args.replay_rows} row(s) of {args.replay_data} per micro-batch, weight {args.replay_coef:g}"
              + (f", KL to the starting policy x {args.replay_kl:g}" if start is not None else ""))
    return Replay(data, args.replay_coef, args.replay_rows, args.replay_kl, start)


def load_policy_and_prompts(args, run):
    """The tokenizer, the starting policy, and the training / held-out prompts (tokenized in memory)."""
    tokenizer = load_tokenizer(args.tokenizer_dir)
    policy = LM.from_pretrained(args.init_from)
    require_vocab_fits(policy, tokenizer, args.tokenizer_dir)
    max_prompt = args.max_seq_len - args.max_new_tokens
    prompts = load_prompts(args.data_path, tokenizer, max_prompt, args.skip_bad, run.print)
    val = load_prompts(args.val_data_path, tokenizer, max_prompt, args.skip_bad, run.print) if args.val_data_path \
        else None
    return tokenizer, policy, prompts, val


def format_held_out(summary: dict) -> str:
    """The summary's held-out lines: greedy reward and pass@1, and with --pass_at_k the sampled pass@1 before and
    after training with the paired gain and their 95% intervals."""
    lines = []
    if "val_reward" in summary:
        lines.append(f"   held out, greedy: reward {summary['val_reward']:.3f}"
                     + (f"  pass@1 {summary['val_pass@1']:.3f}" if "val_pass@1" in summary else ""))
    if "end_pass@1" in summary:
        line = f"   held out, sampled: pass@1 {summary['end_pass@1']:.3f} ± {summary['end_pass@1_ci95']:.3f}"
        if "gain_pass@1" in summary:
            line += f"  (gain {summary['gain_pass@1']:+.3f} ± {summary['gain_pass@1_ci95']:.3f} over the start, paired)"
        lines.append(line)
    return "\n".join(lines)
