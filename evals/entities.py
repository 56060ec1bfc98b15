"""Named entities: the persons, places and organisations of a news sentence, as three lines
`人名：A、B\\n地名：C\\n机构：无`.

Two tasks share the prompts, the answer and its parser: `entity` (SFT answers directly; entity_f1 on
sft_eval.jsonl) and `entity_reason` (distillation answers with a think trace that counts the entities, then names
each one's type; reason_eval.jsonl, scored by its format). DPO's entity pairs are in evals.preference.
"""

import random
import re
from collections.abc import Iterable
from dataclasses import dataclass

from evals.anchors import Gazetteer, labelled_turns, last_user_text, template_field
from evals.base import GenerationTask, Statistic, Turn, chat_record
from evals.think_format import answer_block, trace

Entities = dict[str, list[str]]  # kind -> names, in order of first appearance

ENTITY_LABELS = {"person": "人名", "place": "地名", "org": "机构"}  # kind -> its line's label in the answer
NO_ENTITY = "无"
PROMPTS = [
    "请找出下面这句话中的人名、地名和机构名：\n{sentence}",
    "从这句新闻里抽取人名、地名和机构名称。\n{sentence}",
    "{sentence}\n这句话提到了哪些人物、地点和组织机构？",
    "阅读下面的句子，列出其中出现的人名、地名和机构：{sentence}",
    "帮我标出这句新闻里的人名、地名、机构名：「{sentence}」",
    "下面的新闻句子中有哪些人名、地名和机构？按人名、地名、机构三行回答。\n{sentence}",
]
# The reasoning stage's entity questions end with a request to reason first: without it the same question had two
# answers (SFT's three lines, distillation's trace), and the distilled model answered every plain entity question
# with a trace that the 48-token budget cut before its <answer> (entity F1 0.192 -> 0.000; with the cue 0.177,
# docs/demo_experiments.md). Plain questions get plain answers, asked ones a trace: as Qwen3's thinking switch.
REASON_CUE = "\n请先逐个分析，再给出答案。"
REASON_PROMPTS = [prompt + REASON_CUE for prompt in PROMPTS]
FOLLOWUPS = ["这句呢？{sentence}", "再从这句话里找一找人名、地名和机构：{sentence}"]
REASONS = {"person": "是人的姓名，属于人名", "place": "是地点的名称，属于地名", "org": "是组织或机构的名称，属于机构"}


@dataclass(frozen=True)
class Sentence:
    """A news sentence as the entity tasks see it."""

    text: str
    entities: Entities
    mentions: list[tuple[str, str]]  # (name, kind) of each entity word, in order, each word once

    @property
    def has_entities(self) -> bool:
        return any(self.entities.values())


# ---------------------------------------------------------------------------------------------------------------------
# The answer


def format_entity_answer(entities: Entities) -> str:
    """The three-line answer `人名：A、B\\n地名：C\\n机构：无` that SFT teaches and evaluation parses."""
    lines = [f"{label}：{'、'.join(entities.get(kind, [])) or NO_ENTITY}" for kind, label in ENTITY_LABELS.items()]
    return "\n".join(lines)


_ENTITY_LINE = re.compile(r"\s*(人名|地名|机构名?|组织机构|组织)\s*[：:]\s*(.*)")
_LINE_KINDS = {"人名": "person", "地名": "place", "机构": "org", "机构名": "org", "组织机构": "org", "组织": "org"}


def parse_entity_answer(text: str) -> Entities:
    """Entities from a three-line answer (or the <answer> block of a trace); tolerant of spaces, ASCII colons,
    `,`/`，` separators and missing lines (a missing line means no entities of that kind)."""
    found: Entities = {kind: [] for kind in ENTITY_LABELS}
    block = answer_block(text)
    for line in (text if block is None else block).splitlines():
        match = _ENTITY_LINE.fullmatch(line)
        if match is None:
            continue
        names = found[_LINE_KINDS[match.group(1)]]
        for name in re.split(r"[、，,；;\s]+", match.group(2)):
            if name and name != NO_ENTITY and name not in names:
                names.append(name)
    return found


