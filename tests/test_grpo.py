"""GRPO: a tiny model learns a cheap behaviour, train_grpo.py end to end on prompt files (every prompt shape, reward
functions and a reward model, the logged metrics), 2 ranks = 1 rank x double batch, exact resume after kill -9."""

import json
import math
from argparse import Namespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dataset.tokenizer import load_tokenizer
from model import LM, LMConfig
from model.heads import ScalarModel
from tests.conftest import (
    kill_after_first_checkpoint,
    metric_losses,
    run_script,
    torchrun,
    write_jsonl,
)
from tests.rl_common import RL_TINY, first_token_reward, rows_of, write_prompt_files
from train_grpo import GRPO
from trainer.config import TrainConfig
from trainer.rl import Prompt, Replay, Reward, RLConfig, rollout_batch, train_rl
from trainer.runtime import Runtime


def test_grpo_learns_to_answer_with_one_token(tmp_path):
    """From a random 16-token model (reward ~1/16) to > 0.8 mean reward within 12 steps of 8 prompts x 8 answers;
    greedy answers to held-out prompts then start with the token."""
    torch.manual_seed(0)
    policy = LM(LMConfig.from_preset("tiny", vocab_size=16))
    reference = LM(policy.config).eval().requires_grad_(False)
    reference.load_state_dict(policy.state_dict())
    prompts = [Prompt([1, 3 + i % 9, 4], {"messages": [], "meta": {}}) for i in range(16)]
    held_out = [Prompt([1, 12, 3 + i, 4], {"messages": [], "meta": {}}) for i in range(4)]
    args = Namespace(group_size=8, micro_batch_size=64, clip_eps=0.2, clip_eps_high=None, beta=0.04,
                     loss_type="dapo", max_new_tokens=4, scale_rewards="auto")
    config = TrainConfig(stage="grpo", out_dir=str(tmp_path), batch_size=8, max_steps=12, learning_rate=1e-2,
                         min_lr=1e-2, warmup_steps=0, weight_decay=0.0, log_every=1, eval_every=0, save_every=0)
    rl = RLConfig(group_size=8, max_new_tokens=4, ppo_epochs=2, num_mini_batches=2, micro_batch_size=64, pass_at_k=8)
    summary = train_rl(policy, prompts, [Reward("task", first_token_reward)], GRPO(args, reference),
                       Runtime(torch.device("cpu"), torch.float32), config, rl, val_prompts=held_out)
    start = next(row for row in rows_of(tmp_path) if "start_pass@1" in row)
    assert start["step"] == 0 and start["start_pass@1"] < 0.2 and start["start_pass@8"] >= start["start_pass@1"]
    rewards = [row["reward"] for row in rows_of(tmp_path) if "reward" in row]
    print(f"\nGRPO mean reward by step: {[round(r, 2) for r in rewards]}")
    assert rewards[0] < 0.15 and max(rewards) > 0.8, rewards
    assert summary["val_pass@1"] == 1.0
    # measured again after training on the same prompts and seeds: the paired gain is end minus start
    assert summary["end_pass@1"] > 0.8 and summary["start_pass@1"] == start["start_pass@1"]
    assert summary["gain_pass@1"] == pytest.approx(summary["end_pass@1"] - summary["start_pass@1"])
    assert 0 < summary["gain_pass@1_ci95"] < summary["gain_pass@1"]
    rows = [row for row in rows_of(tmp_path) if "reward" in row]
    assert all(0.0 <= row["clip_frac"] <= 1.0 and row["kl"] >= 0.0 for row in rows)
    assert any(row["clip_frac"] > 0 for row in rows)  # several updates per rollout batch: the clip acts


REPLAYED_IDS = torch.tensor([1, 3, 4, 9, 10, 11, 2, 0])  # a chat, its answer 9 10 11 and the end token 2, one pad
REPLAYED_CHAT = {"input_ids": REPLAYED_IDS, "labels": torch.tensor([-100, -100, 9, 10, 11, 2, -100, -100]),
                 "segment_ids": (REPLAYED_IDS != 0).long(), "position_ids": torch.arange(8)}


