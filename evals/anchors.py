"""Anchors: what a classical method scores on the same held-out records, as one more column beside the models.

Issue 13 sets the demo's tasks two anchors to beat: a TF-IDF character 1-3-gram logistic regression for review
sentiment, and a gazetteer of the training split's tagged entities for entity F1. A task with an anchor
(`anchor_file`, `anchor_answers` in its module) fits one of the two methods below on the labelled turns of a training
file of the demo (the reviews and sentences a stage was taught with; never a held-out one) and answers each held-out
record in the task's own answer format, so the task's parser, score and interval grade it as they grade a model.

Both methods are written out here (no scikit-learn in the toolkit); TfidfLogisticRegression follows scikit-learn's
TfidfVectorizer(analyzer="char", ngram_range=(1, 3)) and LogisticRegression() defaults (tests/test_anchors.py checks
its features against the formulas, docs/demo_experiments.md its predictions against scikit-learn's).
"""

import math
import re
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

import torch

from evals.base import Messages, prompt_messages

COLUMN = "anchors"  # the anchors' column in eval_model.py's metrics table and report card; no model may take the name


def user_answer_turns(messages: Messages) -> list[tuple[str, str]]:
    """Each user turn with the assistant turn that answers it, in order."""
    return [(asked["content"], answer["content"]) for asked, answer in zip(messages, messages[1:])
            if asked["role"] == "user" and answer["role"] == "assistant"]


def template_field(templates: Iterable[str], text: str, field: str) -> str | None:
    """The value of `{field}` in `text` when `text` is one of the templates filled in (the first template that
    fits, the field taking as much as it can); None when none fits."""
    for template in templates:
        before, _, after = template.partition("{" + field + "}")
        if text.startswith(before) and text.endswith(after) and len(text) > len(before) + len(after):
            return text[len(before):len(text) - len(after)]
    return None


def char_ngrams(text: str, low: int = 1, high: int = 3) -> list[str]:
    """Every character n-gram of `text`, low <= n <= high, in order, after lowercasing and collapsing each run of
    whitespace to one space (scikit-learn's analyzer="char")."""
    text = re.sub(r"\s\s+", " ", text.lower())
    return [text[i:i + n] for n in range(low, high + 1) for i in range(len(text) - n + 1)]


