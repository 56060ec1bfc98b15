"""LoRA: PEFT compatibility both ways, merging, freezing, and the zero-init / dropout behaviour."""

import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from model import LM, LMConfig
from model.lora import (
    LoRALinear,
    apply_lora,
    load_lora,
    lora_layers,
    lora_parameters,
    merge_adapter,
    merge_lora,
    save_lora,
    stack_adapters,
    trainable_share,
)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=256, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def copy_of(model: LlamaForCausalLM) -> LlamaForCausalLM:
    other = LlamaForCausalLM(model.config).eval()
    other.load_state_dict(model.state_dict())
    return other


def randomize_adapters(model) -> None:
    """Give B non-zero values, so a test fails if the adapter is lost or applied wrongly."""
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(std=0.05)


INPUT_IDS = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT_IDS).logits


def test_init_equals_base_and_only_lora_trains():
    base = tiny_llama()
    expected = logits_of(base)
    model = apply_lora(copy_of(base), r=4, alpha=8)
    torch.testing.assert_close(logits_of(model), expected, atol=0, rtol=0)
    assert len(lora_layers(model)) == 2 * 7
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert {id(p) for p in lora_parameters(model)} == {id(p) for p in model.parameters() if p.requires_grad}
    n_trainable, n_total = trainable_share(model)
    assert n_trainable == sum(p.numel() for p in lora_parameters(model))
    assert n_total == sum(p.numel() for p in base.parameters()) + n_trainable
    # The base parameter names are unchanged, so the base part of the state dict still loads into plain Llama.
    base_keys = {k for k in model.state_dict() if ".lora_" not in k}
    assert base_keys == set(base.state_dict())


def test_training_step_changes_only_adapters():
    model = apply_lora(tiny_llama(), r=4, alpha=8).train()
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        loss = model(INPUT_IDS, labels=INPUT_IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    assert any(layer.lora_B.weight.abs().sum() > 0 for layer in lora_layers(model).values())


def test_dropout_is_deterministic_in_eval_only():
    model = apply_lora(tiny_llama(), r=4, alpha=8, dropout=0.5)
    randomize_adapters(model)
    torch.testing.assert_close(logits_of(model.eval()), logits_of(model), atol=0, rtol=0)
    model.train()
    assert not torch.equal(logits_of(model), logits_of(model))


def test_saved_adapter_loads_in_peft(tmp_path):
    base = tiny_llama()
    model = apply_lora(copy_of(base), r=4, alpha=16, dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"])
    randomize_adapters(model)
    save_lora(model, tmp_path, base_model_path="some/base")
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert keys["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    assert keys["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].shape == (32, 4)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == "some/base"
    assert not list(tmp_path.glob(".*tmp*"))

    peft_model = peft.PeftModel.from_pretrained(copy_of(base), tmp_path).eval()
    expected = logits_of(model.eval())
    assert not torch.allclose(expected, logits_of(base), atol=1e-4)
    torch.testing.assert_close(logits_of(peft_model), expected, atol=1e-5, rtol=0)


def test_peft_adapter_loads_through_load_lora(tmp_path):
    base = tiny_llama()
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                             target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"])
    peft_model = peft.get_peft_model(copy_of(base), config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    peft_model.save_pretrained(tmp_path)
    model = load_lora(copy_of(base), tmp_path).eval()
    assert {name.rpartition(".")[2] for name in lora_layers(model)} == {"k_proj", "o_proj", "gate_proj", "up_proj"}
    torch.testing.assert_close(logits_of(model), logits_of(peft_model.eval()), atol=1e-5, rtol=0)


def test_load_lora_rejects_missing_and_unexpected_keys(tmp_path):
    model = apply_lora(tiny_llama(), r=4, alpha=8, target_modules=["q_proj"])
    save_lora(model, tmp_path, None)
    weights = load_file(str(tmp_path / "adapter_model.safetensors"))
    dropped = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    weights["base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight"] = weights.pop(dropped)
    save_file(weights, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(KeyError, match=r"layers\.1\.self_attn\.q_proj\.lora_B.*lora_C"):
        load_lora(tiny_llama(), tmp_path)


def test_load_lora_rejects_unsupported_options(tmp_path):
    model = apply_lora(tiny_llama(), r=4, alpha=8)
    save_lora(model, tmp_path, None)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["use_dora"] = True
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="use_dora"):
        load_lora(tiny_llama(), tmp_path)


def test_apply_lora_rejects_unknown_targets_and_double_wrapping():
    with pytest.raises(ValueError, match="no Linear layer matches"):
        apply_lora(tiny_llama(), target_modules=["qkv_proj"])
    model = apply_lora(tiny_llama())
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model)


def test_regex_target_modules_match_full_names():
    model = apply_lora(tiny_llama(), target_modules=r"model\.layers\.1\.self_attn\.(q|v)_proj")
    assert sorted(lora_layers(model)) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_merge_equals_adapter_and_restores_plain_linear():
    base = tiny_llama()
    model = apply_lora(copy_of(base), r=4, alpha=8, use_rslora=True)
    randomize_adapters(model)
    expected = logits_of(model)
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(base.state_dict())
    assert all(p.requires_grad for p in merged.parameters())
    torch.testing.assert_close(logits_of(merged), expected, atol=1e-5, rtol=0)


def test_merge_script_writes_plain_llama_checkpoint(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "tokenizer.json").write_text("{}")
    model = apply_lora(copy_of(base), r=4, alpha=8)
    randomize_adapters(model)
    save_lora(model, tmp_path / "adapter", str(tmp_path / "base"))
    (tmp_path / "adapter" / "tokenizer_config.json").write_text('{"from": "adapter"}')
    expected = logits_of(model)

    out = merge_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", model_class=LlamaForCausalLM)
    merged = LlamaForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits_of(merged), expected, atol=1e-5, rtol=0)
    assert (out / "tokenizer.json").read_text() == "{}"
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"from": "adapter"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "merged"]