def replay_only_run(out_dir, coef: float, kl: float = 0.0) -> tuple[list[dict], Replay]:
    """8 GRPO steps of a random 16-token model with a constant reward, so every advantage is 0 and only the replay of
    REPLAYED_CHAT (with the KL to the starting policy when kl > 0) moves the policy: the logged rows."""
    torch.manual_seed(0)
    policy = LM(LMConfig.from_preset("tiny", vocab_size=16))
    start = LM(policy.config).eval().requires_grad_(False)
    start.load_state_dict(policy.state_dict())
    prompts = [Prompt([1, 3 + i % 9, 4], {"messages": [], "meta": {}}) for i in range(8)]
    args = Namespace(group_size=4, micro_batch_size=64, clip_eps=0.2, clip_eps_high=None, beta=0.0,
                     loss_type="dapo", max_new_tokens=4, scale_rewards="auto")
    out_dir.mkdir(exist_ok=True)
    config = TrainConfig(stage="grpo", out_dir=str(out_dir), batch_size=4, max_steps=8, learning_rate=1e-2,
                         min_lr=1e-2, warmup_steps=0, weight_decay=0.0, log_every=1, eval_every=0, save_every=0)
    rl = RLConfig(group_size=4, max_new_tokens=4, ppo_epochs=2, num_mini_batches=2, micro_batch_size=64)
    constant = Reward("task", lambda prompts, completions: [1.0] * len(completions))
    replay = Replay(data=[REPLAYED_CHAT] * 3, coef=coef, rows=2, kl=kl, start=start if kl else None)
    train_rl(policy, prompts, [constant], GRPO(args, None), Runtime(torch.device("cpu"), torch.float32), config, rl,
             replay=replay)
    return [row for row in rows_of(out_dir) if "replay_ce" in row], replay


def test_replay_adds_the_sft_loss_of_earlier_chats(tmp_path):
    """Only the replayed chat's SFT loss moves the policy: its cross-entropy falls from about ln 16, and the logged
    loss is the RL loss (0) plus coef x that cross-entropy."""
    rows, replay = replay_only_run(tmp_path, coef=0.5)
    print(f"\nreplay cross-entropy by step: {[round(row['replay_ce'], 2) for row in rows]}")
    assert len(rows) == 8 and rows[0]["replay_ce"] > 2.0 and rows[-1]["replay_ce"] < 0.5
    assert all(row["loss"] == pytest.approx(0.5 * row["replay_ce"], abs=2e-6) for row in rows)
    generator = replay.draws(seed=0, step=3, rank=0)
    assert replay.attach({}, generator)["replay_input_ids"].tolist() == [REPLAYED_IDS.tolist()] * 2


def test_replay_kl_holds_the_replayed_chats_where_the_policy_started(tmp_path):
    """The same run with the KL to the starting policy on the replayed tokens (--replay_kl): the logged loss is
    coef x cross-entropy + kl x that KL; the KL is above 0 at every step (the anchor is the starting policy, not the
    moving one) but stays small, and the cross-entropy falls far less than without the anchor."""
    free, _ = replay_only_run(tmp_path / "free", coef=0.5)
    anchored, _ = replay_only_run(tmp_path / "anchored", coef=0.5, kl=5.0)
    print(f"\nreplay cross-entropy by step, free: {[round(row['replay_ce'], 2) for row in free]}, anchored: "
          f"{[round(row['replay_ce'], 2) for row in anchored]}; KL: {[round(row['replay_kl'], 3) for row in anchored]}")
    assert len(anchored) == 8
    assert all(row["loss"] == pytest.approx(0.5 * row["replay_ce"] + 5.0 * row["replay_kl"], abs=1e-5)
               for row in anchored)
    assert all(0.01 < row["replay_kl"] < 0.2 for row in anchored)  # the cross-entropy pulls, the anchor holds
    assert free[-1]["replay_ce"] < 0.5 and 1.5 < anchored[-1]["replay_ce"] < anchored[0]["replay_ce"]


def test_pass_at_k_by_hand():
    from trainer.rl import pass_at_k

    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3, 2) / C(5, 2)
    assert pass_at_k(5, 2, 1) == pytest.approx(2 / 5)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0


def test_rollout_rows_score_only_the_answer_and_mask_cut_answers():
    from model.generation import Completion

    prompts = [Prompt([1, 5, 6], {}), Prompt([1, 7], {})]
    completions = [Completion([9, 2], "stop", 3), Completion([8, 8, 8], "length", 2)]
    batch = rollout_batch(prompts, completions, mask_truncated=False, pad_id=0, device=torch.device("cpu"))
    assert batch["input_ids"].tolist() == [[1, 5, 6, 9], [1, 7, 8, 8]]
    assert batch["labels"].tolist() == [[-100, -100, 9, 2], [-100, 8, 8, 8]]
    masked = rollout_batch(prompts, completions, mask_truncated=True, pad_id=0, device=torch.device("cpu"))
    assert masked["labels"][1].tolist() == [-100] * 4 and masked["truncated"].tolist() == [0.0, 1.0]


# ---------------------------------------------------------------------------------------------------------------------
# The script


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory) -> dict:
    return write_prompt_files(tmp_path_factory.mktemp("rl"))