class TfidfLogisticRegression:
    """A linear classifier of two labels on character 1-3-gram TF-IDF features.

    Features (scikit-learn's TfidfVectorizer defaults): the n-grams seen in training; a text's count of each, times
    idf = ln((1 + n) / (1 + df)) + 1 (n training texts, df of them holding the n-gram); each row scaled to unit L2
    norm. Model (LogisticRegression's defaults): p(second label) = sigmoid(x·w + b), fitted to minimise
    C · Σ log-loss + ½‖w‖² (C = 1; the bias is not penalised) by L-BFGS to convergence.
    """

    def __init__(self, texts: Sequence[str], labels: Sequence[Hashable], c: float = 1.0, max_iter: int = 500):
        self.classes = sorted(set(labels))
        if len(self.classes) != 2 or len(texts) != len(labels):
            raise ValueError(f"need one label per text and exactly two labels, got {len(self.classes)}: "
                             f"{self.classes[:5]}")
        counts = [Counter(char_ngrams(text)) for text in texts]
        document_frequency = Counter(gram for count in counts for gram in count)
        self.vocabulary = {gram: i for i, gram in enumerate(sorted(document_frequency))}
        n = len(texts)
        self.idf = [math.log((1 + n) / (1 + document_frequency[gram])) + 1 for gram in self.vocabulary]
        x = self.features(texts, counts)
        y = torch.tensor([float(label == self.classes[1]) for label in labels], dtype=torch.float64)
        self.weight = torch.zeros(len(self.vocabulary), dtype=torch.float64, requires_grad=True)
        self.bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([self.weight, self.bias], max_iter=max_iter, tolerance_grad=1e-8,
                                      tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

        def objective():
            optimizer.zero_grad()
            logits = torch.sparse.mm(x, self.weight[:, None])[:, 0] + self.bias
            loss = c * torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum")
            loss = loss + 0.5 * self.weight.square().sum()
            loss.backward()
            return loss

        optimizer.step(objective)

    def features(self, texts: Sequence[str], counts: Sequence[Counter] | None = None) -> torch.Tensor:
        """The texts' TF-IDF rows, sparse (n-grams not seen in training are dropped, as scikit-learn does); `counts`:
        the texts' n-gram counts, when already made."""
        rows, cols, values = [], [], []
        for row, text in enumerate(texts):
            grams = counts[row] if counts is not None else Counter(char_ngrams(text))
            columns = ((self.vocabulary.get(gram), count) for gram, count in grams.items())
            weights = {col: count * self.idf[col] for col, count in columns if col is not None}
            norm = math.sqrt(sum(w * w for w in weights.values())) or 1.0
            for col, weight in weights.items():
                rows.append(row)
                cols.append(col)
                values.append(weight / norm)
        return torch.sparse_coo_tensor([rows, cols], values, (len(texts), len(self.vocabulary)),
                                       dtype=torch.float64, check_invariants=False).coalesce()

    def probability(self, texts: Sequence[str]) -> torch.Tensor:
        """p(self.classes[1]) for each text."""
        with torch.no_grad():
            return torch.sigmoid(torch.sparse.mm(self.features(texts), self.weight[:, None])[:, 0] + self.bias)

    def predict(self, texts: Sequence[str]) -> list[Hashable]:
        """The likelier label of each text (the first label on a tie, as scikit-learn)."""
        return [self.classes[int(p > 0.5)] for p in self.probability(texts).tolist()]


class Gazetteer:
    """Names with their kinds, found in text by the longest match from the left.

    A name tagged with several kinds gets the one it was tagged with most often (the first seen on a tie). Finding
    scans the text once: at each character the longest listed name that starts there is taken and the scan goes on
    after it; where none starts, on to the next character.
    """

    def __init__(self, tagged: Iterable[dict[str, list[str]]]):
        kinds: dict[str, Counter] = {}
        for entities in tagged:
            for kind, names in entities.items():
                for name in names:
                    kinds.setdefault(name, Counter())[kind] += 1
        self.kind = {name: count.most_common(1)[0][0] for name, count in kinds.items()}
        self.longest = max(map(len, self.kind), default=0)

    def find(self, text: str, kinds: Iterable[str]) -> dict[str, list[str]]:
        """The listed names in `text`, by kind (every kind of `kinds`, empty lists included), each name once."""
        found: dict[str, list[str]] = {kind: [] for kind in kinds}
        i = 0
        while i < len(text):
            for length in range(min(self.longest, len(text) - i), 0, -1):
                name = text[i:i + length]
                if name in self.kind:
                    if name not in found.setdefault(self.kind[name], []):
                        found[self.kind[name]].append(name)
                    i += length
                    break
            else:
                i += 1
        return found


def labelled_turns(records: Iterable[dict], text_of: Callable[[str], str | None],
                   label_of: Callable[[str], Any]) -> list[tuple[str, Any]]:
    """(text_of(question), label_of(answer)) of every user turn and its answer in the records where both are found
    (not None): a task's labelled training examples."""
    return [(text, label) for record in records for question, answer in user_answer_turns(record["messages"])
            if (text := text_of(question)) is not None and (label := label_of(answer)) is not None]


def classify(train_records: Iterable[dict], records: Sequence[dict], text_of: Callable[[str], str | None],
             label_of: Callable[[str], Hashable]) -> list[Hashable] | None:
    """TfidfLogisticRegression fitted on the training records' labelled turns (labelled_turns), and its label for
    the text of each held-out record's question (an empty text where text_of finds none); None when the turns do
    not hold two labels."""
    classifier = fit_classifier(labelled_turns(train_records, text_of, label_of))
    if classifier is None:
        return None
    return classifier.predict([text_of(last_user_text(record)) or "" for record in records])


def fit_classifier(examples: Sequence[tuple[str, Hashable]]) -> TfidfLogisticRegression | None:
    """TfidfLogisticRegression fitted on (text, label) examples; None unless they hold exactly two labels."""
    if len({label for _, label in examples}) != 2:
        return None
    texts, labels = zip(*examples)
    return TfidfLogisticRegression(texts, labels)


def last_user_text(record: dict) -> str:
    """The user turn a held-out record asks the model to answer."""
    return [message for message in prompt_messages(record) if message["role"] == "user"][-1]["content"]
