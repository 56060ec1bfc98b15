"""The scalar head of reward and value models: the decoder of model.py with one number per position instead of
next-token logits.

    tokens -> Decoder (model.py) -> score: Linear(hidden, 1) -> a scalar per position

A reward model reads the scalar at the last real token of a sequence (one score per answer); PPO's value model (the
critic) reads it at every response position (the expected return from there). The parameters are named as
transformers' `LlamaForSequenceClassification` names them (`model.*`, `score.weight`) and config.json says so, with
num_labels 1 and the pad id set, so `AutoModelForSequenceClassification.from_pretrained(dir)` loads a reward model
we wrote and scores exactly as we do.
"""

import copy
import os

import torch
from torch import nn
from transformers import PreTrainedModel

from .config import LMConfig
from .model import LM, Decoder, visibility_mask


def last_token_index(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Each row's last position whose token is not the pad id [B]: transformers' rule for which token a sequence
    classifier reads (it handles left and right padding alike; a sequence should not end with the pad token)."""
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
    return (positions * (input_ids != pad_token_id)).argmax(-1)


class ScalarModel(PreTrainedModel):
    """Decoder + scalar head: `ScalarModel.from_causal_lm(LM.from_pretrained(sft_dir))` or
    `ScalarModel.from_pretrained(reward_dir)`."""

    config_class = LMConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True
    _init_weights = LM._init_weights  # the same initialisation as the language model (the head: N(0, 0.02))

    def __init__(self, config: LMConfig):
        super().__init__(config)
        if config.pad_token_id is None:
            raise ValueError("a scalar model needs config.pad_token_id: transformers finds the last token by it")
        self.model = Decoder(config)
        self.score = nn.Linear(config.hidden_size, 1, bias=False)
        self.post_init()

    @classmethod
    def from_causal_lm(cls, lm: LM) -> "ScalarModel":
        """A new head on a copy of a language model's decoder (its lm_head is dropped)."""
        config = copy.deepcopy(lm.config)
        config.num_labels = 1
        model = cls(config)
        model.model.load_state_dict(lm.model.state_dict())
        return model.to(lm.device)

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The scalar of every position [B, T], in fp32. Right padding needs no attention_mask (causal attention keeps
        padding out of the real positions); with one, positions are 0, 1, 2, ... as in transformers."""
        batch, seq = input_ids.shape
        position_ids = torch.arange(seq, device=input_ids.device)[None]
        attn_mask = None
        if attention_mask is not None and not bool((attention_mask == 1).all()):
            attn_mask = visibility_mask(attention_mask, seq, 0)
        hidden = self.model(input_ids, position_ids, attn_mask)
        return self.score(hidden).squeeze(-1).float()

    def sequence_scores(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One score per sequence [B]: the scalar at its last non-pad token (what LlamaForSequenceClassification
        returns as logits[:, 0])."""
        values = self(input_ids, attention_mask)
        index = last_token_index(input_ids, self.config.pad_token_id)
        return values[torch.arange(len(values), device=values.device), index]

    def save_pretrained(self, save_directory: str | os.PathLike, is_main_process: bool = True, **kwargs) -> None:
        """transformers' save_pretrained, naming the architecture LlamaForSequenceClassification in config.json."""
        self.config.num_labels = 1
        super().save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)
        self.config.architectures = ["LlamaForSequenceClassification"]
        if is_main_process:
            self.config.save_pretrained(save_directory)
