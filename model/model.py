"""danlu's decoder: a LLaMA-style transformer, written out in one file.

    tokens -> embed_tokens -> N x DecoderLayer -> norm -> lm_head -> logits
    DecoderLayer: x + Attention(RMSNorm(x)), then x + MLP(RMSNorm(x))   (MoE configs: MoE in place of MLP)

Names follow transformers' modeling_llama.py, so a checkpoint saved here loads as a
`LlamaForCausalLM` and vice versa; a mixture-of-experts model (model/config.py's MoEConfig) is
saved under the names of Mixtral's checkpoints and loads as a `MixtralForCausalLM`. What comes
from transformers is the config class, the save/load machinery of PreTrainedModel, and the
output dataclass; the model is ours.
Generation (KV cache, sampling, streaming, batches) is in generation.py; `LM.generate` calls it.
"""

import math
import os
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

from dataset.chat import IGNORE_INDEX

from . import generation
from .config import LMConfig, MoEConfig, is_moe
from .generation import KVCache

# transformers 5 renamed the output's `past_key_values` to `cache` (the old name warns "deprecated" on every use).
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def compute_dtype(device: torch.device, default: torch.dtype) -> torch.dtype:
    """The dtype matmuls run in: autocast's where it is on, else `default` (the tensors' own)."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else default


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): rescale, no mean subtraction, no bias."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed in fp32; returned in the matmul dtype, so under autocast the (fp32) residual stream is cast
        # once here rather than once by each projection that reads it.
        dtype = compute_dtype(x.device, x.dtype)
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.weight * x).to(dtype)


# ---------------------------------------------------------------------------------------------
# Rotary position embedding (RoPE, Su et al. 2021). Each pair of channels (i, i + d/2) of a query
# or key is rotated by the angle position * inv_freq[i]. The dot product of a rotated query and
# a rotated key then depends only on their distance, so attention sees relative positions.
# ---------------------------------------------------------------------------------------------


def rope_inv_freq(config: LMConfig) -> tuple[torch.Tensor, float]:
    """Per-pair rotation speeds, and the factor YaRN applies to cos/sin (1.0 without YaRN)."""
    rope = config.rope_parameters
    base, dim = rope["rope_theta"], config.head_dim
    pair = torch.arange(0, dim, 2, dtype=torch.float) / dim
    inv_freq = 1.0 / base**pair  # fast pairs first, slowest last
    rope_type = rope.get("rope_type", "default")
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":  # position interpolation: every pair slowed by `factor`
        return inv_freq / rope["factor"], 1.0
    if rope_type != "yarn":
        raise ValueError(f"rope_type {rope_type!r} is not supported (default, linear, yarn)")

    # YaRN (Peng et al. 2023) extends the context `factor` times. Pairs that turn many times
    # within the trained length (high frequency, local detail) are left alone; pairs that turn
    # less than once are interpolated (slowed by `factor`) so long positions look familiar; a
    # linear ramp blends the pairs in between. Logits get sharper by 0.1*ln(factor)+1.
    factor, trained_len = rope["factor"], rope["original_max_position_embeddings"]
    beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

    def pair_index(turns: float) -> float:  # the pair that makes `turns` rotations over trained_len
        return dim * math.log(trained_len / (turns * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(pair_index(beta_fast)), 0)
    high = min(math.ceil(pair_index(beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float) - low) / max(high - low, 1e-3)).clamp(0, 1)
    inv_freq = inv_freq * (1 - ramp) + (inv_freq / factor) * ramp
    attention_factor = rope.get("attention_factor") or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = config
        inv_freq, self.attention_scaling = rope_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of shape (batch or 1, seq, head_dim) for the given positions."""
        angles = position_ids[..., None].float() * self.inv_freq.to(x.device)
        angles = torch.cat((angles, angles), dim=-1)  # channel i and i + d/2 share an angle
        return (angles.cos() * self.attention_scaling).to(x.dtype), (angles.sin() * self.attention_scaling).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate each channel pair (x1, x2) to (x1 cos - x2 sin, x2 cos + x1 sin)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class Attention(nn.Module):
    """Grouped-query attention (Ainslie et al. 2023): `num_key_value_heads` key/value heads are
    each shared by num_attention_heads / num_key_value_heads query heads, shrinking the KV cache
    by that ratio. Equal counts is plain multi-head attention."""

    def __init__(self, config: LMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, x, cos, sin, attn_mask=None, kv_cache: KVCache | None = None) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        if seq == 1:
            # Decoding one token: the query heads that share a KV head see the same keys under the same
            # mask, so they can stand as that KV head's rows of queries: one small attention per KV head,
            # no repeated keys (about 3x faster than enable_gqa on CPU in bf16).
            group = self.num_heads // self.num_kv_heads
            y = F.scaled_dot_product_attention(q.reshape(batch, self.num_kv_heads, group, self.head_dim), k, v,
                                               attn_mask=attn_mask)
            return self.o_proj(y.reshape(batch, 1, -1))
        # No mask: causal over a fresh sequence (training, prefill).
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                           enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(y.transpose(1, 2).reshape(batch, seq, -1))


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ---------------------------------------------------------------------------------------------
# Mixture of experts (Shazeer et al. 2017; as Mixtral, Jiang et al. 2024, uses it). A layer holds E
# SwiGLU experts; a router scores all of them for each token, the token goes through its k best,
# and their outputs are summed, weighted by the router's softmax renormalised over those k. Each
# token pays for k experts while the layer holds E: more parameters for the same compute.
# ---------------------------------------------------------------------------------------------


