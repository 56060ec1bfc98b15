"""The hand-written model against transformers' own LlamaForCausalLM, on the same weights.

Generation is tested in test_generation.py."""

import json

import pytest
import torch
from transformers import LlamaForCausalLM

from model import LM, LMConfig
from tests.conftest import SHAPES, VOCAB, make_pair


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
    """segment_ids + restarting position_ids: each packed sequence sees only itself."""
    ours, _ = make_pair(tmp_path, **SHAPES["gqa2-tied"])
    a, b = torch.randint(3, VOCAB, (1, 7)), torch.randint(3, VOCAB, (1, 5))
    packed = torch.cat([a, b, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    segments = torch.tensor([[1] * 7 + [2] * 5 + [0] * 3])
    positions = torch.tensor([list(range(7)) + list(range(5)) + [0, 1, 2]])
    with torch.no_grad():
        out = ours(packed, segment_ids=segments, position_ids=positions).logits
        assert torch.allclose(out[:, :7], ours(a).logits, atol=1e-5)
        assert torch.allclose(out[:, 7:12], ours(b).logits, atol=1e-5)


def test_logits_at_gives_the_full_logits_at_those_positions_and_their_gradients(tmp_path):
    """logits_at (the training losses' way to skip the output layer where nothing is scored) returns exactly the
    selected rows of the full logits, in row order, on packed rows too, and the same gradients reach the weights."""
    ours, _ = make_pair(tmp_path, **SHAPES["gqa2-tied"])
    torch.manual_seed(0)  # the same ids and weights whatever ran before
    ids = torch.randint(3, VOCAB, (2, 9))
    segments = torch.tensor([[1] * 4 + [2] * 5, [1] * 7 + [0] * 2])
    positions = torch.tensor([list(range(4)) + list(range(5)), list(range(7)) + [0, 1]])
    at = torch.zeros(2, 9, dtype=torch.bool)
    at[0, [1, 5, 8]] = at[1, [0, 6]] = True
    full = ours(ids, segment_ids=segments, position_ids=positions).logits
    picked = ours(ids, segment_ids=segments, position_ids=positions, logits_at=at).logits
    assert picked.shape == (5, VOCAB)
    torch.testing.assert_close(picked, full[at], atol=1e-6, rtol=1e-5)
    weights = torch.randn(5, VOCAB)
    grads = [torch.autograd.grad((logits * weights).sum(), list(ours.parameters())) for logits in (full[at], picked)]
    for from_full, from_picked in zip(*grads):
        # the same sums in another order (the head's matmul over 5 rows, not 18): fp32 rounding, no more
        torch.testing.assert_close(from_picked, from_full, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="logits_at"):
        ours(ids, labels=ids, logits_at=at)


def test_checkpoint_names_the_llama_architecture(tmp_path):
    """vLLM and llama.cpp's converter dispatch on config.json's "architectures": it must name LlamaForCausalLM,
    not our class, and the directory must still load in both classes."""
    ours, theirs = make_pair(tmp_path, **SHAPES["gqa2-tied"])
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert isinstance(theirs, LlamaForCausalLM)
    again = LM.from_pretrained(tmp_path)
    assert isinstance(again, LM)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), again.state_dict().values()))


@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4), (4, 1)])
def test_one_token_attention_equals_full_attention_over_the_cache(heads, kv_heads):
    """Decoding one token folds each KV group's query heads into rows: its output must equal the ordinary attention
    of the last position over the whole sequence, with a padding mask."""
    from model.generation import KVCache
    from model.model import Attention, RotaryEmbedding, visibility_mask

    torch.manual_seed(0)
    config = LMConfig.from_preset("tiny", vocab_size=VOCAB, num_attention_heads=heads, num_key_value_heads=kv_heads)
    attention, rope = Attention(config, layer_idx=0).eval(), RotaryEmbedding(config)
    x = torch.randn(3, 7, config.hidden_size)
    segments = torch.ones(3, 7, dtype=torch.long)
    segments[1, :3] = 0  # a left-padded row
    positions = torch.arange(7).expand(3, 7)
    with torch.no_grad():
        cos, sin = rope(x, positions)
        full = attention(x, cos, sin, visibility_mask(segments, 7, 0))[:, -1]
        cache = KVCache(config, 3, 8, x.device, x.dtype)
        attention(x[:, :6], cos[:, :6], sin[:, :6], visibility_mask(segments, 6, 0), cache)
        cache.seq_len = 6
        last = attention(x[:, 6:], cos[:, 6:], sin[:, 6:], visibility_mask(segments, 1, 6), cache)[:, 0]
    assert torch.allclose(last, full, atol=1e-5), (last - full).abs().max()
