"""What every task shares: the interfaces eval_model.py (and RL) call, and the small helpers tasks build on.

A task is one module of this package: how its training and held-out records are written (the demo builder
calls these), how a model is asked, how many tokens it may answer in, how an answer is parsed and scored, and
the reward an RL rollout gets. Three kinds:

- GenerationTask: the model answers a prompt (greedy, up to max_new_tokens); score() turns the answers into
  metrics, reward() scores one answer in [0, 1].
- LikelihoodTask: the model is scored on given text (perplexity, preference pairs) through the log-probs of
  marked tokens; nothing is generated.
- OutputCheck: a property of any answer (the think/answer format, repetition), scored over the answers of
  other tasks.
"""

from collections.abc import Callable, Iterable
from typing import Any

Turn = tuple[str, str]  # (user, assistant)
Messages = list[dict]
ScoredTokens = tuple[list[int], list[int]]  # token ids, and 1 where a token is scored
Statistic = Callable[[list[int]], dict[str, float]]  # the metrics on the items at these indices (repeats allowed)


def chat_record(turns: list[Turn], **fields: Any) -> dict:
    """A conversation as the demo files hold it: {"conversations": [user, assistant, ...], **fields}."""
    conversations = []
    for user, assistant in turns:
        conversations += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"conversations": conversations, **fields}


def _last_answer(messages: Messages) -> int:
    """The index of the last assistant turn."""
    return max(i for i, message in enumerate(messages) if message["role"] == "assistant")


def prompt_messages(record: dict) -> Messages:
    """The conversation up to (not including) its last assistant turn: what the model must answer."""
    return record["messages"][:_last_answer(record["messages"])]


def reference_answer(record: dict) -> str:
    """The record's own answer to that prompt: its last assistant turn."""
    return record["messages"][_last_answer(record["messages"])]["content"]


def share(flags: Iterable[bool]) -> float:
    """The fraction of true flags (0.0 for none)."""
    flags = list(flags)
    return sum(flags) / len(flags) if flags else 0.0


class Task:
    """A held-out task: where its records are and which metrics it reports. Records are canonical (as
    dataset.formats reads them): a record's own fields are under record["meta"]."""

    name: str  # the eval set's name (the key in evals.TASKS)
    eval_file: str  # the held-out file of the demo folder that holds its records
    record_kind: str  # how dataset.formats reads that file: "chat", "dpo" or "pretrain"
    record_task: str | None = None  # the "task" field that picks this task's records from eval_file; None: all
    metrics: tuple[str, ...] = ()  # the names score() returns, in report order

    def selects(self, record: dict) -> bool:
        """Whether a record of eval_file belongs to this task."""
        return self.record_task is None or record["meta"].get("task") == self.record_task

    def reward(self, text: str, record: dict) -> float:
        """How good `text` is as an answer to `record`, in [0, 1]."""
        raise NotImplementedError(f"task {self.name} scores a model, not a completion: it has no reward")


class GenerationTask(Task):
    """A task the model answers: the prompt is the record's conversation before its last assistant turn."""

    max_new_tokens: int  # answer budget (greedy); an answer cut off at the limit is scored as it stands
    anchor_file: str | None = None  # the training file of the demo folder its anchor is fitted on (evals/anchors.py)

    def prompt_messages(self, record: dict) -> Messages:
        """The messages the model completes."""
        return prompt_messages(record)

    def parse(self, text: str) -> Any:
        """The answer a completion states (None when it states none)."""
        raise NotImplementedError

    def item_metrics(self, text: str, record: dict) -> dict[str, float]:
        """One answer's score on each metric that is a mean over answers: by default its reward."""
        return {self.metrics[0]: self.reward(text, record)}

    def anchor_answers(self, train_records: list[dict], records: list[dict]) -> list[str] | None:
        """The anchor's answer to each held-out record, fitted on anchor_file's records (evals/anchors.py); None when
        they hold nothing to fit on."""
        raise NotImplementedError(f"task {self.name} has no anchor")

    def score(self, outputs: list[str], records: list[dict]) -> dict[str, float]:
        """The task's metrics: by default the mean of item_metrics (accuracies when they are 0 or 1)."""
        items = [self.item_metrics(text, record) for text, record in zip(outputs, records)]
        return {metric: sum(item[metric] for item in items) / len(items) if items else 0.0 for metric in self.metrics}

    def statistic(self, outputs: list[str], records: list[dict]) -> Statistic:
        """score() on any resample of these answers (evals/intervals.py's bootstraps), each answer read once: by
        default the means of item_metrics; a task whose score is no mean over answers overrides it."""
        if type(self).score is not GenerationTask.score:
            return lambda idx: self.score([outputs[i] for i in idx], [records[i] for i in idx])
        items = [self.item_metrics(text, record) for text, record in zip(outputs, records)]
        return lambda idx: {metric: sum(items[i][metric] for i in idx) / len(idx) for metric in self.metrics}


class LikelihoodTask(Task):
    """A task scored from the model's log-probabilities of given tokens, without generating."""

    def sequences(self, tokenizer, records: list[dict]) -> list[ScoredTokens]:
        """The token sequences to score, each with its mask of scored tokens."""
        raise NotImplementedError

    def score(self, logps: list[tuple[float, int]], records: list[dict]) -> dict[str, float]:
        """The metrics from (summed log-prob, scored tokens) of each of sequences()' sequences."""
        raise NotImplementedError

    def statistic(self, logps: list[tuple[float, int]], records: list[dict]) -> Statistic:
        """score() on any resample of the records (a record's sequences, e.g. a pair's chosen and rejected, move
        together)."""
        per = len(logps) // len(records) if records else 0
        return lambda idx: self.score([logps[i * per + k] for i in idx for k in range(per)], [records[i] for i in idx])


class OutputCheck:
    """A property of an answer whatever the task, scored over the answers of the tasks named (None: all)."""

    name: str
    tasks: tuple[str, ...] | None = None
    metrics: tuple[str, ...] = ()

    def score(self, outputs: list[str]) -> dict[str, float]:
        """The metric over every answer."""
        raise NotImplementedError

    def reward(self, text: str, record: dict | None = None) -> float:
        """How well one answer has the property, in [0, 1] (the record is not needed)."""
        raise NotImplementedError

