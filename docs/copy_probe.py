"""Does a model copy? The loss on a span's second occurrence against its first, for news spans and random tokens.

    python -m docs.copy_probe out/pretrain out/sft

A model with induction heads (Olsson et al. 2022) predicts a repeated span from its first occurrence: the loss on
the repeat falls far below the first (to well under 1 nat on random tokens). One that does not copy scores both
alike. docs/demo_experiments.md ("Copying") has the demo's figures.
"""

import json
import random
import statistics
import sys

import torch
import torch.nn.functional as F

import eval_model

SPAN = 60  # tokens per span: a news span, then the same span again
SPANS = 40


def repeat_losses(model, sequence: list[int]) -> tuple[float, float]:
    """Mean next-token loss (nats) over the first occurrence and over the repeat of `sequence + sequence`."""
    ids = torch.tensor([sequence + sequence])
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].float()
    losses = F.cross_entropy(logits, ids[0, 1:], reduction="none")
    n = len(sequence)
    return losses[: n - 1].mean().item(), losses[n - 1:].mean().item()


def main():
    rng = random.Random(0)
    docs = [json.loads(line)["text"] for line in open("dataset/demo/pretrain_val.jsonl", encoding="utf-8")]
    for path in sys.argv[1:]:
        model, tokenizer = eval_model.load_model(eval_model.model_spec(path, path), torch.device("cpu"))
        model.eval()
        spans = [ids[:SPAN] for ids in (tokenizer(doc)["input_ids"] for doc in docs) if len(ids) >= SPAN][:SPANS]
        news = [repeat_losses(model, span) for span in spans]
        noise = [repeat_losses(model, [rng.randrange(100, len(tokenizer)) for _ in range(SPAN)]) for _ in spans]
        (news_first, news_repeat), (noise_first, noise_repeat) = (map(statistics.fmean, zip(*pairs))
                                                                  for pairs in (news, noise))
        print(f"{path}: news first {news_first:.2f}, repeat {news_repeat:.2f} | "
              f"random tokens first {noise_first:.2f}, repeat {noise_repeat:.2f} nats")


if __name__ == "__main__":
    main()
