"""Write a checkpoint as a GGUF file that llama.cpp and Ollama run, and an Ollama Modelfile beside it.

What llama.cpp's own converter (convert_hf_to_gguf.py, LlamaModel) would write for a Llama directory, without
needing it: architecture "llama"; tensors under llama.cpp's names (token_embd, blk.N.attn_q, ...), with the
query and key rows permuted back from Hugging Face's rotate-half RoPE layout to the interleaved pairs that
llama.cpp rotates; the byte-level BPE tokenizer as tokenizer.ggml.model "gpt2" with the llama.cpp
pre-tokenizer that splits text as its tokenizer.json does: "starcoder" (every digit alone, then GPT-2's regex)
for ours, "gpt-2" for MiniMind's (llama.cpp's converter stops at "BPE pre-tokenizer was not recognized" for
both, because it looks tokenizers up by a hash of known models' outputs); the chat template; and the special
token ids.
"""

import json
from pathlib import Path

import gguf
import numpy as np
import torch

from model import LM

LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.o_proj.bias": "attn_output.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}


def gguf_name(name: str) -> str:
    """llama.cpp's tensor name for one of our (transformers Llama) parameter names."""
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    parts = name.split(".")
    if parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in LAYER_NAMES:
        return f"blk.{parts[2]}.{LAYER_NAMES['.'.join(parts[3:])]}"
    raise ValueError(f"parameter {name} has no GGUF name (only dense Llama layers are exported)")


def permute_qk(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face stores each head's query/key rows as [first halves of the pairs, second halves] (rotate_half);
    llama.cpp rotates adjacent rows (x0, x1), (x2, x3), ...: interleave the two halves, as llama.cpp's converter
    does (LlamaModel.permute)."""
    shape = weight.shape
    return weight.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def unpermute_qk(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of permute_qk: llama.cpp's row order back to ours."""
    shape = weight.shape
    return weight.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def pre_tokenizer_type(tokenizer_json: dict) -> str:
    """The llama.cpp pre-tokenizer that splits text as this tokenizer.json does, or an error saying why none."""
    pre, normalizer = tokenizer_json.get("pre_tokenizer") or {}, tokenizer_json.get("normalizer")
    if tokenizer_json.get("model", {}).get("type") != "BPE":
        raise ValueError("only BPE tokenizers are exported (tokenizer.json's model is "
                         f"{tokenizer_json.get('model', {}).get('type')!r})")
    if normalizer is None and _gpt2_byte_level(pre):
        return "gpt-2"  # the GPT-2 regex over raw text: llama.cpp's LLAMA_VOCAB_PRE_TYPE_GPT2 (MiniMind's tokenizer)
    digits, *rest = pre.get("pretokenizers") or [{}]
    if normalizer is None and pre.get("type") == "Sequence" and len(rest) == 1 and _gpt2_byte_level(rest[0]) \
            and digits == {"type": "Digits", "individual_digits": True}:
        return "starcoder"  # each digit alone, then GPT-2's regex: LLAMA_VOCAB_PRE_TYPE_STARCODER (danlu's tokenizer)
    raise ValueError(f"no llama.cpp pre-tokenizer known to match pre_tokenizer={json.dumps(pre)} with "
                     f"normalizer={json.dumps(normalizer)}; only byte-level BPE with GPT-2's regex (MiniMind's "
                     "tokenizer), optionally after splitting off every digit (danlu's), is supported")


def _gpt2_byte_level(pre: dict) -> bool:
    """Whether pre is a ByteLevel pre-tokenizer that splits by GPT-2's regex, without a prefix space."""
    return pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")


def _vocabulary(tokenizer, tokenizer_json: dict, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) as llama.cpp's converter lists a GPT-2 style BPE vocabulary."""
    reverse = {i: token for token, i in tokenizer.get_vocab().items()}
    added = {t["id"]: t for t in tokenizer_json.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if i in added:
            special = added[i].get("special") or (token.startswith("<|") and token.endswith("|>"))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer_json["model"].get("merges", [])]
    return tokens, types, merges


OUTTYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}


