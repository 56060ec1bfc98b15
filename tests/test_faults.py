"""Staying alive: SIGTERM / Ctrl-C save a checkpoint, non-finite losses, unwritable and corrupt dirs."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, run_script
from tests.test_pretrain import pretrain_args

QUIET = ["--eval_every", "0", "--sample_every", "0"]


def start(args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train_pretrain.py", *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(out_dir, step: int, proc, timeout=120) -> None:
    deadline = time.time() + timeout
    metrics = out_dir / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any(json.loads(line).get("step", 0) >= step
                                    for line in metrics.read_text().splitlines() if line.strip()):
            return
        time.sleep(0.05)
    raise AssertionError(f"never reached step {step}")


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_a_checkpoint_then_resume_finishes(tmp_path, corpus, tokenizer_dir, sig, code):
    out = tmp_path / "run"
    args = pretrain_args(corpus, tokenizer_dir, out, "--max_steps", "400", "--save_every", "1000",
                         "--log_every", "1", *QUIET)
    proc = start(args)
    wait_for_step(out, 3, proc)
    proc.send_signal(sig)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == code
    assert "saved a checkpoint at step" in stdout
    states = sorted((out / "train_state").glob("step_*"))
    assert len(states) == 1
    stopped_at = json.loads((states[0] / "state.json").read_text())["step"]
    assert 3 <= stopped_at < 400

    args[args.index("--max_steps") + 1] = str(stopped_at + 2)
    result = run_script("train_pretrain.py", *args, "--resume")
    assert f"resumed from {states[0]} at step {stopped_at}" in result.stdout
    assert json.loads((out / "summary.json").read_text())["steps"] == stopped_at + 2


def test_non_finite_loss_stops_naming_the_step(tmp_path, corpus, tokenizer_dir):
    args = pretrain_args(corpus, tokenizer_dir, tmp_path / "run", "--max_steps", "30", "--learning_rate", "1e9",
                         "--grad_clip", "0", "--warmup_steps", "0", *QUIET)
    result = run_script("train_pretrain.py", *args, check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "at step" in result.stderr and ("nan" in result.stderr or "inf" in result.stderr)


def test_skip_nonfinite_counts_skipped_steps(tmp_path, corpus, tokenizer_dir):
    args = pretrain_args(corpus, tokenizer_dir, tmp_path / "run", "--max_steps", "12", "--learning_rate", "1e9",
                         "--grad_clip", "0", "--warmup_steps", "0", "--skip_nonfinite", *QUIET)
    run_script("train_pretrain.py", *args)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_nonfinite_steps"] > 0


def test_unwritable_out_dir_fails_before_training(tmp_path, corpus, tokenizer_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    args = pretrain_args(corpus, tokenizer_dir, blocker / "out", "--max_steps", "2", *QUIET)
    result = run_script("train_pretrain.py", *args, check=False)
    assert result.returncode == 2
    assert "not writable" in result.stderr and "Traceback" not in result.stderr


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, corpus, tokenizer_dir):
    out = tmp_path / "run"
    args = pretrain_args(corpus, tokenizer_dir, out, "--max_steps", "4", "--save_every", "2", *QUIET)
    run_script("train_pretrain.py", *args)
    newest = out / "train_state" / "step_00000004"
    (newest / "model.pt").write_bytes((newest / "model.pt").read_bytes()[:1000])  # a torn write
    args[args.index("--max_steps") + 1] = "6"
    result = run_script("train_pretrain.py", *args, "--resume")
    assert "step_00000004 is unreadable" in result.stdout
    assert "at step 2" in result.stdout


def test_missing_init_from_is_a_clear_error(tmp_path, corpus, tokenizer_dir):
    args = pretrain_args(corpus, tokenizer_dir, tmp_path / "run", "--max_steps", "2", "--init_from",
                         tmp_path / "nowhere", *QUIET)
    result = run_script("train_pretrain.py", *args, check=False)
    assert result.returncode == 2
    assert "nowhere" in result.stderr and "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "run" / "train_state")