def entity_counts(pred: Entities, true: Entities) -> tuple[int, ...]:
    """(true positives, false positives, misses) of one answer for each entity type in ENTITY_LABELS order, in one
    flat tuple."""
    counts: list[int] = []
    for kind in ENTITY_LABELS:
        pred_set, true_set = set(pred.get(kind, [])), set(true.get(kind, []))
        counts += [len(pred_set & true_set), len(pred_set - true_set), len(true_set - pred_set)]
    return tuple(counts)


def f1_from_counts(counts: Iterable[tuple[int, ...]]) -> dict[str, float]:
    """entity_f1 and the per-type scores from entity_counts of each item (summed: micro over items)."""
    totals = [sum(column) for column in zip(*counts)] or [0] * 3 * len(ENTITY_LABELS)
    scores = {}
    for k, kind in enumerate(ENTITY_LABELS):
        tp, fp, fn = totals[3 * k: 3 * k + 3]
        scores[f"entity_f1_{kind}"] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    return {"entity_f1": sum(scores.values()) / len(scores), **scores}


def entity_f1(predicted: list[Entities], gold: list[Entities]) -> dict[str, float]:
    """F1 per entity type, micro over items (tp, fp, fn summed), and `entity_f1`, their mean over the types.

    A type with no gold and no predicted entity in any item scores 1.0 (nothing to find, nothing invented)."""
    return f1_from_counts(entity_counts(pred, true) for pred, true in zip(predicted, gold))


def sentence_of(question: str) -> str | None:
    """The sentence an entity question (one of PROMPTS or FOLLOWUPS) asks about; None for any other text."""
    return template_field(PROMPTS + FOLLOWUPS, question, "sentence")


# ---------------------------------------------------------------------------------------------------------------------
# Records


def turn(rng: random.Random, sentence: Sentence, prompts: list[str] = PROMPTS) -> Turn:
    """A training turn: one of the prompts around the sentence, the three-line answer."""
    return rng.choice(prompts).format(sentence=sentence.text), format_entity_answer(sentence.entities)


def eval_record(rng: random.Random, sentence: Sentence) -> dict:
    """A held-out record, with the entities kept for scoring."""
    return chat_record([turn(rng, sentence)], task="entity", entities=sentence.entities)


def wrong_entities(rng: random.Random, sentence: Sentence, names: dict[str, list[str]]) -> Entities | None:
    """A plausible wrong extraction: a name invented (one of `names`, the names of each kind found elsewhere) or a
    name given the wrong type. None when the draw found nothing to change. Never a list made shorter (a missed
    name, or one moved out of a list of several): as DPO's rejected answers, such taught the demo's model to list
    fewer names (entity F1 0.19 -> 0.08-0.10 in four DPO runs, 0.18-0.20 in four without them;
    docs/demo_experiments.md)."""
    wrong = {kind: list(found) for kind, found in sentence.entities.items()}
    alone = [(kind, found[0]) for kind, found in wrong.items() if len(found) == 1]
    if not alone or rng.random() < 0.5:
        kind = rng.choice(list(ENTITY_LABELS))
        name = rng.choice(names[kind])
        if name in sentence.text:
            return None
        wrong[kind].insert(rng.randint(0, len(wrong[kind])), name)
        return wrong
    kind, name = rng.choice(alone)
    wrong[kind] = []
    wrong[rng.choice([k for k in ENTITY_LABELS if k != kind])].append(name)
    return wrong