@pytest.mark.slow
def test_train_grpo_end_to_end(tmp_path, chat_checkpoint, prompt_files):
    reward_dir = tmp_path / "reward"
    ScalarModel.from_causal_lm(LM.from_pretrained(chat_checkpoint["model"])).save_pretrained(reward_dir)
    out = tmp_path / "grpo"
    done = run_script("train_grpo.py", "--init_from", chat_checkpoint["model"], "--data_path", prompt_files["train"],
                      "--val_data_path", prompt_files["val"], "--out_dir", out, *RL_TINY, "--max_steps", "2",
                      "--reward_funcs", "task,think_format,repetition,length", "--reward_model", reward_dir,
                      "--reward_weights", "1,0.5,0.1,1,0.2", "--mask_truncated", "--pass_at_k", "2")
    assert "1 x task + 0.5 x think_format + 0.1 x repetition + 1 x length + 0.2 x reward_model" in done.stdout
    assert "held out, greedy: reward" in done.stdout and "the starting policy on the held-out prompts" in done.stdout
    assert "the trained policy on the held-out prompts" in done.stdout and "over the start, paired" in done.stdout
    rows = rows_of(out)
    logged = [row for row in rows if "reward" in row]
    assert len(logged) == 2
    for key in ("loss", "reward", "reward_std", "reward/task", "reward_std/task", "reward/reward_model",
                "zero_std_groups", "pass@1", "pass@4", "kl", "clip_frac", "entropy", "completion_len", "truncated",
                "rollout_tokens_per_sec", "update_tokens_per_sec"):
        assert key in logged[-1], key
    weights = {"task": 1, "think_format": 0.5, "repetition": 0.1, "length": 1, "reward_model": 0.2}
    for row in logged:  # the reward trained on is the weighted sum of the rewards logged apart
        assert row["reward"] == pytest.approx(sum(w * row[f"reward/{name}"] for name, w in weights.items()), abs=1e-5)
    assert any("sample" in row for row in rows) and any("val_pass@1" in row for row in rows)
    AutoModelForCausalLM.from_pretrained(out)  # the policy is a transformers Llama directory


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo"])
def test_loss_types_and_no_reference(tmp_path, chat_checkpoint, prompt_files, loss_type):
    """Without a reference model (--beta 0) there is no KL penalty; --replay_kl then anchors the replayed chats to
    a frozen copy of the starting policy of its own."""
    done = run_script("train_grpo.py", "--init_from", chat_checkpoint["model"], "--data_path", prompt_files["train"],
                      "--out_dir", tmp_path, *RL_TINY, "--max_steps", "1", "--loss_type", loss_type, "--beta", "0",
                      "--replay_data", chat_checkpoint["chats"], "--replay_coef", "0", "--replay_kl", "2")
    assert "reference: none" in done.stdout and "weight 0, KL to the starting policy x 2" in done.stdout
    logged = [row for row in rows_of(tmp_path) if "reward" in row]
    assert logged and all("kl" not in row and row["replay_kl"] >= 0 and row["replay_ce"] > 0 for row in logged)


@pytest.mark.slow
def test_bad_reward_flags_are_refused(tmp_path, chat_checkpoint, prompt_files):
    result = run_script("train_grpo.py", "--init_from", chat_checkpoint["model"], "--data_path",
                        prompt_files["train"], "--out_dir", tmp_path, *RL_TINY, "--reward_funcs", "task,bogus",
                        check=False)
    assert result.returncode == 2 and "unknown bogus" in result.stderr + result.stdout
    untasked = write_jsonl(tmp_path / "untasked.jsonl", [{"prompt": "你好"}] * 4)
    result = run_script("train_grpo.py", "--init_from", chat_checkpoint["model"], "--data_path", untasked,
                        "--out_dir", tmp_path, *RL_TINY, check=False)
    assert result.returncode == 2 and "no reward function" in result.stderr + result.stdout
    unanswered = write_jsonl(tmp_path / "unanswered.jsonl", [{"prompt": "1+1=?", "task": "arith", "answer": 2},
                                                             {"prompt": "2+2=?", "task": "arith"}])
    result = run_script("train_grpo.py", "--init_from", chat_checkpoint["model"], "--data_path", unanswered,
                        "--out_dir", tmp_path, *RL_TINY, check=False)
    assert result.returncode == 2 and "prompt 2 (task arith) lacks what its reward reads: KeyError 'answer'" in \
        result.stderr + result.stdout
    for flags, message in ((["--replay_kl", "1"], "give --replay_data too"),
                           (["--replay_data", chat_checkpoint["chats"], "--replay_coef", "0"], "no weight")):
        result = run_script("train_grpo.py", "--init_from", chat_checkpoint["model"], "--data_path",
                            prompt_files["train"], "--out_dir", tmp_path, *RL_TINY, *flags, check=False)
        assert result.returncode == 2 and message in result.stderr + result.stdout


# ---------------------------------------------------------------------------------------------------------------------
# Several processes, resume


