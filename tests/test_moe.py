"""The mixture-of-experts model against transformers' MixtralForCausalLM on the same weights; its routing, its
load-balancing loss, and the stages training it."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoModelForCausalLM, MixtralForCausalLM

from model import LM
from model.config import MoEConfig
from model.model import MoE, load_balancing_loss
from tests.conftest import CHAT_TINY, VOCAB, make_pair, pretrain_args, run_script, torchrun

MOE_SHAPES = {
    "e4-top2-gqa2-tied": dict(num_local_experts=4, num_experts_per_tok=2, num_attention_heads=4,
                              num_key_value_heads=2),
    "e8-top1-gqa4-untied": dict(num_local_experts=8, num_experts_per_tok=1, num_attention_heads=4,
                                num_key_value_heads=1, tie_word_embeddings=False, rope_theta=1e4),
    "e3-top3-mha": dict(num_local_experts=3, num_experts_per_tok=3, num_attention_heads=4, num_key_value_heads=4),
}


def make_moe_pair(tmp_path, **shape) -> tuple[LM, MixtralForCausalLM]:
    """Our MoE model of a tiny shape (norms perturbed) and transformers' Mixtral loaded from its saved directory."""
    return make_pair(tmp_path, config_class=MoEConfig, **shape)


@pytest.mark.parametrize("shape", MOE_SHAPES.values(), ids=MOE_SHAPES.keys())
def test_logits_and_aux_loss_match_mixtral(tmp_path, shape):
    ours, theirs = make_moe_pair(tmp_path, **shape)
    assert isinstance(theirs, MixtralForCausalLM)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("mixtral", ["MixtralForCausalLM"])
    ids = torch.randint(3, VOCAB, (3, 40))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :12] = 0
    labels = ids.clone()
    labels[0, :7] = -100
    with torch.no_grad():
        a, b = ours(ids, labels=labels), theirs(ids, labels=labels, output_router_logits=True)
        assert (a.logits - b.logits).abs().max().item() < 1e-4
        assert abs(a.aux_loss.item() - b.aux_loss.item()) < 1e-5
        # MixtralForCausalLM's loss includes router_aux_loss_coef * aux_loss when it returns router logits.
        assert abs(a.loss.item() + config["router_aux_loss_coef"] * a.aux_loss.item() - b.loss.item()) < 1e-5
        for ours_layer, theirs_layer in zip(a.router_logits, b.router_logits):
            assert (ours_layer - theirs_layer).abs().max().item() < 1e-4

        # Left padding: real positions agree, and padding is left out of the load-balancing loss on both sides.
        a, b = ours(ids, attention_mask=mask), theirs(ids, attention_mask=mask, output_router_logits=True)
        real = mask.bool()
        assert (a.logits[real] - b.logits[real]).abs().max().item() < 1e-4
        assert abs(a.aux_loss.item() - b.aux_loss.item()) < 1e-5


def test_greedy_generation_matches_mixtral(tmp_path):
    ours, theirs = make_moe_pair(tmp_path, **MOE_SHAPES["e4-top2-gqa2-tied"])
    prompt = torch.randint(3, VOCAB, (1, 7))
    expected = theirs.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None), expected)


