"""scripts/export_gguf.py: the GGUF file read back with the gguf package (tensors equal our weights once the
query/key permutation is undone, metadata, tokenizer), the Ollama Modelfile, and, where llama-cpp-python is
installed (`pip install llama-cpp-python`, which builds llama.cpp from source), llama.cpp itself: same tokens,
same logits, same greedy continuation, and from a q8_0 file nearly the same logits and the same greedy tokens."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset.chat import load_tokenizer, render_chat, save_tokenizer
from model import LM, LMConfig
from model.lora import apply_lora, merge_lora, save_lora
from serving.gguf import gguf_name, permute_qk, pre_tokenizer_type, unpermute_qk

gguf = pytest.importorskip("gguf")

REPO = Path(__file__).resolve().parents[1]
MINIMIND = REPO.parent / "shared" / "fixtures" / "minimind"


def export(model_dir: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "scripts.export_gguf", "--model", str(model_dir), "--out",
                             str(out), *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


def field(reader, key: str):
    """A metadata value as Python: a scalar, a string, or a list of either."""
    f = reader.fields[key]
    values = [f.parts[i] for i in f.data]
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        if f.types[1] == gguf.GGUFValueType.STRING:
            return [bytes(v).decode("utf-8") for v in values]
        return [v.item() for v in values]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(values[0]).decode("utf-8")
    return values[0].item()


def tensors(reader) -> dict[str, np.ndarray]:
    return {t.name: np.array(t.data) for t in reader.tensors}


@pytest.fixture(scope="module")
def exported(chat_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "model.gguf"
    export(chat_checkpoint["model"], out)
    return out


@pytest.mark.slow
def test_tensors_equal_our_weights(chat_checkpoint, exported):
    model = LM.from_pretrained(chat_checkpoint["model"])
    config = model.config
    stored = tensors(gguf.GGUFReader(exported))
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: llama.cpp reuses
    assert set(stored) == {gguf_name(k) for k in expected}
    assert "output.weight" not in stored and config.tie_word_embeddings
    for key, weight in expected.items():
        data = torch.from_numpy(stored[gguf_name(key)]).reshape(weight.shape)
        if key.endswith("q_proj.weight"):
            assert not torch.equal(data, weight)  # permuted on disk ...
            data = unpermute_qk(data, config.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            data = unpermute_qk(data, config.num_key_value_heads)
        assert torch.equal(data, weight), key  # ... and exactly our weights once undone


@pytest.mark.slow
def test_metadata_and_tokenizer(chat_checkpoint, exported):
    reader = gguf.GGUFReader(exported)
    model_dir = Path(chat_checkpoint["model"])
    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = load_tokenizer(model_dir)
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "llama.context_length") == config["max_position_embeddings"]
    assert field(reader, "llama.embedding_length") == config["hidden_size"]
    assert field(reader, "llama.block_count") == config["num_hidden_layers"]
    assert field(reader, "llama.feed_forward_length") == config["intermediate_size"]
    assert field(reader, "llama.attention.head_count") == config["num_attention_heads"]
    assert field(reader, "llama.attention.head_count_kv") == config["num_key_value_heads"]
    assert field(reader, "llama.rope.dimension_count") == config["hidden_size"] // config["num_attention_heads"]
    assert field(reader, "llama.rope.freq_base") == pytest.approx(config["rope_parameters"]["rope_theta"])
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"])
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "starcoder"
    tokens = field(reader, "tokenizer.ggml.tokens")
    vocab = {i: t for t, i in tokenizer.get_vocab().items()}
    assert tokens == [vocab[i] for i in range(config["vocab_size"])]
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[tokens.index("<|im_start|>")] == gguf.TokenType.CONTROL
    assert types[tokens.index("<think>")] == gguf.TokenType.USER_DEFINED
    normal = next(i for i, t in enumerate(tokens) if t not in tokenizer.get_added_vocab())
    assert types[normal] == gguf.TokenType.NORMAL
    merges = json.loads((model_dir / "tokenizer.json").read_text())["model"]["merges"]
    assert len(field(reader, "tokenizer.ggml.merges")) == len(merges)
    assert field(reader, "tokenizer.ggml.bos_token_id") == config["bos_token_id"]
    assert field(reader, "tokenizer.ggml.eos_token_id") == config["eos_token_id"]
    assert field(reader, "tokenizer.ggml.padding_token_id") == config["pad_token_id"]
    assert field(reader, "tokenizer.ggml.add_bos_token") is False
    assert field(reader, "tokenizer.chat_template") == tokenizer.chat_template


@pytest.mark.slow
def test_modelfile_for_ollama(exported):
    modelfile = (exported.parent / "Modelfile").read_text()
    assert modelfile.startswith(f"FROM ./{exported.name}\n")
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "<|im_start|>{{ $m.Role }}" in modelfile and "{{ range" not in modelfile.replace("{{- range", "")
    assert 'TEMPLATE """' in modelfile and "<|im_start|>assistant\n" in modelfile