@pytest.mark.slow
def test_two_ranks_match_one_rank_with_double_batch(tmp_path, chat_checkpoint, prompt_files):
    """Prompts are sharded, each group's sampling is seeded by its prompt, and the loss is weighted by its tokens
    across ranks: 2 ranks x 2 prompts follow 1 rank x 4 prompts."""
    common = ["--init_from", chat_checkpoint["model"], "--data_path", prompt_files["train"], *RL_TINY,
              "--max_steps", "3", "--num_mini_batches", "1", "--sample_every", "0"]
    run_script("train_grpo.py", *common, "--out_dir", tmp_path / "one", "--batch_size", "4")
    torchrun("train_grpo.py", *common, "--out_dir", tmp_path / "two", "--batch_size", "2")
    one, two = ([row for row in rows_of(tmp_path / run) if "loss" in row] for run in ("one", "two"))
    for a, b in zip(one, two):
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-6)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-3)
    assert len(metric_losses(tmp_path / "one")) == len(metric_losses(tmp_path / "two")) == 3
    # replayed chats go through the unwrapped policy beside the DDP forward: one backward, gradients reduced once
    torchrun("train_grpo.py", *common, "--out_dir", tmp_path / "replay", "--batch_size", "2", "--replay_data",
             chat_checkpoint["chats"], "--replay_coef", "0.5")
    rows = [row for row in rows_of(tmp_path / "replay") if "loss" in row]
    assert len(rows) == 3 and all(row["replay_ce"] > 0 and math.isfinite(row["loss"]) for row in rows)


@pytest.mark.slow
def test_resumes_bitwise_after_kill(tmp_path, chat_checkpoint, prompt_files):
    args = ["--init_from", chat_checkpoint["model"], "--data_path", prompt_files["train"], *RL_TINY,
            "--max_steps", "6", "--save_every", "2", "--sample_every", "0", "--replay_data", chat_checkpoint["chats"]]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_script("train_grpo.py", *args, "--out_dir", straight)
    saved = kill_after_first_checkpoint("train_grpo.py", *args, "--out_dir", killed, out_dir=killed)
    assert saved and saved[-1] != "step_00000006", "the run finished before it could be killed"
    result = run_script("train_grpo.py", *args, "--out_dir", killed, "--resume")
    assert f"at step {int(saved[-1][5:])}" in result.stdout
    a, b = load_file(straight / "model.safetensors"), load_file(killed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert metric_losses(killed) == metric_losses(straight)


@pytest.mark.slow
def test_a_fresh_run_replaces_an_earlier_runs_states(tmp_path, chat_checkpoint, prompt_files):
    """A run that does not --resume starts over in its out_dir: its first save removes the earlier run's train states,
    so a later --resume continues this run, not the earlier one's step 4."""
    args = ["--init_from", chat_checkpoint["model"], "--data_path", prompt_files["train"], *RL_TINY,
            "--save_every", "2", "--sample_every", "0", "--out_dir", tmp_path]
    run_script("train_grpo.py", *args, "--max_steps", "4")
    assert sorted(p.name for p in (tmp_path / "train_state").iterdir()) == ["step_00000002", "step_00000004"]
    run_script("train_grpo.py", *args, "--max_steps", "2")
    assert sorted(p.name for p in (tmp_path / "train_state").iterdir()) == ["step_00000002"]
    state = json.loads((tmp_path / "train_state" / "step_00000002" / "state.json").read_text())
    assert state["stage"] == "grpo" and state["shape"]["hidden_size"] == LM.from_pretrained(tmp_path).config.hidden_size
    result = run_script("train_grpo.py", *args, "--max_steps", "4", "--resume")
    assert "at step 2" in result.stdout


def test_prompts_keep_their_reward_fields(prompt_files, tokenizer_dir):
    from trainer.rl import load_prompts

    prompts = load_prompts(str(prompt_files["train"]), load_tokenizer(tokenizer_dir), max_prompt_tokens=64)
    assert len(prompts) == 16
    assert all(p.record["meta"]["task"] == "sentiment" and p.record["meta"]["label"] in ("正面", "负面")
               for p in prompts)
    assert all(p.record["messages"][-1]["role"] == "user" for p in prompts)
    ends = {tuple(p.ids[-3:]) for p in prompts}
    assert len(ends) == 1  # every prompt ends with the assistant header, whatever its shape


def test_prompts_with_a_nul_are_read_and_counted(tmp_path, tokenizer_dir):
    from trainer.rl import load_prompts

    records = [{"prompt": "1+1等于几？"}, {"prompt": "2+2\x00等于几？"}, {"prompt": "3+3等于几？"}]
    path = write_jsonl(tmp_path / "rl.jsonl", records)
    said = []
    assert len(load_prompts(str(path), load_tokenizer(tokenizer_dir), 64, log=said.append)) == 3
    assert said == [f"{path}: kept 1 record that may teach the wrong thing: 1 x a NUL character in the text "
                    f"(e.g. {path}:2)"]
