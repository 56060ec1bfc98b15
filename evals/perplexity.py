"""News perplexity: how well a model predicts held-out People's Daily paragraphs (pretrain_val.jsonl).

Each document is scored on its own, after an <|endoftext|>, predicting every token and the closing
<|endoftext|>; val_ppl = exp(mean token NLL) over all of them.
"""

import torch

from dataset.tokenizer import ENDOFTEXT
from evals.base import LikelihoodTask, ScoredTokens


class NewsPerplexity(LikelihoodTask):
    """val_ppl of the held-out news."""

    name = "news"
    eval_file = "pretrain_val.jsonl"
    record_kind = "pretrain"
    metrics = ("val_ppl",)

    def sequences(self, tokenizer, records: list[dict]) -> list[ScoredTokens]:
        """<|endoftext|> text <|endoftext|>, every token after the first scored."""
        eot = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
        texts = tokenizer([r["text"] for r in records], add_special_tokens=False)["input_ids"]
        return [([eot, *ids, eot], [0] + [1] * (len(ids) + 1)) for ids in texts]

    def score(self, logps: list[tuple[float, int]], records: list[dict]) -> dict[str, float]:
        """val_ppl: exp of the mean negative log-prob over every scored token."""
        total, count = sum(s for s, _ in logps), sum(n for _, n in logps)
        return {"val_ppl": float(torch.tensor(-total / max(count, 1)).exp())}


TASK = NewsPerplexity()
