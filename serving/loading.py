"""Load a checkpoint directory for inference: the model (a LoRA adapter merged in memory, or several stacked
unmerged), its tokenizer, and whether it is a chat model or a base model that continues raw text."""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from dataset.chat import load_tokenizer
from model import LM
from model.lora import ADAPTER_CONFIG, AdapterRows, StackedAdapter, load_lora, merge_lora


class LoadError(ValueError):
    """A model or adapter directory that cannot be used, with what to do about it."""


@dataclass
class Loaded:
    model: LM
    tokenizer: PreTrainedTokenizerFast
    is_chat: bool
    name: str  # what /v1/models calls it: the directory name, or base+adapter
    context_length: int
    stop_token_ids: list[int]


def is_chat_model(directory: Path) -> bool:
    """False for a base model: the trainer's args.json names the stage (as eval_model.py decides); without
    one, a directory named pretrain*/base* is a base model and anything else with a chat template is a chat model."""
    args_file = directory / "args.json"
    if args_file.is_file():
        stage = json.loads(args_file.read_text(encoding="utf-8")).get("stage")
        if stage:
            return stage != "pretrain"
    return not directory.name.startswith(("pretrain", "base"))


def adapter_directory(directory: str | Path) -> Path:
    """`directory` as a Path, once it is seen to hold a LoRA adapter (its adapter_config.json)."""
    directory = Path(directory)
    if not (directory / ADAPTER_CONFIG).is_file():
        raise LoadError(f"{directory} is not a LoRA adapter directory: no {ADAPTER_CONFIG}")
    return directory


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load(model_dir: str | Path, lora_dir: str | Path | None = None, device: str = "auto",
         chat: bool | None = None) -> Loaded:
    """Load `model_dir` (a danlu/transformers Llama directory) for inference, `lora_dir`'s adapter merged in.

    Weights stay fp32 on a CPU and become bf16 on a GPU that supports it. `chat` overrides the chat/base decision.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        hint = " (that is a LoRA adapter: pass it as --lora and its base as --model)" \
            if (model_dir / ADAPTER_CONFIG).is_file() else ""
        raise LoadError(f"{model_dir} is not a checkpoint directory: no config.json{hint}")
    dev = pick_device(device)
    hf_logging.disable_progress_bar()
    model = LM.from_pretrained(model_dir)
    tokenizer_dir = model_dir
    name = model_dir.resolve().name
    if lora_dir is not None:
        lora_dir = adapter_directory(lora_dir)
        merge_lora(load_lora(model, lora_dir))
        if (lora_dir / "tokenizer.json").is_file():
            tokenizer_dir = lora_dir
        name = f"{name}+{lora_dir.resolve().name}"
    if dev.type == "cuda" and torch.cuda.is_bf16_supported():
        model = model.to(torch.bfloat16)
    model = model.to(dev).eval()
    model.requires_grad_(False)
    tokenizer = load_tokenizer(tokenizer_dir)
    config = model.config
    stops = model.generation_config.eos_token_id
    stops = [stops] if isinstance(stops, int) else list(stops or [config.eos_token_id])
    for token in ("<|im_end|>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id not in stops:
            stops.append(token_id)
    return Loaded(model, tokenizer, is_chat_model(model_dir) if chat is None else chat, name,
                  int(config.max_position_embeddings), stops)


def read_adapter_for(loaded: Loaded, rows: AdapterRows, name: str, directory: str | Path) -> StackedAdapter:
    """The LoRA adapter in `directory`, checked against `loaded` (its layers' keys and shapes, its tokenizer) and
    read for `rows.add`; LoadError says what does not fit."""
    directory = adapter_directory(directory)
    if (directory / "tokenizer.json").is_file():
        try:
            vocab = load_tokenizer(directory).get_vocab()
        except Exception as exc:  # the tokenizers library's errors have no common class
            raise LoadError(f"{directory / 'tokenizer.json'}: cannot be read: {exc}") from exc
        if vocab != loaded.tokenizer.get_vocab():
            raise LoadError(f"{directory}: its tokenizer is not its base model's ({loaded.name}); "
                            "an adapter is served with its base model's tokenizer")
    try:
        return rows.read(name, directory)
    except (KeyError, ValueError, OSError, SafetensorError) as exc:  # keys or shapes that do not fit, a bad file
        raise LoadError(exc.args[0] if isinstance(exc, KeyError) else str(exc)) from exc


def attach_adapters(loaded: Loaded, adapters: dict[str, str | Path]) -> AdapterRows:
    """Stack the LoRA adapters {name: directory} on `loaded.model`, unmerged (serving them next to their base, one
    batch mixing them; none yet, for a server that loads them later); returns the AdapterRows an Engine picks each
    row's adapter with, whose ids are 1, 2, ... in the order given."""
    rows = AdapterRows(loaded.model)
    for name, directory in adapters.items():
        rows.add(read_adapter_for(loaded, rows, name, directory))
    return rows
