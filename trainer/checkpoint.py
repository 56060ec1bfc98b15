"""Checkpoints: the exported model directory, and train_state/ for --resume.

out_dir/                 a transformers Llama directory (config, weights, tokenizer) + args.json,
                         metrics.jsonl, loss.png
out_dir/train_state/step_00000500/   model.pt, optimizer.pt, rng.pt, state.json (written last)
                                     (under --fsdp: sharded/ from torch.distributed.checkpoint, one file per
                                     rank, instead of model.pt and optimizer.pt; see trainer/fsdp.py)

Every write goes to a temporary name first and is renamed into place, so a kill at any moment
leaves the previous checkpoint readable. The two newest train states are kept; a state whose
files do not load is skipped in favour of the one before it. state.json names the stage and the model shape that
wrote it, so `check_output_dir` (run by every stage's setup) can refuse to mix runs: an out_dir holding another
stage's or another shape's checkpoint (unless --overwrite, which deletes it first), --resume from a state that is
not this stage's and shape's, an out_dir that is the --init_from directory.
"""

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from dataset.errors import UsageError
from dataset.tokenizer import save_tokenizer

from .fsdp import load_sharded as load_shards
from .fsdp import save_sharded

STATE_DIR = "train_state"
KEEP_STATES = 2
# What a model's shape is, for telling runs apart: the config fields a train state's tensors depend on.
SHAPE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "num_local_experts", "num_experts_per_tok")
# Every file a stage writes into out_dir (and PEFT / transformers variants of them): what --overwrite deletes.
CHECKPOINT_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                    "pytorch_model.bin", "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin",
                    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "args.json", "metrics.jsonl", "loss.png", "summary.json")


def check_free_space(out_dir: str | Path, model) -> None:
    """Fail before training when out_dir's disk cannot hold the checkpoints this run will write: the exported
    weights (4 bytes per parameter) and KEEP_STATES + 1 train states while a new one is written (4 bytes per
    parameter plus 8 of AdamW moments per trainable one)."""
    n_all = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    needed = 4 * n_all + (KEEP_STATES + 1) * (4 * n_all + 8 * n_trainable) + (1 << 20)
    free = shutil.disk_usage(out_dir).free
    if free < needed:
        raise UsageError(f"--out_dir {out_dir} has {free / 2**20:.1f} MB free; this model's checkpoints need about "
                         f"{needed / 2**20:.1f} MB (weights + {KEEP_STATES + 1} train states while one is written)")


def export_model(model, out_dir: str | Path, tokenizer=None, export_fn=None) -> None:
    """Write the loadable model directory: each file is written aside, then renamed over the old."""
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export.") as tmp:
        if export_fn is not None:
            export_fn(model, tmp)
        else:
            model.save_pretrained(tmp)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), out_dir / name)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_train_state(out_dir: str | Path, model, optimizer, scaler, progress: dict, only: bool = False) -> Path:
    """Everything --resume needs; `progress` holds step, epoch, position in the epoch, counters (and the stage and
    model shape that wrote it). `only`: remove every other state once this one is in place."""
    root = Path(out_dir) / STATE_DIR
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp_step_"))
    torch.save(model.state_dict(), tmp / "model.pt")
    torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None},
               tmp / "optimizer.pt")
    return _finish_state(tmp, root, progress, only)


def save_sharded_train_state(out_dir: str | Path, model, optimizer, progress: dict, run, only: bool = False) -> Path:
    """Collective (--fsdp): every rank writes its shard into step_N/sharded/; rank 0 completes the state."""
    root = Path(out_dir) / STATE_DIR
    tmp = root / f".tmp_step_{progress['step']:08d}"
    if run.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    run.barrier()
    save_sharded(tmp / "sharded", model, optimizer)
    run.barrier()
    final = _finish_state(tmp, root, progress, only) if run.is_main else root / f"step_{progress['step']:08d}"
    run.barrier()
    return final


