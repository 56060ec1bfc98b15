"""LMConfig: transformers' LlamaConfig plus danlu's named model sizes; MoEConfig: the same as a MixtralConfig.

Subclassing LlamaConfig keeps `"model_type": "llama"` in every config.json we write, so each
checkpoint loads in `transformers.AutoModelForCausalLM` with no conversion. A mixture-of-experts model's config is
a MixtralConfig (`"model_type": "mixtral"`): Mixtral is a Llama whose MLPs are mixtures of SwiGLU experts, routed
exactly as model/model.py's MoE routes them, so those checkpoints load as `MixtralForCausalLM`.
"""

from typing import Any

from transformers import LlamaConfig, MixtralConfig

# Special-token ids fixed by the tokenizer (as in MiniMind's): 0 <|endoftext|>, 1 <|im_start|>, 2 <|im_end|>.
from dataset.tokenizer import BOS_ID, EOS_ID, PAD_ID

PRESETS: dict[str, dict[str, Any]] = {
    # For tests: a few hundred thousand parameters, most of them the embedding.
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=192, max_position_embeddings=512),
    # The demo's model until its shape sweep; earlier figures in the docs name it (docs/performance.md).
    "mini": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
                 intermediate_size=512, max_position_embeddings=1024),
    # The demo model: wider and shallower than mini at about its work per token (1.05x). In the demo's 1.5M
    # pretraining tokens width buys more than depth: news perplexity 372 against mini's 454 (docs/demo_experiments.md).
    # 7 query heads share one key/value head (head_dim 32).
    "demo": dict(hidden_size=224, num_hidden_layers=3, num_attention_heads=7, num_key_value_heads=1,
                 intermediate_size=608, max_position_embeddings=1024),
    # MiniMind-small: 26M parameters.
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=1408, max_position_embeddings=32768),
    # Deep and narrow, as MobileLLM argues for at this scale.
    "base": dict(hidden_size=768, num_hidden_layers=16, num_attention_heads=12, num_key_value_heads=4,
                 intermediate_size=2048, max_position_embeddings=32768),
}

DEFAULTS: dict[str, Any] = dict(
    vocab_size=6400,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    tie_word_embeddings=True,
    pad_token_id=PAD_ID,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    initializer_range=0.02,
)


class Presets:
    """`from_preset`, shared by both config classes."""

    @classmethod
    def from_preset(cls, name: str, **overrides: Any):
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        fields = {**DEFAULTS, **PRESETS[name]}
        rope_theta = overrides.pop("rope_theta", None)
        fields.update({k: v for k, v in overrides.items() if v is not None})
        fields["rope_parameters"] = dict(fields["rope_parameters"])
        if rope_theta is not None:
            fields["rope_parameters"]["rope_theta"] = float(rope_theta)
        return cls(**fields)


class LMConfig(Presets, LlamaConfig):
    """A LlamaConfig; `LMConfig.from_preset("mini", num_hidden_layers=4)` builds a named size."""


class MoEConfig(Presets, MixtralConfig):
    """A MixtralConfig: every layer's MLP is `num_local_experts` SwiGLU experts of width `intermediate_size`, of
    which each token uses `num_experts_per_tok`; `router_aux_loss_coef` weighs the load-balancing loss.

    `MoEConfig.from_preset("mini", num_local_experts=8, num_experts_per_tok=2, intermediate_size=256)` is `mini` with
    8 experts of half its MLP's width, two per token: the same active parameters per token as `mini`.
    """

    # Mixtral's projections have no biases (LlamaConfig's fields, which model.py reads, fixed here).
    attention_bias = False
    mlp_bias = False

    def __post_init__(self, **kwargs):
        if self.head_dim is None:  # MixtralConfig leaves it unset; model.py and Mixtral both read hidden / heads
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)


def is_moe(config) -> bool:
    """Whether a config (ours or transformers') describes a mixture-of-experts model."""
    return getattr(config, "model_type", None) == "mixtral"


def yarn(factor: float, original_max_position_embeddings: int, rope_theta: float = 1e6) -> dict[str, Any]:
    """rope_parameters for YaRN context extension by `factor` beyond the trained length."""
    return {"rope_type": "yarn", "rope_theta": rope_theta, "factor": float(factor),
            "original_max_position_embeddings": int(original_max_position_embeddings),
            "beta_fast": 32.0, "beta_slow": 1.0}
