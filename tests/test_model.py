"""The hand-written model against transformers' own LlamaForCausalLM, on the same weights."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from model import LM, KVCache, LMConfig
from model.config import yarn

VOCAB = 256
SHAPES = {
    "gqa2-tied": dict(num_attention_heads=4, num_key_value_heads=2),
    "gqa4-untied-theta1e4": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
                                 rope_theta=1e4),
    "mha-theta5e5": dict(num_attention_heads=4, num_key_value_heads=4, rope_theta=5e5),
    "yarn-x4": dict(num_attention_heads=4, num_key_value_heads=2, rope_parameters=yarn(4.0, 64)),
    "linear-x2-untied": dict(num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
                             rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}),
}


def make_pair(tmp_path, **shape):
    torch.manual_seed(0)
    config = LMConfig.from_preset("tiny", vocab_size=VOCAB, **shape)
    ours = LM(config).eval()
    with torch.no_grad():  # norms start at 1; perturb them so a mix-up of norm weights would show
        for name, p in ours.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    ours.save_pretrained(tmp_path)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    return ours, theirs


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_logits_match_transformers(tmp_path, shape):
    ours, theirs = make_pair(tmp_path, **shape)
    assert isinstance(theirs, LlamaForCausalLM)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama"
    assert ours.config.tie_word_embeddings == theirs.config.tie_word_embeddings
    if not ours.config.tie_word_embeddings:
        assert not torch.equal(ours.lm_head.weight, ours.model.embed_tokens.weight)
    ids = torch.randint(3, VOCAB, (3, 40))
    with torch.no_grad():
        diff = (ours(ids).logits - theirs(ids).logits).abs().max().item()
        assert diff < 1e-4

        # Left padding: rows 1 and 2 have 5 and 12 padding positions.
        mask = torch.ones_like(ids)
        mask[1, :5] = 0
        mask[2, :12] = 0
        a, b = ours(ids, attention_mask=mask).logits, theirs(ids, attention_mask=mask).logits
        real = mask.bool()
        assert (a[real] - b[real]).abs().max().item() < 1e-4
        assert torch.isfinite(a).all()

        # Same loss for the same labels (transformers shifts inside; so do we).
        labels = ids.clone()
        labels[0, :7] = -100
        assert abs(ours(ids, labels=labels).loss.item() - theirs(ids, labels=labels).loss.item()) < 1e-5


def test_padding_mask_changes_nothing_for_real_tokens_right_padded(tmp_path):
    ours, _ = make_pair(tmp_path, **SHAPES["gqa2-tied"])
    ids = torch.randint(3, VOCAB, (1, 20))
    padded = torch.cat([ids, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 20), torch.zeros(1, 6)], dim=1).long()
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, ours(padded, attention_mask=mask).logits[:, :20], atol=1e-5)


@pytest.mark.parametrize("shape", ["gqa2-tied", "gqa4-untied-theta1e4", "yarn-x4"])
def test_greedy_generate_matches_transformers(tmp_path, shape):
    ours, theirs = make_pair(tmp_path, **SHAPES[shape])
    prompt = torch.randint(3, VOCAB, (2, 9))
    mine = ours.generate(prompt, max_new_tokens=24, eos_token_id=[])
    ref = theirs.generate(prompt, max_new_tokens=24, min_new_tokens=24, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    assert mine.shape == (2, 33)
    assert torch.equal(mine, ref)


def test_greedy_generate_left_padded_batch_matches_transformers(tmp_path):
    ours, theirs = make_pair(tmp_path, **SHAPES["gqa2-tied"])
    prompt = torch.randint(3, VOCAB, (2, 10))
    prompt[1, :4] = 0
    mask = torch.ones_like(prompt)
    mask[1, :4] = 0
    mine = ours.generate(prompt, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    ref = theirs.generate(prompt, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    assert torch.equal(mine, ref)


def test_kv_cache_decoding_equals_full_recompute(tmp_path):
    ours, _ = make_pair(tmp_path, **SHAPES["gqa2-tied"])
    ids = torch.randint(3, VOCAB, (2, 30))
    with torch.no_grad():
        full = ours(ids).logits
        cache = KVCache(ours.config, batch_size=2, capacity=4, device="cpu", dtype=torch.float32)  # forces growth
        steps = [ours(ids[:, :10], past_key_values=cache).logits]  # prefill
        steps.append(ours(ids[:, 10:17], past_key_values=cache).logits)  # a chunk after the cache
        steps += [ours(ids[:, t:t + 1], past_key_values=cache).logits for t in range(17, 30)]
    assert cache.seq_len == 30
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-5


def test_eos_stops_and_pads_finished_rows(tmp_path):
    ours, _ = make_pair(tmp_path, **SHAPES["gqa2-tied"])
    prompt = torch.randint(3, VOCAB, (2, 5))
    free = ours.generate(prompt, max_new_tokens=8, eos_token_id=[])
    eos = int(free[0, 5])  # the first token row 0 generates becomes "eos"
    out = ours.generate(prompt, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    assert out[0, 5] == eos
    if eos in free[1, 5:].tolist():  # both rows stop at their first eos
        assert out.shape[1] == 5 + free[1, 5:].tolist().index(eos) + 1
    else:  # row 1 runs on unchanged; row 0 is padded after its eos
        assert out.shape[1] == 13 and torch.equal(out[1], free[1])
        assert (out[0, 6:] == 0).all()


def test_sampling_controls(tmp_path):
    ours, _ = make_pair(tmp_path, **SHAPES["gqa2-tied"])
    prompt = torch.randint(3, VOCAB, (4, 6))
    gen = torch.Generator().manual_seed(1)
    a = ours.generate(prompt, max_new_tokens=10, do_sample=True, temperature=0.8, top_k=5, top_p=0.9,
                      eos_token_id=[], generator=gen)
    gen = torch.Generator().manual_seed(1)
    b = ours.generate(prompt, max_new_tokens=10, do_sample=True, temperature=0.8, top_k=5, top_p=0.9,
                      eos_token_id=[], generator=gen)
    assert torch.equal(a, b)  # seeded sampling is reproducible
    # top_k=1 is greedy whatever the temperature.
    greedy = ours.generate(prompt, max_new_tokens=10, eos_token_id=[])
    assert torch.equal(ours.generate(prompt, max_new_tokens=10, do_sample=True, top_k=1, temperature=5.0,
                                     eos_token_id=[]), greedy)
    # A huge repetition penalty forbids repeating any token already in the sequence.
    out = ours.generate(prompt[:1], max_new_tokens=20, repetition_penalty=1e9, eos_token_id=[])
    seq = out[0].tolist()
    assert all(seq[i] not in seq[:i] for i in range(6, len(seq)))


def test_streaming_yields_the_same_tokens(tmp_path):
    ours, _ = make_pair(tmp_path, **SHAPES["gqa2-tied"])
    prompt = torch.randint(3, VOCAB, (1, 6))
    streamed = []
    out = ours.generate(prompt, max_new_tokens=7, eos_token_id=[], streamer=lambda t: streamed.append(int(t[0])))
    assert streamed == out[0, 6:].tolist()
    assert [int(t[0]) for t in ours.stream(prompt, max_new_tokens=7, eos_token_id=[])] == streamed


def test_presets_have_the_sizes_they_promise():
    n_params = {name: sum(p.numel() for p in LM(LMConfig.from_preset(name)).parameters())
                for name in ("tiny", "small")}
    assert n_params["tiny"] < 1_000_000
    small = LMConfig.from_preset("small")
    assert (small.hidden_size, small.num_hidden_layers, small.num_attention_heads, small.num_key_value_heads,
            small.vocab_size) == (512, 8, 8, 2, 6400)
    assert 20e6 < n_params["small"] < 30e6
    with pytest.raises(ValueError, match="unknown preset"):
        LMConfig.from_preset("huge")


def test_packed_rows_equal_separate_sequences(tmp_path):
    """Segment ids in attention_mask + restarting position_ids: each packed sequence sees only itself."""
    ours, _ = make_pair(tmp_path, **SHAPES["gqa2-tied"])
    a, b = torch.randint(3, VOCAB, (1, 7)), torch.randint(3, VOCAB, (1, 5))
    packed = torch.cat([a, b, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    segments = torch.tensor([[1] * 7 + [2] * 5 + [0] * 3])
    positions = torch.tensor([list(range(7)) + list(range(5)) + [0, 1, 2]])
    with torch.no_grad():
        out = ours(packed, attention_mask=segments, position_ids=positions).logits
        assert torch.allclose(out[:, :7], ours(a).logits, atol=1e-5)
        assert torch.allclose(out[:, 7:12], ours(b).logits, atol=1e-5)


def test_generation_under_autocast_casts_each_weight_once(tmp_path):
    """Under bf16 autocast, generate() casts each fp32 weight once per call, not once per decoding step (autocast's
    weight cache, which inference mode switches off: so also when the caller is in inference mode)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountWeightCasts(TorchDispatchMode):
        def __init__(self, shape):
            super().__init__()
            self.shape, self.count = shape, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            # aten.to in inference mode, aten._to_copy outside it
            if func.overloadpacket in (torch.ops.aten.to, torch.ops.aten._to_copy) and args[0].shape == self.shape:
                self.count += 1
            return func(*args, **(kwargs or {}))

    ours, _ = make_pair(tmp_path, **SHAPES["gqa2-tied"])
    prompt = torch.randint(3, VOCAB, (2, 5))
    expected = ours.generate(prompt, max_new_tokens=12, eos_token_id=[])
    for outer in (torch.no_grad, torch.inference_mode):
        casts = CountWeightCasts(ours.model.layers[0].mlp.gate_proj.weight.shape)
        with outer(), torch.autocast("cpu", dtype=torch.bfloat16), casts:
            out = ours.generate(prompt, max_new_tokens=12, eos_token_id=[])
        assert casts.count == 2 * ours.config.num_hidden_layers  # gate_proj and up_proj of each layer, once
        assert out.shape == expected.shape and (out == expected).float().mean() > 0.5
    assert all(p.dtype == torch.float32 for p in ours.parameters())
