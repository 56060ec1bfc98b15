"""Checkpoints: the exported model directory, and train_state/ for --resume.

out_dir/                 a transformers Llama directory (config, weights, tokenizer) + args.json,
                         metrics.jsonl, loss.png
out_dir/train_state/step_00000500/   model.pt, optimizer.pt, rng.pt, state.json (written last)
                                     (under --fsdp: sharded/ from torch.distributed.checkpoint, one file per
                                     rank, instead of model.pt and optimizer.pt; see trainer/fsdp.py)

Every write goes to a temporary name first and is renamed into place, so a kill at any moment
leaves the previous checkpoint readable. The two newest train states are kept; a state whose
files do not load is skipped in favour of the one before it.
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


def save_train_state(out_dir: str | Path, model, optimizer, scaler, progress: dict) -> Path:
    """Everything --resume needs; `progress` holds step, epoch, position in the epoch, counters."""
    root = Path(out_dir) / STATE_DIR
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp_step_"))
    torch.save(model.state_dict(), tmp / "model.pt")
    torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None},
               tmp / "optimizer.pt")
    return _finish_state(tmp, root, progress)


def save_sharded_train_state(out_dir: str | Path, model, optimizer, progress: dict, run) -> Path:
    """Collective (--fsdp): every rank writes its shard into step_N/sharded/; rank 0 completes the state."""
    root = Path(out_dir) / STATE_DIR
    tmp = root / f".tmp_step_{progress['step']:08d}"
    if run.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    run.barrier()
    save_sharded(tmp / "sharded", model, optimizer)
    run.barrier()
    final = _finish_state(tmp, root, progress) if run.is_main else root / f"step_{progress['step']:08d}"
    run.barrier()
    return final


def _finish_state(tmp: Path, root: Path, progress: dict) -> Path:
    """Add the RNG state and state.json (last: its presence marks a complete state), rename into place, prune."""
    final = root / f"step_{progress['step']:08d}"
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(progress, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(root.glob("step_*"))[:-KEEP_STATES]:
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
                 metrics=None, title: str = ""):
        self.out_dir, self.trainable, self.optimizer, self.scaler, self.run = out_dir, trainable, optimizer, scaler, run
        self.tokenizer, self.export_fn, self.metrics, self.title = tokenizer, export_fn, metrics, title

    def save(self, progress: dict) -> None:
        whole = self.trainable.whole(self.run)
        if self.run.is_main:
            export_model(whole, self.out_dir, self.tokenizer, self.export_fn)
            if self.metrics is not None:
                self.metrics.plot(self.title)
        if self.trainable.sharded:
            save_sharded_train_state(self.out_dir, self.trainable.raw, self.optimizer, progress, self.run)
        elif self.run.is_main:
            save_train_state(self.out_dir, self.trainable.raw, self.optimizer, self.scaler, progress)
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
        trainable.raw.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"]["optimizer"])
        if scaler and state["optimizer"]["scaler"]:
            scaler.load_state_dict(state["optimizer"]["scaler"])
    set_rng_state(state["rng"])
    progress.update(state["progress"])
    run.print(f"resumed from {state['path']} at step {progress['step']}")
    return progress
