"""torchrun on CPU (gloo): DDP and FSDP for every kind of stage, and resuming under another world size.

The invariant: 2 ranks x batch b train exactly like 1 rank x batch 2b (same samples per step, the loss a mean over
the whole step), so their loss trajectories agree within 1e-3 in fp32.
"""

import json
import shutil

import pytest
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.conftest import metric_losses, pretrain_args, run_script, torchrun

pytestmark = pytest.mark.slow  # every test here runs torchrun

# AdamW for every stage (pretraining defaults to Muon): the exactness checked here, FSDP weights within 1e-5 of DDP's,
# is AdamW's; Muon's Newton-Schulz steps on sharded matrices agree within 1e-3 (tests/test_optim.py checks that).
STEPS = ["--max_steps", "10", "--log_every", "1", "--eval_every", "0", "--sample_every", "0", "--seed", "3",
         "--optimizer", "adamw"]
CHAT = ["--max_seq_len", "96", "--dtype", "fp32", "--warmup_steps", "2", "--learning_rate", "1e-3",
        "--val_data_path", "", "--sample_tokens", "4", *STEPS]


def assert_same_trajectory(a: list[float], b: list[float], steps: int = 10) -> None:
    assert len(a) == len(b) == steps
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-3, (a, b)


def with_batch(args: list, batch_size: int) -> list:
    args = list(args)
    args[args.index("--batch_size") + 1] = str(batch_size)
    return args


def max_weight_difference(a_dir, b_dir) -> float:
    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def pretrain_runs(tmp_path_factory, corpus, tokenizer_dir):
    """The same 10 pretraining steps as 1 rank x 8, 2 DDP ranks x 4 and 2 FSDP ranks x 4 (states at 5 and 10)."""
    root = tmp_path_factory.mktemp("pretrain_runs")
    runs = {}
    for name, launch, extra in (("single", run_script, []), ("ddp", torchrun, []), ("fsdp", torchrun, ["--fsdp"])):
        out = root / name
        args = pretrain_args(corpus, tokenizer_dir, out, *STEPS, "--save_every", "5", *extra)
        result = launch("train_pretrain.py", *(with_batch(args, 8) if name == "single" else args))
        runs[name] = {"out": out, "stdout": result.stdout}
    return runs


def test_pretrain_two_ranks_match_one_rank_with_double_batch(pretrain_runs):
    assert "x 2 process(es)" in pretrain_runs["ddp"]["stdout"]
    single, ddp = metric_losses(pretrain_runs["single"]["out"]), metric_losses(pretrain_runs["ddp"]["out"])
    assert_same_trajectory(single, ddp)
    assert single[-1] < single[0]