class Expert(nn.Module):
    """One SwiGLU expert under Mixtral's names: w2(silu(w1(x)) * w3(x)) (w1 gate, w3 up, w2 down)."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """Top-k routing over `num_local_experts` experts; `gate` is the router (Mixtral's name).

    The experts run as batched work: the (token, expert) pairs are sorted by expert, so each expert multiplies
    the one contiguous block of rows routed to it (one matmul per projection per expert, no loop over tokens),
    and the weighted results are added back to their tokens. In training every expert runs, on zero rows if none
    chose it, so every parameter takes part in each step (DDP needs that); without gradients (generation) those
    are skipped. The router's logits of the last call stay in `router_logits` for the load-balancing loss
    (load_balancing_loss)."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.experts = nn.ModuleList(Expert(config) for _ in range(config.num_local_experts))
        self.router_logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (tokens, hidden)
        self.router_logits = self.gate(x)  # (tokens, experts)
        probs = F.softmax(self.router_logits.float(), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (tokens, k): each token's k best experts
        weights = weights / weights.sum(dim=-1, keepdim=True)

        # Sorted by expert, the pairs routed to expert e are one block of rows; bincount sizes the blocks (the one
        # host sync). pair // k is the token a pair came from.
        order = chosen.flatten().argsort(stable=True)
        rows_per_expert = torch.bincount(chosen.flatten(), minlength=len(self.experts)).tolist()
        token = order // self.top_k
        blocks = x[token].split(rows_per_expert)
        y = torch.cat([expert(block) for expert, block in zip(self.experts, blocks)
                       if len(block) or torch.is_grad_enabled()])
        y = y * weights.flatten()[order, None].to(y.dtype)
        return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype)).reshape(shape)


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int,
                        token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The Switch Transformer's load-balancing loss (Fedus et al. 2021) as Mixtral computes it, over every layer's
    routing at once: E * sum_e f_e * P_e, with f_e the share of routings (token, slot) that went to expert e (the
    f_e sum to k) and P_e the mean router probability of e. It is k when every expert gets the same share, and grows
    as a few experts take most tokens; only P_e carries a gradient. Tokens where `token_mask` is 0 do not count."""
    logits = torch.cat(router_logits)  # (layers * tokens, experts)
    num_experts = logits.shape[-1]
    probs = F.softmax(logits.float(), dim=-1)
    routed = F.one_hot(probs.topk(top_k, dim=-1).indices, num_experts).sum(dim=1).float()  # 0/1 per expert
    weight = torch.ones_like(probs[:, 0]) if token_mask is None else \
        token_mask.flatten().float().repeat(len(router_logits))
    total = weight.sum().clamp(min=1)
    share_routed = (routed * weight[:, None]).sum(dim=0) / total
    mean_prob = (probs * weight[:, None]).sum(dim=0) / total
    return num_experts * (share_routed * mean_prob).sum()


class DecoderLayer(nn.Module):
    def __init__(self, config: LMConfig | MoEConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.moe = is_moe(config)
        if self.moe:
            self.block_sparse_moe = MoE(config)  # the name Mixtral's checkpoints give it
        else:
            self.mlp = MLP(config)

    def forward(self, x, cos, sin, attn_mask=None, kv_cache=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, kv_cache)
        h = self.post_attention_layernorm(x)
        return x + (self.block_sparse_moe(h) if self.moe else self.mlp(h))


class Decoder(nn.Module):
    """The transformer body, `LM.model` (transformers' LlamaModel): embeddings to final norm."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, input_ids, position_ids, attn_mask=None, kv_cache=None) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(x, position_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, attn_mask, kv_cache)
        return self.norm(x)


def visibility_mask(segment_ids: torch.Tensor, seq: int, past: int) -> torch.Tensor:
    """Boolean (batch, 1, seq, past + seq) mask: key j is visible to query i when it is not in the
    future and belongs to the same sequence. `segment_ids` (batch, past + seq) numbers the sequences
    of a packed row 1, 2, 3, ... with 0 on padding; transformers' 0/1 attention_mask is the case of
    one sequence per row. A query always sees itself, so rows of padding are never fully masked
    (softmax would give NaN); their outputs are ignored anyway."""
    total = past + seq
    segments = segment_ids[:, :total]
    query_pos = torch.arange(past, total, device=segment_ids.device)[:, None]
    key_pos = torch.arange(total, device=segment_ids.device)[None, :]
    same_sequence = (segments[:, None, :] == segments[:, past:, None]) & (segments[:, None, :] > 0)
    visible = (key_pos <= query_pos)[None] & same_sequence
    visible |= key_pos == query_pos
    return visible[:, None]


class LM(PreTrainedModel):
    """The causal language model: `LM(config)` or `LM.from_pretrained(dir)`.

    With a MoEConfig every forward pass also computes the load-balancing loss of its routing: returned as
    `aux_loss` and kept in `last_aux_loss`, where the trainer finds it (trainer/step.py adds
    `router_aux_loss_coef * last_aux_loss` to whatever loss a stage computes from the logits)."""

    config_class = LMConfig
    base_model_prefix = "model"
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True

    def __init__(self, config: LMConfig):
        super().__init__(config)
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.generation_config = generation.default_generation_config(config)
        self.moe = is_moe(config)
        self.last_aux_loss: torch.Tensor | None = None
        self.post_init()

    @classmethod
    def can_generate(cls) -> bool:
        return True  # generate() is our own; this makes save_pretrained write generation_config.json

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *args, **kwargs) -> "LM":
        if "config" not in kwargs and MoEConfig.get_config_dict(path)[0].get("model_type") == MoEConfig.model_type:
            kwargs["config"] = MoEConfig.from_pretrained(path)  # a mixture of experts: a Mixtral checkpoint
        model = super().from_pretrained(path, *args, **kwargs)
        if os.path.isfile(os.path.join(path, "generation_config.json")):
            model.generation_config = GenerationConfig.from_pretrained(path)
        return model

    def save_pretrained(self, save_directory: str | os.PathLike, is_main_process: bool = True, **kwargs) -> None:
        """transformers' save_pretrained, naming the architecture LlamaForCausalLM (MoE: MixtralForCausalLM) in
        config.json: transformers writes the saving class's name ("LM"), and vLLM and llama.cpp's converter dispatch
        on that name."""
        super().save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)
        self.config.architectures = ["MixtralForCausalLM" if self.moe else "LlamaForCausalLM"]
        if is_main_process:
            self.config.save_pretrained(save_directory)

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2 style: N(0, 0.02); projections that write into the residual stream (o_proj,
        down_proj, an expert's w2) scaled by 1/sqrt(2 * layers) so the stream's variance does not grow with depth."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, RotaryEmbedding):
            module.inv_freq.copy_(rope_inv_freq(self.config)[0])
        if isinstance(module, (Attention, MLP, Expert)):
            out = {Attention: module.o_proj, MLP: module.down_proj, Expert: module.w2}[type(module)]
            nn.init.normal_(out.weight, mean=0.0, std=std / math.sqrt(2 * self.config.num_hidden_layers))

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor,
        labels: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        segment_ids: torch.LongTensor | None = None,
        logits_at: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """As LlamaForCausalLM: `labels` are the input ids (shifted inside; -100 ignored).
        attention_mask (batch, past + seq) marks real tokens with 1 and padding with 0. For packed
        rows pass segment_ids instead (1, 2, ... per sequence, 0 on padding; see visibility_mask)
        with position_ids restarting at 0 in each sequence. logits_at, a (batch, seq) bool mask, runs the
        output layer only where it is True and returns those logits as (N, vocab), in row order: a loss that
        scores a few positions of each row (answers, responses) skips most of the output layer's work."""
        if logits_at is not None and (labels is not None or logits_to_keep):
            raise ValueError("logits_at selects the positions itself: pass neither labels nor logits_to_keep with it")
        batch, seq = input_ids.shape
        if use_cache and past_key_values is None:
            past_key_values = KVCache(self.config, batch, seq, input_ids.device, self.dtype)
        past = past_key_values.seq_len if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + seq, device=input_ids.device)[None]
        segments = segment_ids if segment_ids is not None else attention_mask
        attn_mask = None
        if segments is not None and not bool((segments == 1).all()):
            attn_mask = visibility_mask(segments, seq, past)
        elif past and seq > 1:  # a chunk after cached positions: causal, offset by `past`
            attn_mask = visibility_mask(torch.ones(batch, past + seq, device=input_ids.device), seq, past)

        hidden = self.model(input_ids, position_ids, attn_mask, past_key_values)
        if past_key_values is not None:
            past_key_values.seq_len += seq
        if logits_at is not None:
            hidden = hidden[logits_at]
        elif logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)

        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=IGNORE_INDEX)
        if not self.moe:
            return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: past_key_values})
        # As MixtralForCausalLM: `loss` is the cross-entropy alone, `aux_loss` the load-balancing loss (padding left
        # out), `router_logits` each layer's (batch * seq, experts).
        router_logits = [layer.block_sparse_moe.router_logits for layer in self.model.layers]
        real = segments[:, -seq:] != 0 if segments is not None else None
        self.last_aux_loss = load_balancing_loss(router_logits, self.config.num_experts_per_tok, real)
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=self.last_aux_loss, logits=logits,
                                         router_logits=tuple(router_logits), **{CACHE_FIELD: past_key_values})

    # Generation lives in generation.py (KV cache, sampling, batches); these keep transformers' call shape.
    def stream(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
               **kwargs) -> Iterator[torch.LongTensor]:
        """Yield each step's next token of every row, (batch,): `generation.stream` on this model."""
        return generation.stream(self, input_ids, attention_mask, **kwargs)

    def generate(self, input_ids: torch.LongTensor, streamer: Callable | object | None = None,
                 **kwargs) -> torch.LongTensor:
        """Prompt + new tokens, as transformers' generate() returns: `generation.generate` on this model."""
        return generation.generate(self, input_ids, streamer, **kwargs)
