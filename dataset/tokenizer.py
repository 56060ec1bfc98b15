"""The tokenizer: its special tokens and their ids, byte-level BPE training, and loading and saving a tokenizer
directory.

Byte-level means every string, in any script, with any emoji or whitespace, encodes and decodes back
exactly: the base alphabet is the 256 bytes, and BPE merges frequent byte sequences into tokens. The
first 32 ids are a fixed block of special tokens that the chat template (dataset/chat.py), the model's
config (model/config.py) and the later stages rely on. MiniMind's tokenizer has the same first three.

No torch here: training a tokenizer and preparing token bins run without it.
"""

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from dataset.io import atomic_write_json

# ChatML's markers; <|endoftext|> also separates documents in pretraining token bins.
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# Markup the model writes and reads as text: single tokens that BPE never splits or merges, but not
# "special", so decode(..., skip_special_tokens=True) keeps them (as MiniMind does).
MARKUP_TOKENS = [
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
]
SPECIAL_BLOCK_SIZE = 32
RESERVED_TOKENS = [f"<|reserved_{i}|>" for i in range(SPECIAL_BLOCK_SIZE - 3 - len(MARKUP_TOKENS))]
# Ids 0..31 in this order: <|endoftext|> = 0 (pad, unk), <|im_start|> = 1 (bos), <|im_end|> = 2 (eos).
SPECIAL_BLOCK = [ENDOFTEXT, IM_START, IM_END, *MARKUP_TOKENS, *RESERVED_TOKENS]
PAD_ID, BOS_ID, EOS_ID = (SPECIAL_BLOCK.index(token) for token in (ENDOFTEXT, IM_START, IM_END))
MODEL_MAX_LENGTH = 32768


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on texts; returns it wrapped for transformers, with the chat template."""
    from dataset.chat import CHAT_TEMPLATE  # here, not at the top: dataset.chat imports this module's tokens

    tokenizer = Tokenizer(models.BPE())
    # Every digit a piece of its own, then GPT-2's split (SmolLM's pre-tokenizer, llama.cpp's "starcoder"): "128" is
    # always 1, 2, 8, so a sum is learnt digit by digit rather than as a table of whichever whole numbers BPE happened
    # to merge ("24" one token, "108" as "10" + "8"). docs/demo_experiments.md measures what it did to arithmetic.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_BLOCK,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in MARKUP_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=IM_START,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )


def round_trip_failures(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> tuple[list[str], int]:
    """Texts for which decode(encode(text)) != text, and the total token count of all texts."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    decoded = tokenizer.batch_decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return [text for text, back in zip(texts, decoded) if text != back], sum(map(len, ids))


def load_tokenizer(tokenizer_dir: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer directory (ours, MiniMind's, any Hugging Face fast tokenizer), chat template as saved."""
    path = Path(tokenizer_dir)
    if not (path / "tokenizer.json").is_file():
        what = "does not exist" if not path.exists() else "has no tokenizer.json"
        raise FileNotFoundError(
            f"tokenizer directory {path} {what}; train one with `python train_tokenizer.py --out_dir {path}` "
            "or pass --tokenizer_dir pointing at a directory with tokenizer.json"
        )
    from transformers import AutoTokenizer  # here, not at the top: importing it imports torch

    return AutoTokenizer.from_pretrained(str(path))


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> None:
    """Save the tokenizer so that both transformers 4 and 5 (and tools that read tokenizer_config.json) load it.

    transformers 5 writes the chat template to chat_template.jinja and no special_tokens_map.json; we put
    the template back into tokenizer_config.json, as MiniMind, Qwen and older readers expect.
    """
    out = Path(out_dir)
    tokenizer.save_pretrained(str(out))
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=False, add_eos_token=False)
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
        (out / "chat_template.jinja").unlink(missing_ok=True)
    atomic_write_json(config_path, config)
    special = {name: getattr(tokenizer, name) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    atomic_write_json(out / "special_tokens_map.json", {k: v for k, v in special.items() if v is not None})
