"""Generation: prefill the prompt once, then decode one token per step through a KV cache.

    stream(model, input_ids)          each step's tokens as they come (chat, the server)
    generate(model, input_ids)        prompt + new tokens, as transformers' generate() returns them
    generate_batch(model, prompts)    token-id prompts of any lengths, batched by length, each row stopping
                                      on its own stop token (eval, RL rollouts)

`LM.generate` and `LM.stream` call these. Sampling has transformers' semantics (temperature, top-k, top-p,
CTRL's repetition penalty) plus OpenAI's frequency and presence penalties. This module reads the model only
through its call signature, `config` and `generation_config`, so model.py can import the cache from here.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers import GenerationConfig

from .config import LMConfig

if TYPE_CHECKING:
    from .model import LM


class KVCache:
    """Keys and values of past positions, per layer, so decoding feeds one new token at a time.

    Buffers are allocated once for `capacity` positions and grow (doubling) only if exceeded.
    """

    def __init__(self, config: LMConfig, batch_size: int, capacity: int, device, dtype):
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, capacity, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.seq_len = 0  # positions already stored (advanced by LM.forward after all layers)

    def get_seq_length(self) -> int:
        return self.seq_len

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.seq_len, self.seq_len + k.shape[2]
        if end > self.keys.shape[3]:
            self._grow(end)
        self.keys[layer_idx, :, :, start:end] = k
        self.values[layer_idx, :, :, start:end] = v
        return self.keys[layer_idx, :, :, :end], self.values[layer_idx, :, :, :end]

    def _grow(self, needed: int) -> None:
        extra = max(needed, 2 * self.keys.shape[3]) - self.keys.shape[3]
        pad = (0, 0, 0, extra)
        self.keys, self.values = F.pad(self.keys, pad), F.pad(self.values, pad)


def default_generation_config(config: LMConfig) -> GenerationConfig:
    """What generation_config.json says: stop at <|im_end|> or <|endoftext|>, sample gently."""
    return GenerationConfig(eos_token_id=token_ids([config.eos_token_id, config.pad_token_id]) or None,
                            pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id, do_sample=True,
                            temperature=0.7, top_p=0.9, max_new_tokens=256)


def token_ids(ids: int | list[int | None] | None) -> list[int]:
    """One id, a list of ids or None (configs hold all three) as a list of ids: a config built without a
    tokenizer has no pad id, and a missing id must mean "no such token", not a crash."""
    if ids is None or isinstance(ids, int):
        ids = [ids]
    return [int(i) for i in ids if i is not None]


# ---------------------------------------------------------------------------------------------
# Choosing the next token
# ---------------------------------------------------------------------------------------------


MIN_TEMPERATURE = 1e-5  # a lower temperature decodes greedily (logits / 1e-50 overflow float32 to inf, then NaN)


def per_row(value: float | list[float] | torch.Tensor, logits: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """A sampling parameter, one number for the batch or one per row, as a (batch, 1) column."""
    return torch.as_tensor(value, dtype=dtype, device=logits.device).reshape(-1, 1).expand(logits.shape[0], 1)


def apply_penalties(logits: torch.Tensor, seen: torch.Tensor, counts: torch.Tensor, repetition_penalty=1.0,
                    frequency_penalty=0.0, presence_penalty=0.0) -> torch.Tensor:
    """Make tokens already used less likely in logits (batch, vocab): the repetition penalty over `seen` (batch,
    vocab; True for a token of the prompt or the output, as transformers), the frequency and presence penalties over
    `counts` (batch, vocab; how often the output has each token, as OpenAI's API). Each penalty is one number or
    one per row."""
    repetition_penalty = per_row(repetition_penalty, logits)
    if (repetition_penalty != 1.0).any():  # CTRL (Keskar et al. 2019): shrink a positive logit, grow a negative one
        shifted = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, shifted, logits)
    frequency_penalty, presence_penalty = per_row(frequency_penalty, logits), per_row(presence_penalty, logits)
    if frequency_penalty.any() or presence_penalty.any():  # a cost per earlier use, and a one-off cost for any use
        logits = logits - frequency_penalty * counts - presence_penalty * (counts > 0).to(logits.dtype)
    return logits


Generators = torch.Generator | list[torch.Generator | None] | None  # one for the batch, or one per row


def sample_next_token(logits: torch.Tensor, *, do_sample: bool = False, temperature=1.0, top_k=0, top_p=1.0,
                      generator: Generators = None) -> torch.LongTensor:
    """Pick the next token per row from logits (batch, vocab), with transformers' semantics. temperature, top_k and
    top_p are one number or one per row (the server batches requests that each have their own); a row whose
    temperature is below MIN_TEMPERATURE, 0 included, decodes greedily. `generator` may be one generator per row:
    consecutive rows that share one draw together, as that generator alone would draw for them (so a group of rows
    sampled in a larger batch gets what it gets alone)."""
    greedy = logits.argmax(dim=-1)
    temperature = per_row(temperature, logits)
    hot = temperature[:, 0] >= MIN_TEMPERATURE
    if not do_sample or not hot.any():
        return greedy
    logits = logits / torch.where(hot[:, None], temperature, 1.0)
    top_k = per_row(top_k, logits, torch.long)
    cut = (top_k > 0) & (top_k < logits.shape[-1])
    if cut.any():  # keep the top_k most likely tokens
        top_k = torch.where(cut, top_k, 1)
        kth = torch.topk(logits, int(top_k.max())).values.gather(1, top_k - 1)
        logits = logits.masked_fill(cut & (logits < kth), float("-inf"))
    top_p = per_row(top_p, logits)
    if (top_p < 1.0).any():  # nucleus (Holtzman et al. 2019): the fewest tokens whose probability reaches top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = (probs.cumsum(-1) - probs >= top_p) & (top_p < 1.0)  # the mass before this token is already enough
        drop[:, 0] = False  # the most likely token always stays (top_p 0 would otherwise leave none)
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    if not isinstance(generator, list):
        return torch.where(hot, torch.multinomial(probs, 1, generator=generator).squeeze(1), greedy)
    tokens, start = [], 0
    for end in range(1, len(generator) + 1):
        if end == len(generator) or generator[end] is not generator[start]:
            tokens.append(torch.multinomial(probs[start:end], 1, generator=generator[start]))
            start = end
    return torch.where(hot, torch.cat(tokens).squeeze(1), greedy)


# ---------------------------------------------------------------------------------------------
# Prefill and decode. no_grad, not inference_mode: under autocast PyTorch casts each fp32 weight
# to bf16 once and caches it until the autocast region ends, but not in inference mode, where
# every decoding step would re-cast every weight (more than half the time of CPU decoding).
# ---------------------------------------------------------------------------------------------


@torch.inference_mode(False)
@torch.no_grad()
def stream(
    model: "LM",
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generator: Generators = None,
) -> Iterator[torch.LongTensor]:
    """Yield the next token of every row, (batch,), until each row has produced an eos or max_new_tokens is
    reached; rows that finished yield pad. Prompts of different lengths are left-padded and passed with their
    attention_mask. eos_token_id None means the generation_config's; [] means none."""
    eos = token_ids(model.generation_config.eos_token_id if eos_token_id is None else eos_token_id)
    # As transformers: with no pad id anywhere, finished rows repeat the eos.
    pad = next(i for i in (pad_token_id, model.generation_config.pad_token_id, *eos, 0) if i is not None)
    if max_new_tokens <= 0:
        return
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    eos = torch.tensor(eos, dtype=torch.long, device=device)
    # The cache holds keys and values as attention computes them: in autocast's dtype where autocast is on.
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else model.dtype
    cache = KVCache(model.config, batch, prompt_len + max_new_tokens, device, dtype)
    if attention_mask is not None:  # positions count real tokens only, as transformers does
        attention_mask = attention_mask.long()
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    else:
        position_ids = torch.arange(prompt_len, device=device)[None].expand(batch, -1)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    logits = model(input_ids, attention_mask=attention_mask, position_ids=position_ids, past_key_values=cache,
                   logits_to_keep=1).logits[:, -1]
    # what the penalties read: the tokens of prompt and output (padding too, as transformers), the output's counts
    seen = torch.zeros(logits.shape, dtype=torch.bool, device=device).scatter_(1, input_ids, True)
    counts = torch.zeros(logits.shape, device=device)
    for step in range(max_new_tokens):
        logits = apply_penalties(logits.float(), seen, counts, repetition_penalty, frequency_penalty,
                                 presence_penalty)
        token = sample_next_token(logits, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                  generator=generator)
        token = torch.where(finished, torch.full_like(token, pad), token)
        yield token
        finished |= torch.isin(token, eos)
        if step == max_new_tokens - 1 or bool(finished.all()):
            return  # no forward for a token nobody will read
        seen.scatter_(1, token[:, None], True)
        counts.scatter_add_(1, token[:, None], torch.ones_like(counts[:, :1]))
        position_ids = position_ids[:, -1:] + 1
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
        logits = model(token[:, None], attention_mask=attention_mask, position_ids=position_ids,
                       past_key_values=cache).logits[:, -1]


def generate(model: "LM", input_ids: torch.LongTensor, streamer: Callable | object | None = None,
             **kwargs) -> torch.LongTensor:
    """Prompt + new tokens, (batch, prompt + new), as transformers' generate() returns. Keyword arguments are
    those of `stream`. `streamer` is a transformers streamer (its put/end are called, e.g. TextStreamer) or a
    callable receiving each step's tokens."""
    if hasattr(streamer, "put"):
        streamer.put(input_ids.cpu())
    tokens = []
    for token in stream(model, input_ids, **kwargs):
        tokens.append(token)
        if hasattr(streamer, "put"):
            streamer.put(token.cpu())
        elif streamer is not None:
            streamer(token)
    if hasattr(streamer, "end"):
        streamer.end()
    return torch.cat([input_ids, torch.stack(tokens, dim=1)], dim=1) if tokens else input_ids


# ---------------------------------------------------------------------------------------------
# Many prompts at once
# ---------------------------------------------------------------------------------------------


@dataclass
class Completion:
    """One prompt's result from generate_batch."""

    tokens: list[int]  # the new tokens; the last is the stop token when finish_reason is "stop"
    finish_reason: str  # "stop" (a stop token) or "length" (max_new_tokens reached), as in OpenAI's API
    prompt_tokens: int


def generate_batch(model: "LM", prompts: list[list[int]], max_new_tokens: int, *,
                   stop_token_ids: int | list[int] | None = None, max_batch_rows: int | None = None,
                   max_batch_tokens: int | None = None, **sampling) -> list[Completion]:
    """Complete token-id prompts of any lengths, each row stopping at its own stop token (default: the
    generation_config's eos ids). Prompts run in batches of similar length, each at most max_batch_rows rows
    and max_batch_tokens KV-cache positions (rows x (longest prompt + max_new_tokens)). `sampling` takes the
    sampling arguments of `stream` (do_sample, temperature, ..., generator; a list of generators is one per prompt)."""
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {i} is empty: give every prompt at least one token (e.g. the bos token)")
    stop = token_ids(model.generation_config.eos_token_id if stop_token_ids is None else stop_token_ids)
    results: list[Completion | None] = [None] * len(prompts)
    for rows in length_batches([len(p) + max_new_tokens for p in prompts], max_batch_rows, max_batch_tokens):
        width = max(len(prompts[i]) for i in rows)
        # Left padding repeats the row's first token: padding is masked from attention, and the repetition
        # penalty, which reads ids, then sees only tokens the prompt has (so a row gets what it would alone).
        input_ids = torch.tensor([[prompts[i][0]] * (width - len(prompts[i])) + prompts[i] for i in rows],
                                 device=model.device)
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in rows],
                            device=model.device)
        generator = sampling.get("generator")
        per_row = {"generator": [generator[i] for i in rows]} if isinstance(generator, list) else {}
        steps = list(stream(model, input_ids, mask, max_new_tokens=max_new_tokens, eos_token_id=stop,
                            **{**sampling, **per_row}))
        new = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in rows]
        for i, tokens in zip(rows, new):
            end = next((n for n, token in enumerate(tokens) if token in stop), None)
            reason = "length" if end is None else "stop"
            results[i] = Completion(tokens if end is None else tokens[:end + 1], reason, len(prompts[i]))
    return results


def length_batches(lengths: list[int], max_rows: int | None = None,
                   max_tokens: int | None = None) -> Iterator[list[int]]:
    """Indices in batches of similar length, longest first (so little of a batch is padding), each at most
    max_rows rows and max_tokens padded tokens (rows x the longest length); None means no limit."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batch: list[int] = []
    for i in order:
        if batch and ((max_rows is not None and len(batch) == max_rows)
                      or (max_tokens is not None and (len(batch) + 1) * lengths[batch[0]] > max_tokens)):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch
