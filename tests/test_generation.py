"""Generation (model/generation.py): against transformers' generate() on the same weights, KV cache against full
recompute, batched generation against one prompt at a time, per-row stops, sampling controls and penalties."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from model import LM, KVCache, LMConfig
from model.generation import (
    Completion,
    apply_penalties,
    generate,
    generate_batch,
    length_batches,
    sample_next_token,
    stream,
)
from tests.conftest import SHAPES, VOCAB, make_pair


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


@pytest.mark.parametrize("no_ids", [{}, dict(eos_token_id=None, bos_token_id=None)], ids=["llama-defaults", "no-eos"])
def test_config_without_preset_generates_as_transformers(no_ids):
    """LMConfig(...) without from_preset has no pad id (and, here, maybe no eos id): generate() crashed with
    "Could not infer dtype of NoneType"; it must give transformers' tokens, stopping only at an eos it has."""
    shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=VOCAB, **no_ids)
    torch.manual_seed(0)
    ours = LM(LMConfig(**shape)).eval()
    theirs = LlamaForCausalLM(LlamaConfig(**shape)).eval()
    theirs.load_state_dict(ours.state_dict())
    prompt = torch.randint(3, VOCAB, (1, 7))
    mine = ours.generate(prompt, max_new_tokens=20)
    assert torch.equal(mine, theirs.generate(prompt, max_new_tokens=20, do_sample=False))
    if "eos_token_id" in no_ids:
        assert mine.shape == (1, 27)  # nothing to stop at: runs to max_new_tokens
    assert [c.tokens for c in generate_batch(ours, prompt.tolist(), 20)] == [mine[0, 7:].tolist()]


def test_kv_cache_in_stream_equals_full_recompute(tmp_path):
    """Greedy decoding through the cache picks, at every step, the argmax of a full forward over everything so far."""
    ours, _ = make_pair(tmp_path, **SHAPES["yarn-x4"])
    prompt = torch.randint(3, VOCAB, (2, 6))
    out = generate(ours, prompt, max_new_tokens=15, eos_token_id=[])
    with torch.no_grad():
        recomputed = torch.stack([ours(out[:, :t]).logits[:, -1].argmax(-1) for t in range(6, out.shape[1])], dim=1)
    assert torch.equal(out[:, 6:], recomputed)


PROMPTS = [[5, 9, 200, 17], list(range(40, 51)), [77], [3, 3, 8, 130, 131, 9, 12]]


def varied_model(tmp_path) -> LM:
    """Untied embeddings: a random model with tied ones mostly repeats its last token, which would make equal
    outputs say little."""
    return make_pair(tmp_path, **SHAPES["gqa4-untied-theta1e4"])[0]


@pytest.mark.parametrize("batching, sampling", [
    (dict(), dict()),
    (dict(max_batch_rows=2), dict(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2)),
    (dict(max_batch_tokens=40), dict(repetition_penalty=1.1)),
], ids=["one-batch", "two-rows-penalties", "token-budget"])
def test_generate_batch_equals_one_prompt_at_a_time(tmp_path, batching, sampling):
    ours = varied_model(tmp_path)
    batched = generate_batch(ours, PROMPTS, 12, stop_token_ids=[], **batching, **sampling)
    for prompt, completion in zip(PROMPTS, batched):
        alone = generate(ours, torch.tensor([prompt]), max_new_tokens=12, eos_token_id=[], **sampling)
        assert completion == Completion(alone[0, len(prompt):].tolist(), "length", len(prompt))


