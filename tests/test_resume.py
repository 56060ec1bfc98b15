"""Exact resume: kill -9 a run after a checkpoint, --resume it, and end with the weights of a run never stopped.

Bitwise in fp32 on CPU for pretraining (tests/test_pretrain.py), SFT and DPO; in bf16 autocast the master weights
stay fp32 and the kernels are deterministic, so the difference is reported and bounded here too.
"""

import pytest
from safetensors.torch import load_file

from tests.conftest import kill_after_first_checkpoint, metric_losses, pretrain_args, run_script

CHAT = ["--max_seq_len", "96", "--batch_size", "2", "--warmup_steps", "2", "--learning_rate", "1e-3",
        "--val_data_path", "", "--log_every", "1", "--eval_every", "0", "--sample_every", "0", "--max_steps", "24",
        "--save_every", "3"]


def max_difference(a_dir, b_dir) -> float:
    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def interrupted_and_straight(script: str, args: list, tmp_path) -> tuple[float, str]:
    """Run `args` once straight and once killed after its first checkpoint then resumed; weights' max |diff|."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_script(script, *args, "--out_dir", straight)
    saved = kill_after_first_checkpoint(script, *args, "--out_dir", killed, out_dir=killed)
    assert saved and saved[-1] != "step_00000024", "the run finished before it could be killed"
    result = run_script(script, *args, "--out_dir", killed, "--resume")
    assert f"at step {int(saved[-1][5:])}" in result.stdout
    assert metric_losses(killed)[-1] == metric_losses(straight)[-1]
    return max_difference(straight, killed), saved[-1]


@pytest.mark.slow
@pytest.mark.parametrize("script,data,extra", [
    ("train_sft.py", "chats", []),
    ("train_dpo.py", "pairs", []),
    ("train_dpo.py", "pairs", ["--precompute_ref"]),
])
def test_chat_stage_resumes_bitwise_after_kill(chat_checkpoint, tmp_path, script, data, extra):
    args = ["--data_path", chat_checkpoint[data], "--init_from", chat_checkpoint["model"], *CHAT, "--dtype", "fp32",
            *extra]
    difference, _ = interrupted_and_straight(script, args, tmp_path)
    assert difference == 0.0


@pytest.mark.slow
def test_bf16_resume_difference_is_reported(corpus, tokenizer_dir, tmp_path, capsys):
    args = pretrain_args(corpus, tokenizer_dir, tmp_path / "unused", "--max_steps", "24", "--save_every", "3",
                         "--eval_every", "0", "--sample_every", "0", "--dtype", "bf16")
    out_at = args.index("--out_dir")
    del args[out_at:out_at + 2]
    difference, killed_at = interrupted_and_straight("train_pretrain.py", args, tmp_path)
    with capsys.disabled():
        print(f"\nbf16 autocast, pretrain killed after {killed_at}, resumed: max |weight difference| {difference:g}")
    assert difference < 1e-6