@pytest.mark.slow
def test_lora_is_merged_and_f16(chat_checkpoint, tmp_path):
    model = LM.from_pretrained(chat_checkpoint["model"])
    apply_lora(model, r=4, alpha=8)
    torch.manual_seed(2)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_()
    save_lora(model, tmp_path / "lora", base_model_path=str(chat_checkpoint["model"]))
    merged = merge_lora(model)
    export(chat_checkpoint["model"], tmp_path / "lora.gguf", "--lora", str(tmp_path / "lora"))
    stored = tensors(gguf.GGUFReader(tmp_path / "lora.gguf"))
    q = torch.from_numpy(stored["blk.0.attn_q.weight"])
    assert torch.allclose(unpermute_qk(q, merged.config.num_attention_heads),
                          merged.model.layers[0].self_attn.q_proj.weight, atol=1e-6)
    export(chat_checkpoint["model"], tmp_path / "half.gguf", "--outtype", "f16")
    half = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "half.gguf").tensors}
    assert half["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.F16
    assert half["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32


def test_q8_0_is_each_weight_within_half_a_step(chat_checkpoint, tmp_path):
    """--outtype q8_0: matrices in llama.cpp's 8-bit blocks, each weight back within about half a step of its
    block's scale (max |w| / 127); a matrix whose rows are not whole blocks of 32 is written f16; norms stay f32;
    the file is about a quarter of the f32 one."""
    tokenizer = load_tokenizer(chat_checkpoint["model"])
    model = LM(LMConfig.from_preset("tiny", vocab_size=len(tokenizer), intermediate_size=72))  # down_proj: rows of 72
    torch.manual_seed(0)
    for param in model.parameters():
        param.data.normal_(std=0.05)
    model.save_pretrained(tmp_path / "model")
    save_tokenizer(tokenizer, tmp_path / "model")
    export(tmp_path / "model", tmp_path / "q8.gguf", "--outtype", "q8_0")
    export(tmp_path / "model", tmp_path / "f32.gguf")
    reader = gguf.GGUFReader(tmp_path / "q8.gguf")
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    assert kinds["blk.0.ffn_up.weight"] == kinds["blk.0.attn_q.weight"] == kinds["token_embd.weight"] == \
        gguf.GGMLQuantizationType.Q8_0
    assert kinds["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.F16
    assert kinds["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    for t in reader.tensors:
        key = next(k for k in model.state_dict() if gguf_name(k) == t.name)
        weight = model.state_dict()[key].float()
        if key.endswith("q_proj.weight"):
            weight = permute_qk(weight, model.config.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            weight = permute_qk(weight, model.config.num_key_value_heads)
        got = gguf.quants.dequantize(np.array(t.data), t.tensor_type).reshape(weight.shape)
        if t.tensor_type == gguf.GGMLQuantizationType.Q8_0:
            blocks = weight.reshape(-1, 32).abs().amax(1, keepdim=True).expand(-1, 32).reshape(weight.shape)
            # half a step, and the f16 scale's rounding (2^-11 of it) times up to 127 steps
            assert (np.abs(got - weight.numpy()) <= 0.57 * blocks.numpy() / 127).all(), t.name
            assert not np.array_equal(got, weight.numpy())  # rounded: a real 8-bit format
        else:
            assert np.allclose(got, weight.numpy(), atol=1e-4), t.name
    ratio = (tmp_path / "q8.gguf").stat().st_size / (tmp_path / "f32.gguf").stat().st_size
    assert ratio < 0.45, ratio  # the tokenizer's metadata is the same in both


def test_permutation_turns_rotate_half_into_adjacent_pairs():
    """RoPE on Hugging Face's layout (rotate_half) and llama.cpp's rotation of adjacent pairs on the permuted rows
    give the same attention scores: the permutation is the one llama.cpp expects."""
    torch.manual_seed(0)
    heads, dim, hidden, pos = 2, 8, 16, torch.tensor([3.0, 11.0])
    wq, wk, x = torch.randn(heads * dim, hidden), torch.randn(heads * dim, hidden), torch.randn(2, hidden)
    inv = 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)
    angle = pos[:, None] * inv  # (2 positions, dim/2)

    def hf_rope(v):  # (positions, heads, dim): pairs (i, i + dim/2)
        cos, sin = torch.cat([angle.cos()] * 2, -1)[:, None], torch.cat([angle.sin()] * 2, -1)[:, None]
        half = torch.cat([-v[..., dim // 2:], v[..., :dim // 2]], -1)
        return v * cos + half * sin

    def cpp_rope(v):  # pairs (2i, 2i + 1)
        a, b = v[..., 0::2], v[..., 1::2]
        cos, sin = angle.cos()[:, None], angle.sin()[:, None]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)

    q, k = (x @ wq.T).view(2, heads, dim), (x @ wk.T).view(2, heads, dim)
    ours = (hf_rope(q)[0] * hf_rope(k)[1]).sum(-1)
    pq, pk = (x @ permute_qk(wq, heads).T).view(2, heads, dim), (x @ permute_qk(wk, heads).T).view(2, heads, dim)
    theirs = (cpp_rope(pq)[0] * cpp_rope(pk)[1]).sum(-1)
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert torch.equal(unpermute_qk(permute_qk(wq, heads), heads), wq)


def test_pre_tokenizer_for_ours_and_minimind(tokenizer_dir):
    ours = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text())
    assert pre_tokenizer_type(ours) == "starcoder"
    if MINIMIND.is_dir():
        assert pre_tokenizer_type(json.loads((MINIMIND / "tokenizer.json").read_text())) == "gpt-2"
    with pytest.raises(ValueError, match="no llama.cpp pre-tokenizer"):
        pre_tokenizer_type({**ours, "pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}})
    runs_of_digits = [{"type": "Digits", "individual_digits": False}, ours["pre_tokenizer"]["pretokenizers"][1]]
    with pytest.raises(ValueError, match="no llama.cpp pre-tokenizer"):
        pre_tokenizer_type({**ours, "pre_tokenizer": {"type": "Sequence", "pretokenizers": runs_of_digits}})


@pytest.mark.slow
def test_bad_directory_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "scripts.export_gguf", "--model", str(tmp_path), "--out",
                             str(tmp_path / "x.gguf")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no config.json" in result.stderr and "Traceback" not in result.stderr


# -- llama.cpp itself (optional: pip install llama-cpp-python) ----------------------------------------------------


def briefly_trained(chat_checkpoint, out: Path) -> Path:
    """The tiny model after a few seconds of training on the chats, so that greedy decoding is not one token
    repeated (a random model's is)."""
    tokenizer = load_tokenizer(chat_checkpoint["model"])
    model = LM.from_pretrained(chat_checkpoint["model"])
    rows = [json.loads(line)["conversations"] for line in Path(chat_checkpoint["chats"]).read_text().splitlines()]
    ids = [t for row in rows for t in tokenizer(render_chat(row), add_special_tokens=False)["input_ids"]]
    data = torch.tensor(ids[: len(ids) // 64 * 64]).view(-1, 64)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(120):
        batch = data[torch.randint(len(data), (8,))]
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(out)
    save_tokenizer(tokenizer, out)
    return out


@pytest.mark.slow
def test_llama_cpp_decodes_as_we_do(chat_checkpoint, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="optional: pip install llama-cpp-python")
    model_dir = briefly_trained(chat_checkpoint, tmp_path / "trained")
    export(model_dir, tmp_path / "trained.gguf")
    tokenizer, model = load_tokenizer(model_dir), LM.from_pretrained(model_dir).eval()
    llm = llama_cpp.Llama(model_path=str(tmp_path / "trained.gguf"), n_ctx=512, logits_all=True, verbose=False,
                          n_threads=1)
    texts = ["质量很好，物流很快！ Hello world's 3.14", "<think>\n想想\n</think>\n\n好评\n\n  \t 空格",
             "共1234个，2024年１月２３日 12+345=357 x2",
             render_chat([{"role": "user", "content": "这条评论是好评还是差评？质量很好"}], add_generation_prompt=True)]
    for text in texts:
        ours = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ours
        assert llm.detokenize(ours, special=True).decode() == text
    prompt = tokenizer(texts[-1], add_special_tokens=False)["input_ids"]
    llm.eval(prompt)
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].numpy()
    assert np.abs(np.array(llm.scores[:len(prompt)]) - logits).max() < 1e-2  # llama.cpp keeps K/V in fp16
    reference = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=[])
    reference = reference[0, len(prompt):].tolist()
    assert len(set(reference)) > 3  # a real continuation, not one token repeated
    theirs = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        theirs.append(token)
        if len(theirs) == len(reference):
            break
    assert theirs == reference
    llm.close()
    # q8_0, run by llama.cpp's own 8-bit kernels: the same distribution, up to the rounding of the weights
    export(model_dir, tmp_path / "q8.gguf", "--outtype", "q8_0")
    q8 = llama_cpp.Llama(model_path=str(tmp_path / "q8.gguf"), n_ctx=512, logits_all=True, verbose=False,
                         n_threads=1)
    q8.eval(prompt)
    scores = np.array(q8.scores[:len(prompt)])
    assert np.abs(scores - logits).max() < 0.2 < logits.std()  # 0.066 here, against logits spread 1.39
    assert (scores.argmax(1) == logits.argmax(1)).mean() >= 0.95  # 1.0 here
    greedy = []
    for token in q8.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        greedy.append(token)
        if len(greedy) == 12:
            break
    assert greedy == reference[:12]  # all 24 here
    q8.close()


@pytest.mark.slow
@pytest.mark.skipif(not MINIMIND.is_dir(), reason="MiniMind's tokenizer fixture is not here")
def test_llama_cpp_tokenizes_as_minimind_does(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="optional: pip install llama-cpp-python")
    from model import LMConfig

    tokenizer = load_tokenizer(MINIMIND)
    LM(LMConfig.from_preset("tiny", vocab_size=len(tokenizer))).save_pretrained(tmp_path / "minimind")
    save_tokenizer(tokenizer, tmp_path / "minimind")
    export(tmp_path / "minimind", tmp_path / "minimind.gguf")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "minimind.gguf"), n_ctx=64, verbose=False, n_threads=1)
    texts = ["你好，世界！ Hello world's 3.14 test", "🚀 (normal) 😶\u200d🌫️ 3333 I've been 'told he's there",
             render_chat([{"role": "system", "content": "你是助手"}, {"role": "user", "content": "质量很好吗？"}],
                         add_generation_prompt=True) + "<think>\n想想\n</think>\n\n好评 <tool_call>x</tool_call>"]
    for text in texts:
        ours = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ours
        assert llm.detokenize(ours, special=True).decode() == text
    llm.close()


@pytest.mark.slow
def test_llama_cpp_samples_what_our_gbnf_takes(chat_checkpoint, tmp_path):
    """The structured-output grammars of tests/test_structured.py, given to llama.cpp's own GBNF sampler: every
    answer it writes is one our recognizer (serving/gbnf.py) takes, whole where it stopped by itself, a beginning
    where the token budget cut it."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="optional: pip install llama-cpp-python")
    from serving.structured import TokenTrie, cfg_grammar
    from tests.test_structured import GBNF_PATTERNS

    model_dir = briefly_trained(chat_checkpoint, tmp_path / "trained")
    export(model_dir, tmp_path / "trained.gguf")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "trained.gguf"), n_ctx=512, verbose=False, n_threads=1)
    nested = 'root ::= value\nvalue ::= "[" (value ("," value)*)? "]" | int\nint ::= "-"? ("0" | [1-9] [0-9]*)'
    every_byte = TokenTrie([bytes([b]) for b in range(256)])
    whole = 0
    for text in [*GBNF_PATTERNS, nested]:
        ours = cfg_grammar(text, every_byte)
        theirs = llama_cpp.LlamaGrammar.from_string(text, verbose=False)
        for seed in range(4):
            out = llm.create_completion("质量很好", max_tokens=16, temperature=1.0, seed=seed, grammar=theirs)
            answer, finish = out["choices"][0]["text"], out["choices"][0]["finish_reason"]
            state = ours.advance(ours.start, answer.encode())
            assert state is not None, (text, answer)
            if finish == "stop":
                assert ours.done(state), (text, answer)
                whole += 1
    llm.close()
    assert whole >= 20  # most answers end by themselves