def test_checkpoint_layout_is_mixtrals_and_loads_both_ways(tmp_path):
    ours, theirs = make_moe_pair(tmp_path / "ours", **MOE_SHAPES["e4-top2-gqa2-tied"])
    with safe_open(tmp_path / "ours" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    # Mixtral's checkpoint names (what transformers 4, vLLM and llama.cpp's converter read; transformers 5 fuses the
    # experts on load).
    assert {"model.layers.0.block_sparse_moe.gate.weight", "model.layers.1.block_sparse_moe.experts.3.w1.weight",
            "model.layers.1.block_sparse_moe.experts.3.w2.weight",
            "model.layers.1.block_sparse_moe.experts.3.w3.weight"} <= keys
    assert not any(".mlp." in key for key in keys)

    back = LM.from_pretrained(tmp_path / "ours")
    assert isinstance(back.config, MoEConfig) and back.moe
    assert all(torch.equal(p, q) for p, q in zip(ours.state_dict().values(), back.state_dict().values()))

    # A checkpoint transformers writes loads into ours, with the same logits.
    theirs.save_pretrained(tmp_path / "theirs")
    from_theirs = LM.from_pretrained(tmp_path / "theirs").eval()
    ids = torch.randint(3, VOCAB, (2, 16))
    with torch.no_grad():
        assert (from_theirs(ids).logits - ours(ids).logits).abs().max().item() < 1e-5


def test_routing_equals_a_token_by_token_reference():
    """The batched experts (sorted by expert, one matmul per expert) compute what the definition says, token by
    token: sum over the k best experts of softmax weight (renormalised over the k) * expert(x)."""
    torch.manual_seed(1)
    config = MoEConfig.from_preset("tiny", num_local_experts=5, num_experts_per_tok=2)
    moe = MoE(config)
    x = torch.randn(2, 9, config.hidden_size)
    with torch.no_grad():
        out = moe(x).reshape(-1, config.hidden_size)
        for i, token in enumerate(x.reshape(-1, config.hidden_size)):
            probs = F.softmax(moe.gate(token), dim=-1)
            top, chosen = probs.topk(2)
            expected = sum(w / top.sum() * moe.experts[int(e)](token) for w, e in zip(top, chosen))
            assert torch.allclose(out[i], expected, atol=1e-6)


def test_every_expert_gets_a_gradient_even_when_no_token_chose_it():
    """DDP requires every parameter to take part in each step: an expert no token was routed to still runs (on no
    rows) and gets a zero gradient, not None."""
    torch.manual_seed(0)
    config = MoEConfig.from_preset("tiny", num_local_experts=4, num_experts_per_tok=1)
    moe = MoE(config)
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[2] = 1.0  # expert 2 wins for inputs with positive sum
    x = torch.rand(1, 6, config.hidden_size)
    moe(x).sum().backward()
    assert all(p.grad is not None for p in moe.parameters())
    assert moe.experts[0].w1.weight.grad.abs().sum() == 0
    assert moe.experts[2].w1.weight.grad.abs().sum() > 0


def test_load_balancing_loss_by_hand():
    # One layer, 2 tokens, 4 experts, router probabilities:
    probs = torch.tensor([[0.6, 0.25, 0.1, 0.05], [0.1, 0.6, 0.2, 0.1]])
    logits = torch.log(probs)
    # mean probability P = [0.35, 0.425, 0.15, 0.075]
    # top-1: routed share f = [1/2, 1/2, 0, 0];   loss = E * sum f * P = 4 * (0.175 + 0.2125) = 1.55
    assert load_balancing_loss([logits], top_k=1).item() == pytest.approx(1.55, abs=1e-6)
    # top-2: token 1 -> {0, 1}, token 2 -> {1, 2}: f = [1/2, 1, 1/2, 0]; loss = 4 * (0.175 + 0.425 + 0.075) = 2.7
    assert load_balancing_loss([logits], top_k=2).item() == pytest.approx(2.7, abs=1e-6)
    # Masked tokens count for nothing: the same two tokens plus two masked ones.
    mask = torch.tensor([1, 1, 0, 0])
    assert load_balancing_loss([logits.repeat(2, 1)], 1, mask).item() == pytest.approx(1.55, abs=1e-6)
    # Perfect balance (token i prefers expert i), over two layers: f = P = 1/4 each, loss = 4 * 4 / 16 = 1 = k.
    balanced = torch.log(torch.eye(4) * 0.96 + 0.01)
    assert load_balancing_loss([balanced, balanced], top_k=1).item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.slow
def test_pretrain_sft_and_lora_train_an_moe_model(tmp_path, corpus, tokenizer_dir, chat_checkpoint):
    """The stages on an MoE model: pretraining makes one (a Mixtral checkpoint, aux_loss logged and added), SFT
    continues it, LoRA adapts attention and every expert by default."""
    pretrain = tmp_path / "pretrain"
    run_script("train_pretrain.py", *pretrain_args(corpus, tokenizer_dir, pretrain, "--max_steps", "4",
                                                   "--num_experts", "4", "--num_experts_per_tok", "2",
                                                   "--intermediate_size", "96"))
    config = json.loads((pretrain / "config.json").read_text())
    assert (config["model_type"], config["num_local_experts"], config["intermediate_size"]) == ("mixtral", 4, 96)
    rows = [json.loads(line) for line in (pretrain / "metrics.jsonl").read_text().splitlines()]
    assert any("aux_loss" in row and row["aux_loss"] >= 2.0 - 1e-3 for row in rows)  # top-2: at least k
    assert isinstance(AutoModelForCausalLM.from_pretrained(pretrain), MixtralForCausalLM)

    sft = tmp_path / "sft"
    run_script("train_sft.py", "--init_from", pretrain, "--data_path", chat_checkpoint["chats"], "--val_data_path",
               chat_checkpoint["chats"], "--out_dir", sft, *CHAT_TINY)
    assert json.loads((sft / "config.json").read_text())["model_type"] == "mixtral"

    lora = tmp_path / "lora"
    run_script("train_lora.py", "--init_from", sft, "--data_path", chat_checkpoint["chats"], "--val_data_path",
               chat_checkpoint["chats"], "--out_dir", lora, "--lora_r", "2", *CHAT_TINY)
    adapter = json.loads((lora / "adapter_config.json").read_text())
    assert {"q_proj", "w1", "w2", "w3"} <= set(adapter["target_modules"])
    assert "gate" not in adapter["target_modules"]


@pytest.mark.slow
def test_ddp_and_fsdp_train_an_moe_model(tmp_path, tokenizer_dir, chat_checkpoint):
    """Two processes: DDP (which fails on a parameter that takes no part in a step) and FSDP with a (sharded) MoE
    teacher; both write a Mixtral checkpoint."""
    from dataset.tokenizer import load_tokenizer, save_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    start = tmp_path / "start"
    LM(MoEConfig.from_preset("tiny", vocab_size=len(tokenizer), num_local_experts=4)).save_pretrained(start)
    save_tokenizer(tokenizer, start)
    chats = chat_checkpoint["chats"]
    common = ["--init_from", start, "--data_path", chats, "--val_data_path", chats, *CHAT_TINY, "--batch_size", "2"]
    torchrun("train_sft.py", *common, "--out_dir", tmp_path / "ddp")
    torchrun("train_sft.py", *common, "--out_dir", tmp_path / "fsdp", "--fsdp", "--teacher", start, "--kd_topk", "4")
    for out in ("ddp", "fsdp"):
        assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path / out), MixtralForCausalLM)
    rows = [json.loads(line) for line in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    assert all(key in rows[0] for key in ("ce", "kl", "aux_loss"))
    # The teacher is the student's start: no KL at the first step, then the student moves away from it.
    kd_rows = [r for r in rows if "kl" in r and "loss" in r]
    assert kd_rows[0]["kl"] == pytest.approx(0.0, abs=1e-5) and kd_rows[-1]["kl"] > 1e-6