def export_gguf(model: LM, tokenizer, tokenizer_dir: str | Path, out_path: str | Path, name: str,
                outtype: str = "f32") -> dict:
    """Write `model` (LoRA already merged) and its tokenizer as GGUF; a summary of what was written. `outtype`: the
    matrices' type, f32, f16 or q8_0 (llama.cpp's 8-bit blocks: 32 weights and one f16 scale; a matrix whose rows
    are not a whole number of blocks is written f16, as llama.cpp's converter does); norms stay f32."""
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype {outtype!r}: choose {', '.join(OUTTYPES)}")
    config = model.config
    if getattr(config, "num_local_experts", 0) or getattr(config, "num_experts", 0):
        raise ValueError("MoE checkpoints are not exported to GGUF here (only dense Llama)")
    tokenizer_json = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    pre = pre_tokenizer_type(tokenizer_json)
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    rope = config.rope_parameters or {"rope_type": "default", "rope_theta": 1e6}

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope_type = rope.get("rope_type", "default")
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif rope_type != "default":
        raise ValueError(f"rope_type {rope_type!r} has no GGUF export here (default, linear, yarn)")
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(OUTTYPES[outtype])

    tokens, types, merges = _vocabulary(tokenizer, tokenizer_json, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for add, token_id in ((writer.add_bos_token_id, config.bos_token_id), (writer.add_eos_token_id,
                          config.eos_token_id), (writer.add_pad_token_id, config.pad_token_id)):
        if token_id is not None:
            add(int(token_id))
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)

    written = []
    tied = bool(config.tie_word_embeddings)
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and tied:
            continue  # llama.cpp uses token_embd for the output when there is no output.weight
        data = tensor.detach().float().cpu()
        if key.endswith(("q_proj.weight", "q_proj.bias")):
            data = permute_qk(data, heads)
        elif key.endswith(("k_proj.weight", "k_proj.bias")):
            data = permute_qk(data, kv_heads)
        array, kind = np.ascontiguousarray(data.numpy()), None
        if outtype == "q8_0" and array.ndim == 2:
            try:
                kind = gguf.GGMLQuantizationType.Q8_0
                array = gguf.quants.quantize(array, kind)
            except gguf.QuantError:  # rows that are not whole blocks of 32
                kind = None
                array = array.astype(np.float16)
        elif outtype == "f16" and array.ndim == 2:
            array = array.astype(np.float16)
        writer.add_tensor(gguf_name(key), array, raw_dtype=kind)
        written.append(gguf_name(key))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out_path)
    return {"path": str(out_path), "tensors": len(written), "vocab": len(tokens), "pre_tokenizer": pre,
            "bytes": out_path.stat().st_size}


# Ollama's template language is Go's text/template; this is our ChatML template in it (system, user,
# assistant and tool turns; the assistant turn left open for the answer).
OLLAMA_TEMPLATE = """{{- range $i, $m := .Messages }}
{{- if eq $m.Role "tool" }}<|im_start|>user
<tool_response>
{{ $m.Content }}
</tool_response><|im_end|>
{{ else }}<|im_start|>{{ $m.Role }}
{{ $m.Content }}<|im_end|>
{{ end }}
{{- end }}<|im_start|>assistant
"""


def write_modelfile(gguf_path: str | Path, temperature: float = 0.7, top_p: float = 0.9,
                    context_length: int | None = None) -> Path:
    """An Ollama Modelfile beside the GGUF file: `ollama create NAME -f Modelfile`."""
    gguf_path = Path(gguf_path)
    lines = [f"FROM ./{gguf_path.name}", "", f'TEMPLATE """{OLLAMA_TEMPLATE}"""', "",
             'PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|endoftext|>"',
             f"PARAMETER temperature {temperature}", f"PARAMETER top_p {top_p}"]
    if context_length:
        lines.append(f"PARAMETER num_ctx {context_length}")
    path = gguf_path.parent / "Modelfile"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