def reason_trace(sentence: Sentence) -> str:
    """Think: how many entities, then each one numbered with why it is a person / place / organisation; answer: the
    three lines. The count and the numbers tell a small model where the list ends: traces that listed entities (and
    two common nouns) without them looped on one name until the token limit (docs/demo_experiments.md).

    A sentence without entities goes the same way, with 无 where the first name belongs (`1. “无”——句中没有…`). A model
    that cannot copy a name from the question does not know there is none when it writes the count (it says 1, the
    commonest), only when it reaches the name; when these traces said 句中没有… at once, it wrote 无 there and ran on
    into the answer's ending (`1. “无\\n地名：无\\n机构：无\\n</answer>`: 24 and 36 of the 43 held-out sentences
    without entities, format 0.922 / 0.880 on two seeds; with this trace 0.990 / 0.994, docs/demo_experiments.md)."""
    mentions = sentence.mentions
    if not mentions:
        lines = [f"专有名词共0个，逐个判断类别：\n1. “{NO_ENTITY}”——句中没有人名、地名或机构名。"]
    else:
        lines = [f"专有名词共{len(mentions)}个，逐个判断类别："]
        lines += [f"{i}. “{name}”{REASONS[kind]}。" for i, (name, kind) in enumerate(mentions, 1)]
    return trace("\n".join(lines), format_entity_answer(sentence.entities))


def reason_turn(rng: random.Random, sentence: Sentence) -> Turn:
    """A training turn of the reasoning stage: an entity prompt that asks for reasoning, answered with a trace."""
    user = rng.choice(REASON_PROMPTS).format(sentence=sentence.text)
    return user, reason_trace(sentence)


def reason_eval_record(rng: random.Random, sentence: Sentence) -> dict:
    """A held-out trace record, with the entities kept for scoring."""
    return chat_record([reason_turn(rng, sentence)], task="entity_reason", entities=sentence.entities)


# ---------------------------------------------------------------------------------------------------------------------
# The tasks


class EntityTask(GenerationTask):
    """entity_f1 (and per type) over the held-out sentences; the reward is one answer's F1."""

    name = "entity"
    eval_file = "sft_eval.jsonl"
    record_kind = "chat"
    record_task = "entity"
    max_new_tokens = 48
    metrics = ("entity_f1", *(f"entity_f1_{kind}" for kind in ENTITY_LABELS))
    anchor_file = "sft.jsonl"

    def parse(self, text: str) -> Entities:
        return parse_entity_answer(text)

    def score(self, outputs: list[str], records: list[dict]) -> dict[str, float]:
        """entity_f1 and entity_f1_person / _place / _org (see entity_f1)."""
        return entity_f1([parse_entity_answer(text) for text in outputs], [r["meta"]["entities"] for r in records])

    def statistic(self, outputs: list[str], records: list[dict]) -> Statistic:
        """score() on any resample of the answers, each answer parsed and counted once."""
        counts = [entity_counts(parse_entity_answer(text), record["meta"]["entities"])
                  for text, record in zip(outputs, records)]
        return lambda idx: f1_from_counts(counts[i] for i in idx)

    def reward(self, text: str, record: dict) -> float:
        """entity_f1 of this one answer: 1.0 when exactly the record's entities, partial credit per type."""
        return entity_f1([parse_entity_answer(text)], [record["meta"]["entities"]])["entity_f1"]

    def anchor_answers(self, train_records: list[dict], records: list[dict]) -> list[str] | None:
        """The three lines of a gazetteer's finds (evals/anchors.py): every name the training chats' entity answers
        tag, under the kind it was tagged with most often, found in the held-out sentence by the longest match."""
        tagged = [found for _, found in labelled_turns(train_records, sentence_of, parse_entity_answer)]
        if not any(names for entities in tagged for names in entities.values()):
            return None
        gazetteer = Gazetteer(tagged)
        return [format_entity_answer(gazetteer.find(sentence_of(last_user_text(record)) or "", ENTITY_LABELS))
                for record in records]


class EntityReasonTask(EntityTask):
    """Entity traces: scored by their format (evals.format) and repetition; the reward is the <answer>'s F1."""

    name = "entity_reason"
    eval_file = "reason_eval.jsonl"
    record_task = "entity_reason"
    max_new_tokens = 160
    metrics = ()
    anchor_file = None

    def score(self, outputs: list[str], records: list[dict]) -> dict[str, float]:
        """No metric of its own (the report has none): its answers count in think_format and distinct2."""
        return {}

    def statistic(self, outputs: list[str], records: list[dict]) -> Statistic:
        return lambda idx: {}


TASK = EntityTask()
REASON_TASK = EntityReasonTask()
