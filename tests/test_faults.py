"""Staying alive: SIGTERM / Ctrl-C save a checkpoint, non-finite losses, unwritable, full and corrupt dirs."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from model import LM, LMConfig
from tests.conftest import REPO, pretrain_args, run_script
from trainer import UsageError, exit_cleanly_on_bad_input
from trainer.checkpoint import check_free_space

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


@pytest.mark.slow
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


@pytest.mark.slow
def test_non_finite_loss_stops_naming_the_step(tmp_path, corpus, tokenizer_dir):
    args = pretrain_args(corpus, tokenizer_dir, tmp_path / "run", "--max_steps", "30", "--learning_rate", "1e9",
                         "--grad_clip", "0", "--warmup_steps", "0", *QUIET)
    result = run_script("train_pretrain.py", *args, check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "at step" in result.stderr and ("nan" in result.stderr or "inf" in result.stderr)


@pytest.mark.slow
def test_skip_nonfinite_counts_skipped_steps(tmp_path, corpus, tokenizer_dir):
    args = pretrain_args(corpus, tokenizer_dir, tmp_path / "run", "--max_steps", "12", "--learning_rate", "1e9",
                         "--grad_clip", "0", "--warmup_steps", "0", "--skip_nonfinite", *QUIET)
    run_script("train_pretrain.py", *args)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_nonfinite_steps"] > 0


@pytest.mark.slow
def test_unwritable_out_dir_fails_before_training(tmp_path, corpus, tokenizer_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    args = pretrain_args(corpus, tokenizer_dir, blocker / "out", "--max_steps", "2", *QUIET)
    result = run_script("train_pretrain.py", *args, check=False)
    assert result.returncode == 2
    assert "not writable" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
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


@pytest.mark.slow
def test_missing_init_from_is_a_clear_error(tmp_path, corpus, tokenizer_dir):
    args = pretrain_args(corpus, tokenizer_dir, tmp_path / "run", "--max_steps", "2", "--init_from",
                         tmp_path / "nowhere", *QUIET)
    result = run_script("train_pretrain.py", *args, check=False)
    assert result.returncode == 2
    assert "nowhere" in result.stderr and "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "run" / "train_state")


def test_out_dir_without_room_for_the_checkpoints_fails_before_training(tmp_path, monkeypatch):
    model = LM(LMConfig.from_preset("tiny", vocab_size=512))  # 0.13M parameters: ~6 MB of checkpoints
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=2 << 20))
    with pytest.raises(UsageError, match=r"has 2\.0 MB free; this model's checkpoints need about 6\.\d MB"):
        check_free_space(tmp_path, model)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=7 << 20))
    check_free_space(tmp_path, model)


def test_disk_full_during_training_is_one_line_not_a_traceback(capsys):
    @exit_cleanly_on_bad_input
    def main():
        raise OSError(errno.ENOSPC, "No space left on device", "out/pretrain/metrics.jsonl")

    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: the disk is full writing out/pretrain/metrics.jsonl; ")

    @exit_cleanly_on_bad_input
    def other():
        raise OSError(errno.EIO, "I/O error")

    with pytest.raises(OSError):  # other OS errors are bugs or hardware: shown in full
        other()
