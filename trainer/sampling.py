"""Text generated from a fixed prompt during and after training: watching it improve is the point."""

from collections.abc import Callable

import torch


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    """Token ids of `prompt`: raw text for a base model, a ChatML user turn for a chat model."""
    if chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def make_sample_fn(tokenizer, prompt: str, chat: bool, max_new_tokens: int, autocast=None,
                   seed: int = 0) -> Callable:
    """A function model -> sample text. Sampling is seeded, so samples differ only as the model does."""
    ids = encode_prompt(tokenizer, prompt, chat)

    def sample(model) -> str:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        generator = torch.Generator(device=device).manual_seed(seed)
        with autocast() if autocast else torch.autocast("cpu", enabled=False):
            out = model.generate(torch.tensor([ids], device=device), max_new_tokens=max_new_tokens, do_sample=True,
                                 temperature=0.7, top_p=0.9, repetition_penalty=1.1, generator=generator)
        model.train(was_training)
        return prompt + " → " + tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)

    return sample
