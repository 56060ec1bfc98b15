"""train_pretrain.py end to end on a small real-text corpus, resume after kill -9, bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.conftest import FIXTURES, kill_after_first_checkpoint, pretrain_args, run_script


@pytest.mark.slow
def test_pretrain_mixes_sources_by_weight(tmp_path, corpus, tokenizer_dir):
    """--data_path a:0.9,b:0.1 trains on windows of both token files, in those proportions (dataset/mixing.py)."""
    losses = {}
    for a, b in ((0.9, 0.1), (0.1, 0.9)):
        out = tmp_path / f"pretrain_{a}"
        weighted = f"{corpus['train']}:{a},{corpus['val']}:{b}"
        args = pretrain_args(corpus, tokenizer_dir, out, "--max_steps", "2")
        args[args.index("--data_path") + 1] = weighted
        result = run_script("train_pretrain.py", *args)
        assert "windows of 64" in result.stdout
        saved = json.loads((out / "args.json").read_text())
        assert saved["data_path"] == weighted
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[a] = [r["loss"] for r in rows if "loss" in r]
    assert losses[0.9] and losses[0.9] != losses[0.1]  # same seed, other proportions: other windows


@pytest.mark.slow
def test_pretrain_end_to_end(tmp_path, corpus, tokenizer_dir):
    out = tmp_path / "pretrain"
    result = run_script("train_pretrain.py", *pretrain_args(corpus, tokenizer_dir, out, "--max_steps", "8",
                                                            "--save_every", "4"))
    assert "val perplexity" in result.stdout
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "args.json", "metrics.jsonl", "loss.png"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "train_state").iterdir()) == ["step_00000004", "step_00000008"]

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6, 8]
    assert all({"step", "loss", "lr", "tokens_per_sec", "elapsed"} <= r.keys() for r in train_rows)
    assert all(r["tokens_per_sec"] > 0 for r in train_rows)
    assert [r["step"] for r in rows if "val_loss" in r] == [4, 8]
    assert any("sample" in r for r in rows)
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]  # it learns something in 8 steps

    # The checkpoint is a plain transformers Llama directory.
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert json.loads((out / "args.json").read_text())["max_steps"] == 8


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(tmp_path, corpus, tokenizer_dir):
    steps = ["--max_steps", "30", "--save_every", "3", "--eval_every", "0", "--sample_every", "0"]
    straight = tmp_path / "straight"
    run_script("train_pretrain.py", *pretrain_args(corpus, tokenizer_dir, straight, *steps))

    killed = tmp_path / "killed"
    saved = kill_after_first_checkpoint("train_pretrain.py", *pretrain_args(corpus, tokenizer_dir, killed, *steps),
                                        out_dir=killed)
    assert saved and saved[-1] != "step_00000030", "the run finished before it could be killed"

    result = run_script("train_pretrain.py", *pretrain_args(corpus, tokenizer_dir, killed, *steps, "--resume"))
    assert f"at step {int(saved[-1][5:])}" in result.stdout
    a, b = load_file(straight / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bitwise: same data order, same RNG, same optimizer state
    rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(2, 31, 2))


@pytest.mark.slow
def test_malformed_line_names_file_and_line(tmp_path, corpus, tokenizer_dir):
    bad = tmp_path / "bad.jsonl"
    lines = corpus["train"].read_text(encoding="utf-8").splitlines()[:50]
    lines[6] = '{"text": 123}'
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    args = pretrain_args(corpus, tokenizer_dir, tmp_path / "out", "--max_steps", "2")
    args[args.index("--data_path") + 1] = bad
    result = run_script("train_pretrain.py", *args, check=False)
    assert result.returncode == 2
    assert f"{bad}:7:" in result.stderr and "text" in result.stderr
    assert "Traceback" not in result.stderr

    result = run_script("train_pretrain.py", *args, "--skip_bad", "--batch_size", "2")
    assert "1 skipped" in result.stdout or "skipped 1" in result.stdout


@pytest.mark.slow
def test_missing_tokenizer_is_a_clear_error(tmp_path, corpus):
    result = run_script("train_pretrain.py", "--data_path", corpus["train"], "--tokenizer_dir", tmp_path / "nope",
                        "--out_dir", tmp_path / "out", check=False)
    assert result.returncode == 2
    assert "nope" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_pretrain_with_minimind_tokenizer(tmp_path, corpus):
    minimind = FIXTURES / "minimind"
    if not minimind.is_dir():
        pytest.skip("../shared/fixtures/minimind is absent")
    out = tmp_path / "pretrain"
    run_script("train_pretrain.py", *pretrain_args(corpus, minimind, out, "--max_steps", "2"))
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 6400
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["eos_token"] == "<|im_end|>"