def test_merge_script_on_our_lm(tmp_path):
    """The same path the CLI takes by default (LM.from_pretrained), checked against PEFT over transformers' Llama."""
    torch.manual_seed(0)
    config = LMConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    intermediate_size=128, vocab_size=256)
    LM(config).save_pretrained(tmp_path / "base")
    model = apply_lora(LM.from_pretrained(tmp_path / "base").eval(), r=4, alpha=8)
    randomize_adapters(model)
    save_lora(model, tmp_path / "adapter", str(tmp_path / "base"))
    expected = logits_of(model)
    peft_model = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                                                tmp_path / "adapter").eval()
    torch.testing.assert_close(logits_of(peft_model), expected, atol=1e-5, rtol=0)
    out = merge_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    torch.testing.assert_close(logits_of(LlamaForCausalLM.from_pretrained(out).eval()), expected, atol=1e-5, rtol=0)


def test_stacked_adapters_give_each_row_its_own(tmp_path):
    """stack_adapters (serving adapters unmerged): in one batch every row computes as its adapter alone would,
    though the adapters differ in rank, alpha, scaling rule and targets and one is PEFT's; base rows as the base."""
    base = tiny_llama()
    ours = apply_lora(copy_of(base), r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    rslora = apply_lora(copy_of(base), r=8, alpha=4, use_rslora=True)
    for model, name in ((ours, "a"), (rslora, "b")):
        randomize_adapters(model)
        save_lora(model, tmp_path / name)
    peft_model = peft.get_peft_model(copy_of(base), peft.LoraConfig(r=2, lora_alpha=6, task_type="CAUSAL_LM",
                                                                    target_modules=["k_proj", "gate_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    peft_model.save_pretrained(tmp_path / "c")
    alone = [base] + [load_lora(copy_of(base), tmp_path / name).eval() for name in "abc"]
    stacked = copy_of(base)
    rows = stack_adapters(stacked, {name: tmp_path / name for name in "abc"})
    assert rows.names == {1: "a", 2: "b", 3: "c"}
    ids = [2, 0, 3, 1, 2]
    x = torch.randint(0, 256, (len(ids), 10), generator=torch.Generator().manual_seed(2))
    rows.select(ids)
    with torch.no_grad():
        got = stacked(x).logits
        for row, adapter in enumerate(ids):
            expected = alone[adapter](x[row:row + 1]).logits[0]
            torch.testing.assert_close(got[row], expected, atol=1e-5, rtol=0)
            if adapter:  # and each adapter does change the answer
                assert (expected - base(x[row:row + 1]).logits[0]).abs().max() > 1e-2
        rows.select([0] * len(ids))
        torch.testing.assert_close(stacked(x).logits, base(x).logits, atol=1e-5, rtol=0)
        rows.select([3] * len(ids))  # one adapter for every row: its block alone, no mask
        torch.testing.assert_close(stacked(x).logits, alone[3](x).logits, atol=1e-5, rtol=0)
        # removed and added while serving: the others keep their ids and their rows, a new one gets a new id
        rows.remove(2)
        with pytest.raises(ValueError, match="adapter ids"):
            rows.select([2])
        assert rows.add(rows.read("b again", tmp_path / "b")) == 4
        assert rows.names == {1: "a", 3: "c", 4: "b again"}
        ids, refs = [3, 0, 4, 1], [alone[3], alone[0], alone[2], alone[1]]
        rows.select(ids)
        got = stacked(x[:4]).logits
        for row, model in enumerate(refs):
            torch.testing.assert_close(got[row], model(x[row:row + 1]).logits[0], atol=1e-5, rtol=0)
        rows.select([4] * 4)  # one adapter, the third block since 2 went
        torch.testing.assert_close(stacked(x[:4]).logits, alone[2](x[:4]).logits, atol=1e-5, rtol=0)
        for adapter_id in (1, 3, 4):
            rows.remove(adapter_id)
        rows.select([0, 0])
        torch.testing.assert_close(stacked(x[:2]).logits, base(x[:2]).logits, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="already has LoRA layers"):
        stack_adapters(stacked, {"a": tmp_path / "a"})
    # an adapter of another model's shape is refused, its file named
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=256)
    save_lora(apply_lora(LlamaForCausalLM(config), r=4, alpha=8), tmp_path / "other")
    with pytest.raises(ValueError, match=r"other/adapter_model\.safetensors: .*has shape"):
        stack_adapters(copy_of(base), {"a": tmp_path / "a", "other": tmp_path / "other"})