def test_groups_sampled_together_draw_as_each_group_alone(tmp_path):
    """RL's rollouts: each prompt's group of rows has its own generator; sampled in one batch (a list of generators,
    one per row), every group gets exactly what it gets from its generator alone."""
    ours, group = varied_model(tmp_path), 3
    seeds = [11, 22, 33, 44][:len(PROMPTS)]
    rows = [prompt for prompt in PROMPTS for _ in range(group)]
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    batched = generate_batch(ours, rows, 10, stop_token_ids=[], do_sample=True, top_k=20,
                             generator=[generators[i // group] for i in range(len(rows))])
    for g, (prompt, seed) in enumerate(zip(PROMPTS, seeds)):
        alone = generate_batch(ours, [prompt] * group, 10, stop_token_ids=[], do_sample=True, top_k=20,
                               generator=torch.Generator().manual_seed(seed))
        assert batched[g * group:(g + 1) * group] == alone, g
    one_generator = generate_batch(ours, rows, 10, stop_token_ids=[], do_sample=True, top_k=20,
                                   generator=torch.Generator().manual_seed(seeds[0]))
    assert [c.tokens for c in one_generator] != [c.tokens for c in batched]  # the per-row list is what did it


def test_generate_batch_stops_each_row_on_its_own(tmp_path):
    ours = varied_model(tmp_path)
    free = [c.tokens for c in generate_batch(ours, PROMPTS, 10, stop_token_ids=[])]

    def only_here(r: int) -> bool:  # row r's 4th token is not among its first three, nor in any other row
        token = free[r][3]
        return token not in free[r][:3] and all(token not in other for o, other in enumerate(free) if o != r)

    row = next(r for r in range(len(free)) if only_here(r))
    stop = free[row][3]
    ours.generation_config.eos_token_id = [stop]  # the default stop tokens are the generation_config's
    for completions in (generate_batch(ours, PROMPTS, 10), generate_batch(ours, PROMPTS, 10, stop_token_ids=stop)):
        for r, completion in enumerate(completions):
            if r == row:
                assert completion == Completion(free[r][:4], "stop", len(PROMPTS[r]))
            else:
                assert completion == Completion(free[r], "length", len(PROMPTS[r]))


def test_penalties_by_hand():
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5], [1.0, 2.0, -1.0, 0.5]])
    ids = torch.tensor([[3, 1, 1, 2], [3, 3, 3, 0]])  # a prompt of one token (3), then three generated
    seen = torch.zeros(2, 4, dtype=torch.bool).scatter(1, ids, True)
    generated = torch.zeros(2, 4).scatter_add(1, ids[:, 1:], torch.ones(2, 3))
    # OpenAI: logit - frequency * count - presence * (count > 0), counting generated tokens only (not the
    # prompt's 3). Row 0 counts: token 1 twice, token 2 once; row 1: token 3 twice, token 0 once.
    out = apply_penalties(logits, seen, generated, frequency_penalty=0.5, presence_penalty=0.25)
    assert torch.equal(out, torch.tensor([[1.0, 2.0 - 1.0 - 0.25, -1.0 - 0.5 - 0.25, 0.5],
                                          [1.0 - 0.5 - 0.25, 2.0, -1.0, 0.5 - 1.0 - 0.25]]))
    # CTRL / transformers: over prompt + generated, a positive logit divided, a negative one multiplied; once per
    # token however often it occurs. Then OpenAI's on top.
    out = apply_penalties(logits, seen, generated, repetition_penalty=2.0, frequency_penalty=0.5)
    assert torch.equal(out, torch.tensor([[1.0, 1.0 - 1.0, -2.0 - 0.5, 0.25],
                                          [0.5 - 0.5, 2.0, -1.0, 0.25 - 1.0]]))
    assert torch.equal(apply_penalties(logits, seen, generated), logits)
    # one penalty per row (the server's rows each have their own): row 0 as above, row 1 untouched
    out = apply_penalties(logits, seen, generated, repetition_penalty=[2.0, 1.0], frequency_penalty=[0.5, 0.0])
    assert torch.equal(out, torch.tensor([[1.0, 1.0 - 1.0, -2.0 - 0.5, 0.25], [1.0, 2.0, -1.0, 0.5]]))


def test_presence_penalty_counts_generated_tokens_only(tmp_path):
    ours = varied_model(tmp_path)
    prompt = torch.randint(3, VOCAB, (2, 6))
    out = generate(ours, prompt, max_new_tokens=20, presence_penalty=1e9, eos_token_id=[])
    for row in out[:, 6:].tolist():
        assert len(set(row)) == len(row)  # no generated token twice
    plain = generate(ours, prompt, max_new_tokens=20, eos_token_id=[])
    assert torch.equal(generate(ours, prompt, max_new_tokens=20, eos_token_id=[], frequency_penalty=0.0), plain)


def test_length_batches():
    lengths = [5, 30, 10, 30, 7]
    assert list(length_batches(lengths)) == [[1, 3, 2, 4, 0]]  # longest first
    assert list(length_batches(lengths, max_rows=2)) == [[1, 3], [2, 4], [0]]
    assert list(length_batches(lengths, max_tokens=60)) == [[1, 3], [2, 4, 0]]
    assert list(length_batches(lengths, max_tokens=10)) == [[1], [3], [2], [4], [0]]  # one row may exceed it


def test_stream_module_and_method_agree(tmp_path):
    ours = varied_model(tmp_path)
    prompt = torch.randint(3, VOCAB, (2, 5))
    mask = torch.ones_like(prompt)
    mine = [t.tolist() for t in stream(ours, prompt, mask, max_new_tokens=6, eos_token_id=[])]
    assert mine == [t.tolist() for t in ours.stream(prompt, mask, max_new_tokens=6, eos_token_id=[])]
    assert list(stream(ours, prompt, max_new_tokens=0)) == []


def test_top_p_near_zero_keeps_the_most_likely_token():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9], [3.0, 0.0, 0.5, 2.9]])
    for top_p in (0.0, 1e-50):
        picked = sample_next_token(logits, do_sample=True, temperature=2.0, top_p=top_p,
                                   generator=torch.Generator().manual_seed(0))
        assert picked.tolist() == [1, 0]


def test_sampling_parameters_per_row():
    """The server samples each row with its own parameters: each row gets what it would get alone."""
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(1)) * 3
    rows = [dict(temperature=0.0), dict(temperature=5.0, top_k=1), dict(temperature=1e-50),
            dict(temperature=5.0, top_p=1e-6), dict(temperature=1.5, top_k=10, top_p=0.8)]
    seeds = [torch.Generator().manual_seed(i) for i in range(5)]
    picked = sample_next_token(logits, do_sample=True, generator=seeds,
                               **{k: [r.get(k, d) for r in rows] for k, d in (("temperature", 1.0), ("top_k", 0),
                                                                               ("top_p", 1.0))})
    alone = [sample_next_token(logits[i:i + 1], do_sample=True, generator=torch.Generator().manual_seed(i), **r)
             for i, r in enumerate(rows)]
    assert picked.tolist() == torch.cat(alone).tolist()
    assert picked[:4].tolist() == logits[:4].argmax(-1).tolist()  # greedy, top_k 1, too cold, top_p near 0
    # the last row's draws stay inside its top 10, and differ from greedy somewhere
    draws = [int(sample_next_token(logits[4:], do_sample=True, temperature=1.5, top_k=10, top_p=0.8,
                                   generator=torch.Generator().manual_seed(s))) for s in range(40)]
    assert set(draws) <= set(logits[4].topk(10).indices.tolist()) and len(set(draws)) > 1
