"""The think/answer format of reasoning traces: `<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>`.

The reasoning tasks (arithmetic, entity traces) write their answers in it, parse what is inside <answer>, and
think_format checks that a model's answers keep to it (R1's format reward, for RL).
"""

import re

from evals.base import OutputCheck, share

# One <think> block then one <answer> block, each with content and no tag inside, nothing else (a blank line may
# follow </think>, as the chat template writes reasoning_content; trailing whitespace allowed).
_CONTENT = r"(?:(?!</?(?:think|answer)>).)+"
THINK_FORMAT = re.compile(rf"<think>\n{_CONTENT}\n</think>\n+<answer>\n{_CONTENT}\n</answer>\s*", re.DOTALL)


def trace(think: str, answer: str) -> str:
    """A reasoning trace in the format: the thinking, then the answer."""
    return f"<think>\n{think}\n</think>\n<answer>\n{answer}\n</answer>"


def answer_block(text: str) -> str | None:
    """What is inside the last <answer> block (up to the end when a generation stopped before </answer>)."""
    start = text.rfind("<answer>")
    if start < 0:
        return None
    return text[start + len("<answer>"):].split("</answer>")[0]


def is_think_format(text: str) -> bool:
    """Whether text is exactly one <think> block then one <answer> block, each with content."""
    return THINK_FORMAT.fullmatch(text) is not None


class ThinkFormat(OutputCheck):
    """think_format: the share of the reasoning tasks' answers that keep to the format."""

    name = "think_format"
    tasks = ("arith", "entity_reason")
    metrics = ("think_format",)

    def score(self, outputs: list[str]) -> dict[str, float]:
        """The share of outputs in the format."""
        return {"think_format": share(is_think_format(text) for text in outputs)}

    def reward(self, text: str, record: dict | None = None) -> float:
        """1.0 for an answer in the format, else 0.0."""
        return float(is_think_format(text))


TASK = ThinkFormat()
