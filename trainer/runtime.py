"""Where and how a run executes: device, precision, torchrun/DDP process group, seeds."""

import contextlib
import ctypes
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import transformers
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dataset.errors import UsageError
from dataset.io import atomic_write_text

from .checkpoint import check_output_dir
from .fsdp import FullModel, shard_model


def cpu_has_bf16_matmul() -> bool:
    """True on CPUs with native bf16 matrix units (AMX or AVX512-BF16), where bf16 matmul is far
    faster than fp32. Without them bf16 is emulated and slower, so `auto` stays in fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def keep_freed_memory() -> None:
    """Tell glibc's malloc to keep freed memory instead of returning it to the OS at once.

    A training step allocates and frees the same large activation buffers every step. By default
    glibc hands blocks over 32 MB (and the top of the heap) back to the kernel, so each step pays
    page faults and zeroing for them again; on the virtual machines here that made a CPU step up to
    1.5x slower (docs/performance.md). No effect outside glibc (macOS, Windows, musl).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, (1 << 31) - 1)
    libc.mallopt(m_top_pad, 256 << 20)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__})")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_bf16_matmul() else torch.float32
    if name == "fp16" and device.type == "cpu":
        raise UsageError("--dtype fp16 is for CUDA; on CPU use bf16 (or fp32)")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


@dataclass
class Runtime:
    """What every part of the trainer needs to know about this process."""

    device: torch.device
    dtype: torch.dtype  # the autocast dtype; parameters stay fp32
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def print(self, *values) -> None:
        if self.is_main:
            print(*values, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_out_dir_writable(out_dir: str) -> None:
    """Fail before training, not at the first checkpoint an hour later."""
    path = Path(out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test_{os.getpid()}"
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as err:
        raise UsageError(f"--out_dir {out_dir} is not writable: {err.strerror or err}") from None


def setup(args, shape: dict | None = None) -> Runtime:
    """Pick device and precision, join the torchrun process group if there is one, check what is already in
    --out_dir (trainer.checkpoint.check_output_dir: `shape` is this run's model shape, default --init_from's),
    write args.json, seed RNGs."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(args.device)
    if device.type == "cpu":
        keep_freed_memory()
    if world_size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    dtype = resolve_dtype(args.dtype, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    check_output_dir(args, shape, is_main=rank == 0, log=lambda line: print(line, flush=True))
    if world_size > 1:
        dist.barrier()  # rank 0 has cleared out_dir (--overwrite) before anyone writes there
    if rank == 0:
        check_out_dir_writable(args.out_dir)
        atomic_write_text(Path(args.out_dir) / "args.json",
                          json.dumps(vars(args), indent=1, ensure_ascii=False, default=str))
    seed_everything(args.seed)
    transformers.utils.logging.disable_progress_bar()  # our own bar is the one to watch
    return Runtime(device=device, dtype=dtype, rank=rank, local_rank=local_rank, world_size=world_size)


def teardown(runtime: Runtime) -> None:
    """The end of a stage script. A process of a torchrun job leaves at once after closing the process group: at
    interpreter shutdown a backend worker thread can still be joinable, and its destructor aborts the process
    ("terminate called without an active exception", exit -6) after all work is done, which fails the whole job
    (seen now and then with --fsdp on CPU). Everything is written by here; wandb is closed first."""
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()
        wandb = sys.modules.get("wandb")
        if wandb is not None and wandb.run is not None:
            wandb.finish()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


@dataclass
class Trainable:
    """The model as the training parts see it. `raw` owns the parameters (sharded under --fsdp) and is what the
    optimizer, checkpoints and evaluation use; `model` runs the training forward (compiled and/or DDP-wrapped)."""

    raw: nn.Module
    model: nn.Module
    full: FullModel | None = None  # --fsdp: an unsharded copy on rank 0, refreshed from the shards on demand

    @property
    def sharded(self) -> bool:
        return self.full is not None

    def whole(self, run: Runtime) -> nn.Module | None:
        """The model as one module on rank 0 (None elsewhere); under --fsdp, collective: gathers the shards."""
        if self.full is not None:
            return self.full.refresh()
        return self.raw if run.is_main else None


def prepare_model(model: nn.Module, run: Runtime, fsdp: bool = False, compile: bool = False) -> Trainable:
    """Move to the device, then shard (--fsdp under torchrun) or wrap in DDP, and torch.compile if asked."""
    raw = model.to(run.device)
    full = None
    if fsdp and not run.distributed:
        run.print("--fsdp: a single process has nothing to shard with; training unsharded (start with torchrun)")
    if fsdp and run.distributed:
        if run.dtype == torch.float16:
            raise UsageError("--fsdp trains in bf16 or fp32; use --dtype bf16 (fp16 needs a sharded grad scaler)")
        full = FullModel(raw, run.is_main)
        shard_model(raw)
    forward = raw
    if compile:
        t0 = time.time()
        forward = torch.compile(forward)
        run.print(f"torch.compile: wrapped in {time.time() - t0:.1f}s (kernels compile on the first steps)")
    if run.distributed and full is None:
        forward = DistributedDataParallel(forward, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    return Trainable(raw=raw, model=forward, full=full)
