"""Where and how a run executes: device, precision, torchrun/DDP process group, seeds."""

import contextlib
import ctypes
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import transformers

from .cli import UsageError


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

    args: object
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


def setup(args) -> Runtime:
    """Pick device and precision, join the torchrun process group if there is one, seed RNGs."""
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
    if rank == 0:
        check_out_dir_writable(args.out_dir)
    seed_everything(args.seed)
    transformers.utils.logging.disable_progress_bar()  # our own bar is the one to watch
    return Runtime(args=args, device=device, dtype=dtype, rank=rank, local_rank=local_rank, world_size=world_size)


def teardown(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()
