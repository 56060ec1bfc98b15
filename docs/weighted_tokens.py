"""A chat stage with the answer tokens copied from the prompt weighted more (docs/demo_experiments.md, "Weighting the
tokens the model has to copy").

    python -m docs.weighted_tokens --copied 4 train_sft.py --max_steps 300 --learning_rate 1e-3 ...

Everything after the script's name goes to the script. The stage runs as it always does, but every answer token that
occurs earlier in the same conversation's prompt (the names of the entity task, the numbers of the word problems,
words of the question; the chat template's tokens aside: special tokens and the `user` / `assistant` header lines)
counts --copied times in the cross-entropy, on top of the stage's own weights (--token_weight and the tags'
--tag_weight, --prompt_loss_weight), and the mean is over the weights' sum, as those are. Which tokens are copied
depends on the conversation, so this is not a --token_weight list. The digits were this script's other rule until
--token_weight took it: `train_distill_reason.py --token_weight 0:4,1:4,2:4,3:4,4:4,5:4,6:4,7:4,8:4,9:4` trains as
`--digits 4` did (130 steps from one DPO model: the same train loss and the same `docs.arith_probe` counts; its
validation loss is unweighted, as every stage's is).

A scratch experiment, not a flag: it swaps trainer.chat_stage.assistant_loss for a weighted one before running the
script (with one micro-batch per step, as the demo's stages run, the weighting of micro-batches does not change).
"""

import argparse
import runpy
import sys

import torch

import trainer.chat_stage as chat_stage
from dataset.chat import IGNORE_INDEX
from dataset.tokenizer import load_tokenizer


def copied_rule(tokenizer, weight: float):
    """The answer tokens that occur earlier in their conversation's prompt get `weight`."""
    template = {tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens}
    for line in ("\n", "user\n", "assistant\n"):
        template |= set(tokenizer.encode(line, add_special_tokens=False))
    template = torch.tensor(sorted(template))

    def weights(batch: dict) -> torch.Tensor:
        ids, labels, segments = batch["input_ids"], batch["labels"], batch["segment_ids"]
        loss_weights = batch.get("loss_weights")  # under --prompt_loss_weight the prompt is scored too, at < 1
        answer = (labels != IGNORE_INDEX) & (loss_weights >= 1 if loss_weights is not None else True)
        # input token s is the prompt's when it is not the target of an answer position (labels[s - 1])
        prompt = torch.ones_like(answer)
        prompt[:, 1:] = ~answer[:, :-1]
        T = ids.shape[1]
        earlier = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()  # [t, s]: s <= t
        in_prompt = ((labels[:, :, None] == ids[:, None, :]) & (segments[:, :, None] == segments[:, None, :])
                     & prompt[:, None, :] & earlier).any(-1)
        copied = in_prompt & answer & ~torch.isin(labels, template.to(labels.device))
        return copied.float() * (weight - 1) + 1

    return weights


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--copied", type=float, required=True, help="weight of the answer tokens found in the prompt")
    p.add_argument("--tokenizer_dir", default="out/tokenizer", help="the stage's tokenizer (for the token ids)")
    p.add_argument("script", help="the stage script (a .py file); everything after it is the script's")
    at = next((i for i, a in enumerate(sys.argv[1:], 1) if a.endswith(".py")), len(sys.argv))
    args, script_args = p.parse_args(sys.argv[1:at + 1]), sys.argv[at + 1:]
    tokenizer = load_tokenizer(args.tokenizer_dir)
    extra = copied_rule(tokenizer, args.copied)
    print(f"weighted tokens: copied x{args.copied}", flush=True)
    assistant_loss = chat_stage.assistant_loss

    def weighted_loss(model, batch, weights=None, anchor=None):
        weights = batch.get("loss_weights") if weights is None else weights
        more = extra(batch)
        return assistant_loss(model, batch, more if weights is None else weights * more, anchor)

    chat_stage.assistant_loss = weighted_loss  # run_chat_stage looks it up when it builds the stage's loss
    sys.argv = [args.script, *script_args]
    runpy.run_path(args.script, run_name="__main__")


if __name__ == "__main__":
    main()