def test_fsdp_matches_ddp_and_exports_a_transformers_directory(pretrain_runs):
    fsdp = pretrain_runs["fsdp"]["out"]
    assert_same_trajectory(metric_losses(fsdp), metric_losses(pretrain_runs["ddp"]["out"]))
    assert max_weight_difference(fsdp, pretrain_runs["ddp"]["out"]) < 1e-5
    # Each rank wrote its own shard of the train state; the exported model is one ordinary directory.
    shards = sorted(p.name for p in (fsdp / "train_state" / "step_00000010" / "sharded").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert type(AutoModelForCausalLM.from_pretrained(fsdp)).__name__ == "LlamaForCausalLM"
    rows = [json.loads(line) for line in (fsdp / "metrics.jsonl").read_text().splitlines()]
    assert any("sample" in r for r in rows)  # samples come from the gathered copy on rank 0


@pytest.mark.parametrize("source,launch,extra", [
    ("ddp", "single", []),        # DDP state, 2 ranks -> 1 rank x double batch
    ("fsdp", "fsdp", ["--fsdp"]),  # sharded state, same world size
    ("fsdp", "single", []),       # sharded state -> one process without --fsdp
])
def test_resume_under_another_world_size(pretrain_runs, corpus, tokenizer_dir, tmp_path, source, launch, extra):
    """Resume from the step-5 state of one run under another launch: it ends where the uninterrupted run did."""
    out = tmp_path / "resumed"
    shutil.copytree(pretrain_runs[source]["out"], out)
    shutil.rmtree(out / "train_state" / "step_00000010")
    args = pretrain_args(corpus, tokenizer_dir, out, *STEPS, "--save_every", "5", "--resume", *extra)
    if launch == "single":
        result = run_script("train_pretrain.py", *with_batch(args, 8))
    else:
        result = torchrun("train_pretrain.py", *args)
    assert "at step 5" in result.stdout
    assert_same_trajectory(metric_losses(out), metric_losses(pretrain_runs["single"]["out"]))
    assert max_weight_difference(out, pretrain_runs["single"]["out"]) < 1e-5


def test_resuming_a_ddp_state_with_fsdp_is_refused_clearly(pretrain_runs, corpus, tokenizer_dir, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(pretrain_runs["ddp"]["out"], out)
    args = pretrain_args(corpus, tokenizer_dir, out, *STEPS, "--resume", "--fsdp")
    with pytest.raises(AssertionError, match="was written without --fsdp; resume it without --fsdp"):
        torchrun("train_pretrain.py", *args)


@pytest.fixture(scope="module")
def single_rank_runs(chat_checkpoint, tmp_path_factory):
    """One process x batch 4 of a chat stage, run once per (script, data, flags) and shared by the tests."""
    cache = {}

    def run(script: str, data: str, *extra: str):
        key = (script, data, *extra)
        if key not in cache:
            out = tmp_path_factory.mktemp("single")
            run_script(script, "--data_path", chat_checkpoint[data], "--init_from", chat_checkpoint["model"], *CHAT,
                       *extra, "--out_dir", out, "--batch_size", "4")
            cache[key] = metric_losses(out)
        return cache[key]

    return run


@pytest.mark.parametrize("script,data,extra", [
    ("train_sft.py", "chats", []),
    ("train_distill_reason.py", "chats", []),
    ("train_lora.py", "chats", ["--learning_rate", "1e-2", "--lora_dropout", "0"]),  # dropout masks differ by rank
    ("train_dpo.py", "pairs", ["--beta", "0.5"]),
    ("train_dpo.py", "pairs", ["--precompute_ref"]),
])
def test_chat_stages_two_ranks_match_one_rank_with_double_batch(chat_checkpoint, single_rank_runs, tmp_path, script,
                                                                 data, extra):
    """SFT's loss is a mean over assistant tokens, which rows hold in different numbers: the trainer weighs each
    rank's share by its token count, so the split does not change the step. DPO's is a mean over pairs."""
    result = torchrun(script, "--data_path", chat_checkpoint[data], "--init_from", chat_checkpoint["model"], *CHAT,
                      *extra, "--out_dir", tmp_path, "--batch_size", "2")
    assert "x 2 process(es)" in result.stdout
    assert_same_trajectory(single_rank_runs(script, data, *extra), metric_losses(tmp_path))


def test_sft_accumulation_matches_a_bigger_batch(chat_checkpoint, single_rank_runs, tmp_path):
    """Within the first epoch (the data holds more than 10 x 4 packed rows)."""
    run_script("train_sft.py", "--data_path", chat_checkpoint["chats"], "--init_from", chat_checkpoint["model"],
               *CHAT, "--out_dir", tmp_path, "--batch_size", "1", "--accumulation_steps", "4")
    assert_same_trajectory(single_rank_runs("train_sft.py", "chats"), metric_losses(tmp_path))


def test_dpo_with_fsdp_shards_the_reference_too(chat_checkpoint, single_rank_runs, tmp_path):
    result = torchrun("train_dpo.py", "--data_path", chat_checkpoint["pairs"], "--init_from", chat_checkpoint["model"],
                      *CHAT, "--beta", "0.5", "--out_dir", tmp_path, "--batch_size", "2", "--fsdp")
    assert "frozen copy of" in result.stdout and ", sharded" in result.stdout
    assert_same_trajectory(single_rank_runs("train_dpo.py", "pairs", "--beta", "0.5"), metric_losses(tmp_path))


def test_torn_shard_falls_back_to_the_previous_sharded_state(pretrain_runs, corpus, tokenizer_dir, tmp_path):
    """One rank's shard of the newest state is cut short: every rank notices at load and takes step 5 instead."""
    out = tmp_path / "resumed"
    shutil.copytree(pretrain_runs["fsdp"]["out"], out)
    shard = out / "train_state" / "step_00000010" / "sharded" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    result = torchrun("train_pretrain.py", *pretrain_args(corpus, tokenizer_dir, out, *STEPS, "--save_every", "5",
                                                          "--resume", "--fsdp"))
    assert "step_00000010 is unreadable" in result.stdout and "at step 5" in result.stdout
    assert max_weight_difference(out, pretrain_runs["single"]["out"]) < 1e-5


def test_replay_kl_two_ranks_match_one_rank_with_double_batch(chat_checkpoint, corpus, tmp_path):
    """--replay_kl sums each document token's KL into the loss's numerator, so two ranks (DDP, or FSDP with the
    starting model sharded and run on every batch of every rank) train as one rank with their batches together."""
    args = ["--data_path", f"{chat_checkpoint['chats']}:0.5,{corpus['train']}:0.5", "--init_from",
            chat_checkpoint["model"], *CHAT]
    run_script("train_sft.py", *args, "--replay_kl", "2", "--out_dir", tmp_path / "one", "--batch_size", "4")
    run_script("train_sft.py", *args, "--out_dir", tmp_path / "plain", "--batch_size", "4")
    one = metric_losses(tmp_path / "one")
    assert max(abs(a - b) for a, b in zip(one, metric_losses(tmp_path / "plain"))) > 1e-3  # the anchor is in the loss
    torchrun("train_sft.py", *args, "--replay_kl", "2", "--out_dir", tmp_path / "ddp", "--batch_size", "2")
    assert_same_trajectory(one, metric_losses(tmp_path / "ddp"))
    result = torchrun("train_sft.py", *args, "--replay_kl", "2", "--out_dir", tmp_path / "fsdp", "--batch_size", "2",
                      "--fsdp")
    assert "the starting model sharded" in result.stdout
    assert_same_trajectory(one, metric_losses(tmp_path / "fsdp"))