def _finish_state(tmp: Path, root: Path, progress: dict, only: bool = False) -> Path:
    """Add the RNG state and state.json (last: its presence marks a complete state), rename into place, prune
    (`only`: every other state, e.g. an earlier run's that this fresh run replaces)."""
    final = root / f"step_{progress['step']:08d}"
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(progress, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    states = sorted(root.glob("step_*"))
    for old in [s for s in states if s != final] if only else states[:-KEEP_STATES]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_train_state(out_dir: str | Path, log=print, load_sharded=None) -> dict | None:
    """The newest train state that loads completely, as a dict of its parts; None when there is none.

    A state written under --fsdp is loaded by `load_sharded(path)` (collective: torch.distributed.checkpoint raises
    on every rank when any rank's read fails, so all ranks fall back to the same older state together)."""
    root = Path(out_dir) / STATE_DIR
    for candidate in sorted(root.glob("step_*"), reverse=True):
        try:
            progress = json.loads((candidate / "state.json").read_text())
            state = {"progress": progress, "path": str(candidate),
                     "rng": torch.load(candidate / "rng.pt", map_location="cpu", weights_only=False)}
            if (candidate / "sharded").is_dir():  # written under --fsdp: loaded straight into the model
                state["sharded"] = candidate / "sharded"
                if load_sharded is not None:
                    load_sharded(state["sharded"])
            else:
                state["model"] = torch.load(candidate / "model.pt", map_location="cpu", weights_only=True)
                state["optimizer"] = torch.load(candidate / "optimizer.pt", map_location="cpu", weights_only=False)
            return state
        except Exception as err:  # a truncated or corrupt file: fall back to the state before it
            log(f"warning: checkpoint {candidate} is unreadable ({type(err).__name__}: {err}); trying an older one")
    return None


class Checkpointer:
    """Saves what a run has made so far: the loadable model directory (rank 0) and a train state for --resume
    (rank 0, or every rank's shard under --fsdp). Collective: every rank calls save()."""

    def __init__(self, out_dir: str, trainable, optimizer, scaler, run, tokenizer=None, export_fn=None,
                 metrics=None, title: str = "", stage: str = "", fresh: bool = False, shape: dict | None = None):
        """`stage` and the model's shape (`shape`, default the trainable model's) go into every state.json (what
        check_output_dir compares); `fresh`: this run did not resume, so its first state replaces any earlier run's
        states in out_dir."""
        self.out_dir, self.trainable, self.optimizer, self.scaler, self.run = out_dir, trainable, optimizer, scaler, run
        self.tokenizer, self.export_fn, self.metrics, self.title = tokenizer, export_fn, metrics, title
        self.meta = {"stage": stage, "shape": shape or model_shape(trainable.raw.config)} if stage else {}
        self.replace_earlier = fresh

    def save(self, progress: dict) -> None:
        whole = self.trainable.whole(self.run)
        if self.run.is_main:
            export_model(whole, self.out_dir, self.tokenizer, self.export_fn)
            if self.metrics is not None:
                self.metrics.plot(self.title)
        state, only = {**progress, **self.meta}, self.replace_earlier
        if self.trainable.sharded:
            save_sharded_train_state(self.out_dir, self.trainable.raw, self.optimizer, state, self.run, only)
        elif self.run.is_main:
            save_train_state(self.out_dir, self.trainable.raw, self.optimizer, self.scaler, state, only)
        self.replace_earlier = False
        self.run.barrier()


def new_progress() -> dict:
    """Where a run stands: optimizer steps done, epoch and samples consumed in it, tokens read, seconds trained."""
    return {"step": 0, "epoch": 0, "position": 0, "tokens": 0, "elapsed": 0.0}


def restore(out_dir: str, trainable, optimizer, scaler, run) -> dict:
    """--resume: load the newest readable train state of out_dir into the model, optimizer and RNGs; its progress
    (a fresh one when there is no state)."""
    progress = new_progress()
    state = load_train_state(out_dir, log=run.print,
                             load_sharded=lambda path: load_shards(path, trainable.raw, optimizer))
    if state is None:
        run.print(f"--resume: no checkpoint in {out_dir}/{STATE_DIR}/, starting from step 0")
        return progress
    if trainable.sharded and "sharded" not in state:
        raise UsageError(f"{state['path']} was written without --fsdp; resume it without --fsdp (a state "
                         "written with --fsdp resumes either way)")
    if "model" in state:  # a sharded state went straight into the model and optimizer
        try:
            trainable.raw.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"]["optimizer"])
        except (RuntimeError, ValueError) as err:  # dozens of size mismatches: one line instead
            first = str(err).strip().splitlines()[-1].strip()
            raise UsageError(f"--resume: {state['path']} holds a model of another shape than this run's ({first}); "
                             "resume with the flags that wrote it, or start over with --overwrite") from None
        if scaler and state["optimizer"]["scaler"]:
            scaler.load_state_dict(state["optimizer"]["scaler"])
    set_rng_state(state["rng"])
    progress.update({k: v for k, v in state["progress"].items() if k not in ("stage", "shape")})
    run.print(f"resumed from {state['path']} at step {progress['step']}")
    return progress


# --- what is already in out_dir ----------------------------------------------------------------------------------

def model_shape(config) -> dict:
    """The shape fields of a model config (object or config.json dict)."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    return {key: get(key) for key in SHAPE_KEYS if get(key) is not None}


def shape_text(shape: dict | None) -> str:
    """hidden 64, 2 layers, 4 heads, 2 KV heads, MLP 192, vocab 512"""
    if not shape:
        return "shape unknown"
    names = {"hidden_size": "hidden {}", "num_hidden_layers": "{} layers", "num_attention_heads": "{} heads",
             "num_key_value_heads": "{} KV heads", "intermediate_size": "MLP {}", "vocab_size": "vocab {}",
             "num_local_experts": "{} experts", "num_experts_per_tok": "top-{}"}
    return ", ".join(names[k].format(shape[k]) for k in names if k in shape)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def newest_state(out_dir: str | Path) -> tuple[Path, dict] | None:
    """The newest complete train state of out_dir (one with a readable state.json) and its state.json."""
    for path in sorted((Path(out_dir) / STATE_DIR).glob("step_*"), reverse=True):
        progress = _read_json(path / "state.json")
        if progress:
            return path, progress
    return None


def existing_run(out_dir: str | Path) -> dict | None:
    """What a stage left in out_dir: {"stage", "shape", "state": (path, state.json) or None}; None when out_dir
    holds no checkpoint (no model, adapter or train state). The stage comes from state.json, else args.json, else
    "lora" for an adapter; None when nothing says (e.g. a downloaded model)."""
    out = Path(out_dir)
    state = newest_state(out)
    has_model, has_adapter = (out / "config.json").is_file(), (out / "adapter_config.json").is_file()
    if not (state or has_model or has_adapter):
        return None
    stage = (state[1].get("stage") if state else None) or _read_json(out / "args.json").get("stage") \
        or ("lora" if has_adapter else None)
    shape = model_shape(_read_json(out / "config.json")) if has_model else None
    shape = shape or (state[1].get("shape") if state else None)
    return {"stage": stage, "shape": shape or None, "state": state}


def _whose(run: dict) -> str:
    if not run["stage"]:
        return f"a checkpoint of unknown origin ({shape_text(run['shape'])})"
    article = "an" if run["stage"][0] in "aeiou" or run["stage"] == "sft" else "a"  # an SFT run, a LoRA run
    return f"{article} {run['stage']} run ({shape_text(run['shape'])})"


def clear_checkpoint(out_dir: str | Path) -> list[str]:
    """Delete what a stage writes into out_dir (CHECKPOINT_FILES, train_state/); other files stay. The names."""
    out, removed = Path(out_dir), []
    for name in CHECKPOINT_FILES:
        if (out / name).is_file():
            (out / name).unlink()
            removed.append(name)
    for name in sorted(p.name for p in out.glob("model-*.safetensors")):
        (out / name).unlink()
        removed.append(name)
    if (out / STATE_DIR).is_dir():
        shutil.rmtree(out / STATE_DIR)
        removed.append(STATE_DIR + "/")
    return removed


def check_output_dir(args, shape: dict | None = None, is_main: bool = True, log=print) -> None:
    """Before any work, for every stage: refuse an out_dir that is the --init_from directory; --resume only from a
    state of this stage and `shape`; an out_dir holding another stage's or another shape's checkpoint only with
    --overwrite, which deletes it first (rank 0). `shape`: this run's model shape (default: --init_from's)."""
    out_dir, stage = args.out_dir, args.stage
    init_from = getattr(args, "init_from", None)
    if init_from and os.path.realpath(out_dir) == os.path.realpath(init_from):
        raise UsageError(f"--out_dir {out_dir} is the --init_from directory: this {stage} run would overwrite the "
                         "checkpoint it starts from; give another --out_dir")
    if shape is None and init_from:
        shape = model_shape(_read_json(Path(init_from) / "config.json")) or None
    run = existing_run(out_dir)
    if run is None:
        return
    other_shape = bool(shape and run["shape"] and run["shape"] != shape)
    foreign = run["stage"] != stage or other_shape
    if getattr(args, "resume", False):
        if run["state"] is None:
            return  # restore() says there is nothing to resume
        saved = run["state"][1]
        saved_stage, saved_shape = saved.get("stage") or run["stage"], saved.get("shape") or run["shape"]
        if saved_stage != stage or (shape and saved_shape and saved_shape != shape):
            whose = _whose({"stage": saved_stage, "shape": saved_shape})
            raise UsageError(f"--resume: {run['state'][0]} is the state of {whose}, not of this {stage} run "
                             f"({shape_text(shape)}); give another --out_dir, or --overwrite to start over there")
        return
    if foreign and not getattr(args, "overwrite", False):
        raise UsageError(f"--out_dir {out_dir} holds {_whose(run)}; this {stage} run ({shape_text(shape)}) would mix "
                         "its files with it: give another --out_dir, or --overwrite to delete them first")
    if foreign:
        if is_main:
            removed = clear_checkpoint(out_dir)
            log(f"--overwrite: deleted {_whose(run)} from {out_dir} ({', '.join(removed)})")
    elif run["state"] is not None and is_main:
        log(f"{out_dir} holds an earlier {stage} run (train state at step {run['state'][1].get('step')}); starting "
            "over: this run's first save replaces it (--resume continues it instead)")
