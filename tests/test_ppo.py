"""PPO: a tiny model learns a cheap behaviour, train_ppo.py end to end (critic from the policy or the reward model),
2 ranks = 1 rank x double batch (advantages whitened over all ranks), exact resume after kill -9."""

import copy
import json
from argparse import Namespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from model import LM, LMConfig
from model.heads import ScalarModel
from tests.conftest import kill_after_first_checkpoint, metric_losses, run_script, torchrun
from tests.rl_common import RL_TINY, first_token_reward, rows_of, write_prompt_files
from train_ppo import PPO, ActorCritic, export_policy
from trainer.config import TrainConfig
from trainer.rl import Prompt, Reward, RLConfig, train_rl
from trainer.runtime import Runtime


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory) -> dict:
    return write_prompt_files(tmp_path_factory.mktemp("rl"))


def test_ppo_learns_to_answer_with_one_token(tmp_path):
    """From a random 16-token model (reward ~1/16) to > 0.8 mean reward within 12 steps of 64 answers."""
    torch.manual_seed(0)
    policy = LM(LMConfig.from_preset("tiny", vocab_size=16))
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    model = ActorCritic(policy, ScalarModel.from_causal_lm(copy.deepcopy(policy)))
    prompts = [Prompt([1, 3 + i % 9, 4], {"messages": [], "meta": {}}) for i in range(16)]
    held_out = [Prompt([1, 12, 3 + i, 4], {"messages": [], "meta": {}}) for i in range(4)]
    args = Namespace(group_size=8, micro_batch_size=64, clip_eps=0.2, clip_eps_high=None, beta=0.05,
                     max_new_tokens=4, gamma=1.0, lam=0.95, vf_coef=0.1, cliprange_value=0.2, no_whiten=False)
    config = TrainConfig(stage="ppo", out_dir=str(tmp_path), batch_size=8, max_steps=12, learning_rate=1e-2,
                         min_lr=1e-2, warmup_steps=0, weight_decay=0.0, log_every=1, eval_every=0, save_every=0)
    rl = RLConfig(group_size=8, max_new_tokens=4, ppo_epochs=2, num_mini_batches=2, micro_batch_size=64)
    summary = train_rl(model, prompts, [Reward("task", first_token_reward)], PPO(args, reference),
                       Runtime(torch.device("cpu"), torch.float32), config, rl, val_prompts=held_out,
                       export_fn=export_policy)
    rows = [row for row in rows_of(tmp_path) if "reward" in row]
    rewards = [row["reward"] for row in rows]
    print(f"\nPPO mean reward by step: {[round(r, 2) for r in rewards]}")
    assert rewards[0] < 0.15 and max(rewards) > 0.8, rewards
    assert summary["val_pass@1"] == 1.0
    assert all(row["kl"] >= -1e-6 and "value_loss" in row and "returns" in row for row in rows)
    assert any(row["clip_frac"] > 0 for row in rows)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]
    AutoModelForCausalLM.from_pretrained(tmp_path)  # the directory holds the policy


@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_prepare_puts_the_score_on_the_last_answer_token(beta):
    """PPO's token rewards: -beta * (log p - log p_ref) on every answer token, the answer's score added on its last;
    advantages and returns are GAE of those rewards and the critic's values (whitening off here)."""
    from model.generation import Completion
    from trainer.losses import gae_advantages, token_logps
    from trainer.rl import rollout_batch

    torch.manual_seed(0)
    policy = LM(LMConfig.from_preset("tiny", vocab_size=16))
    reference = LM(policy.config)  # another random model: the KL penalty is not zero
    model = ActorCritic(policy, ScalarModel.from_causal_lm(copy.deepcopy(policy)))
    prompts = [Prompt([1, 5, 6], {}), Prompt([1, 7], {})]
    completions = [Completion([9, 3, 2], "stop", 3), Completion([8, 4], "length", 2)]
    batch = rollout_batch(prompts, completions, mask_truncated=False, pad_id=0, device=torch.device("cpu"))
    batch["rewards"] = torch.tensor([1.0, -0.5])
    args = Namespace(micro_batch_size=1, beta=beta, gamma=0.9, lam=0.8, no_whiten=True)
    PPO(args, reference if beta else None).prepare(model, batch, Runtime(torch.device("cpu"), torch.float32))
    with torch.no_grad():
        mask = (batch["labels"] != -100).float()
        logps = token_logps(policy(batch["input_ids"]).logits, batch["labels"])[0]
        ref_logps = token_logps(reference(batch["input_ids"]).logits, batch["labels"])[0]
        values = model.critic(batch["input_ids"]) * mask
    rewards = -beta * (logps - ref_logps) * mask
    rewards[0, 4] += 1.0  # row 0's answer tokens are predicted at positions 2, 3, 4
    rewards[1, 2] += -0.5  # row 1's at positions 1, 2 (then padding)
    advantages, returns = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    assert torch.allclose(batch["old_logps"], logps, atol=1e-5) and torch.allclose(batch["old_values"], values,
                                                                                    atol=1e-5)
    assert torch.allclose(batch["advantages"], advantages, atol=1e-5)
    assert torch.allclose(batch["returns"], returns, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("critic_from", ["policy", "reward_model"])
def test_train_ppo_end_to_end(tmp_path, chat_checkpoint, prompt_files, critic_from):
    reward_dir = tmp_path / "reward"
    ScalarModel.from_causal_lm(LM.from_pretrained(chat_checkpoint["model"])).save_pretrained(reward_dir)
    out = tmp_path / "ppo"
    done = run_script("train_ppo.py", "--init_from", chat_checkpoint["model"], "--data_path", prompt_files["train"],
                      "--val_data_path", prompt_files["val"], "--out_dir", out, *RL_TINY, "--max_steps", "2",
                      "--reward_funcs", "task", "--reward_model", reward_dir, "--critic_from", critic_from,
                      "--replay_data", chat_checkpoint["chats"], "--replay_rows", "2",
                      *(["--replay_kl", "0.5"] if critic_from == "reward_model" else []))
    assert f"from the {'policy' if critic_from == 'policy' else 'reward model'}" in done.stdout
    assert f"replay: 2 row(s) of {chat_checkpoint['chats']} per micro-batch, weight 1" in done.stdout
    logged = [row for row in rows_of(out) if "reward" in row]
    if critic_from == "reward_model":  # the actor's replay anchored to the reference, the frozen starting policy
        assert "KL to the starting policy x 0.5" in done.stdout and all(row["replay_kl"] >= 0 for row in logged)
    for key in ("loss", "replay_ce", "pg_loss", "value_loss", "clip_frac", "value_clip_frac", "entropy", "kl", "value",
                "returns", "reward/task", "reward/reward_model", "pass@1", "completion_len", "rollout_tokens_per_sec",
                "update_tokens_per_sec"):
        assert key in logged[-1], key
    AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.slow
def test_two_ranks_match_one_rank_with_double_batch(tmp_path, chat_checkpoint, prompt_files):
    common = ["--init_from", chat_checkpoint["model"], "--data_path", prompt_files["train"], *RL_TINY,
              "--max_steps", "3", "--num_mini_batches", "1", "--sample_every", "0"]
    run_script("train_ppo.py", *common, "--out_dir", tmp_path / "one", "--batch_size", "4")
    torchrun("train_ppo.py", *common, "--out_dir", tmp_path / "two", "--batch_size", "2")
    one, two = ([row for row in rows_of(tmp_path / run) if "loss" in row] for run in ("one", "two"))
    for a, b in zip(one, two):
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-6)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-3)
        assert a["value_loss"] == pytest.approx(b["value_loss"], abs=1e-3)
    assert len(metric_losses(tmp_path / "one")) == len(metric_losses(tmp_path / "two")) == 3


@pytest.mark.slow
def test_resumes_bitwise_after_kill(tmp_path, chat_checkpoint, prompt_files):
    args = ["--init_from", chat_checkpoint["model"], "--data_path", prompt_files["train"], *RL_TINY,
            "--max_steps", "6", "--save_every", "2", "--sample_every", "0"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_script("train_ppo.py", *args, "--out_dir", straight)
    saved = kill_after_first_checkpoint("train_ppo.py", *args, "--out_dir", killed, out_dir=killed)
    assert saved and saved[-1] != "step_00000006", "the run finished before it could be killed"
    result = run_script("train_ppo.py", *args, "--out_dir", killed, "--resume")
    assert f"at step {int(saved[-1][5:])}" in result.stdout
    a, b = load_file(straight / "model.safetensors"), load_file(killed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((killed / "summary.json").read_text())["final_loss"] == \
        json.loads((straight / "summary.json").read_text())["final_loss"]
