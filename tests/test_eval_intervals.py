"""evals/intervals.py and eval_model.py's intervals: Wilson against published values, bootstraps that resample the
right items (pairs together, documents whole), the table and JSON that carry them, the answer-kind count, and the
demo's held-out sets at the default --limit."""

import math

import pytest

import eval_model
from dataset.errors import UsageError
from evals import TASKS
from evals.intervals import (
    bootstrap_intervals,
    check_intervals,
    check_resampler,
    generation_intervals,
    generation_resampler,
    likelihood_intervals,
    likelihood_resampler,
    paired_changes,
    wilson_interval,
)


def chat(user: str, assistant: str, **meta) -> dict:
    """A canonical chat record (as dataset.formats reads one)."""
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
            "meta": meta}


def test_wilson_matches_published_values():
    # Newcombe (1998), Statistics in Medicine 17:857, table I: 81/263 -> 0.2553-0.3662; 15/148 -> 0.0624-0.1605.
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson_interval(15, 148) == pytest.approx((0.0624, 0.1605), abs=1e-4)
    low, high = wilson_interval(0, 300)
    assert low == pytest.approx(0, abs=1e-12) and high == pytest.approx(0.01264, abs=1e-4)  # not empty at 0
    assert wilson_interval(300, 300)[1] == 1.0 and wilson_interval(300, 300)[0] < 1.0


def test_bootstrap_is_seeded_and_covers_the_mean():
    values = [float(i % 5) for i in range(200)]
    stat = lambda idx: {"mean": sum(values[i] for i in idx) / len(idx)}  # noqa: E731
    first, again = bootstrap_intervals(stat, len(values), draws=400), bootstrap_intervals(stat, len(values), draws=400)
    assert first == again
    low, high = first["mean"]
    assert low < 2.0 < high
    se = math.sqrt(2.0 / 200)  # population variance of 0..4 is 2
    assert high - low == pytest.approx(2 * 1.96 * se, rel=0.2)


def test_accuracy_tasks_get_wilson_entity_f1_a_bootstrap():
    records = [chat("q", "a", task="sentiment", label="正面" if i % 2 else "负面") for i in range(300)]
    outputs = ["这条评论是正面的。"] * 300  # half right
    scores = TASKS["sentiment"].score(outputs, records)
    assert generation_intervals(TASKS["sentiment"], outputs, records, scores) == {
        "sentiment_acc": wilson_interval(150, 300)}

    trace = "<think>\n先算：12-5=7。再加上：7+8=15。\n</think>\n<answer>\n现在有15个苹果。\n</answer>"
    records = [chat("q", trace, task="arith", answer=15) for _ in range(300)]
    outputs = [trace.replace("15个", "16个") if i % 3 else trace for i in range(300)]  # steps all right, 1/3 right
    scores = TASKS["arith"].score(outputs, records)
    # the question "q" holds no number to copy; every equation is right
    assert scores == pytest.approx({"arith_em": 1 / 3, "arith_plan": 1.0, "arith_copy": 0.0, "arith_calc": 1.0})
    assert generation_intervals(TASKS["arith"], outputs, records, scores) == {
        "arith_em": wilson_interval(100, 300), "arith_plan": wilson_interval(300, 300),
        "arith_copy": wilson_interval(0, 300), "arith_calc": wilson_interval(300, 300)}

    gold = {"person": ["王建国"], "place": ["上海"], "org": []}
    records = [chat("q", "a", task="entity", entities=gold) for _ in range(100)]
    right, wrong = "人名：王建国\n地名：上海\n机构：无", "人名：王建国\n地名：北京\n机构：无"
    outputs = [wrong if i % 4 else right for i in range(100)]
    scores = TASKS["entity"].score(outputs, records)
    found = generation_intervals(TASKS["entity"], outputs, records, scores, draws=300)
    assert set(found) == set(scores)
    low, high = found["entity_f1"]
    assert low < scores["entity_f1"] < high
    assert found["entity_f1_person"] == (1.0, 1.0)  # every person right in every resample


def test_pairs_and_documents_are_resampled_whole():
    style = {"meta": {"task": "sentiment"},
             "chosen": [{"role": "assistant", "content": "这条评论是正面的，属于好评。"}],
             "rejected": [{"role": "assistant", "content": "这条评论是正面的。"}]}
    label = {**style, "rejected": [{"role": "assistant", "content": "这条评论是负面的，属于差评。"}]}
    pairs = [style, label] * 25
    logps = [(-1.0, 1), (-2.0, 1), (-2.0, 1), (-1.0, 1)] * 25  # the model prefers the chosen answer of style pairs only
    found = likelihood_intervals(TASKS["pref"], logps, pairs, draws=200)
    assert set(found) == {"pref_acc", "pref_style_acc"} and found["pref_style_acc"] == (1.0, 1.0)
    low, high = found["pref_acc"]
    assert 0.3 < low < 0.5 < high < 0.7

    documents = [{"text": str(i)} for i in range(60)]
    logps = [(-float(1 + i % 3) * 10, 10) for i in range(60)]  # mean NLL per document 1, 2 or 3
    value = TASKS["news"].score(logps, documents)["val_ppl"]
    low, high = likelihood_intervals(TASKS["news"], logps, documents, draws=300)["val_ppl"]
    assert low < value < high and low > math.exp(1) and high < math.exp(3)


def test_output_checks():
    texts = ["<think>\nx\n</think>\n<answer>\ny\n</answer>"] * 30 + ["no format"] * 70
    assert check_intervals(TASKS["think_format"], texts, {"think_format": 0.3}) == {
        "think_format": wilson_interval(30, 100)}
    texts = ["这条评论是正面的。", "好好好好好好好好", "ab"] * 40
    value = TASKS["repetition"].score(texts)["distinct2"]
    low, high = check_intervals(TASKS["repetition"], texts, {"distinct2": value}, draws=300)["distinct2"]
    assert low <= value <= high and low < high


def test_answer_kinds_read_by_the_tasks_parsers():
    sentiment, entity, arith, who = eval_model.DEFAULT_PROMPTS[:4]
    kinds = eval_model.answer_kinds(eval_model.DEFAULT_PROMPTS, [
        "这条评论是正面的。", "人名：王建国\n地名：上海\n机构：中国科学院", "现在教室里有22人。", "我是丹炉。", "…"])
    assert kinds == {sentiment: True, entity: True, arith: True, who: True}
    kinds = eval_model.answer_kinds(eval_model.DEFAULT_PROMPTS, [
        "这条评论是正面的。", "人名：无\n地名：无\n机构：无", "中国、中国、中国", "", ""])
    assert kinds == {sentiment: True, entity: False, arith: False, who: False}
    # a trace is no self-introduction, even one that ends in the name
    assert eval_model.answer_kinds([who], ["<think>\n8-2=6。\n</think>\n<answer>\n丹炉\n</answer>"]) == {who: False}
    assert eval_model.answer_kinds(["你好"], ["你好"]) == {}  # prompts of one's own are not judged
    assert eval_model.answer_kinds([arith], ["<think>\n4×6=24\n</think>\n<answer>\n22人\n</answer>"]) == {arith: True}
    assert eval_model.answer_kinds([arith], ["<think>\n4×6=24，24-5=19"]) == {arith: False}  # cut before its answer


def test_table_and_json_carry_intervals_and_keep_the_value_keys():
    results = {"pretrain": {"val_ppl": 612.3, "sentiment_acc": 0.0}, "sft": {"val_ppl": 700.0, "sentiment_acc": 0.7}}
    intervals = {"pretrain": {"val_ppl": (590.2, 640.9), "sentiment_acc": (0.0, 0.0126)},
                 "sft": {"val_ppl": (680.0, 721.0), "sentiment_acc": (0.646, 0.749)}}
    kinds = {"sft": {"a": True, "b": False, "c": True}}
    lines = eval_model.format_table(results, intervals, kinds).splitlines()
    assert lines[1].split() == ["val_ppl", "612.30", "[590,", "641]", "700.00", "[680,", "721]"]
    assert lines[2].split() == ["sentiment_acc", "0.000", "[0.00,", "0.01]", "0.700", "[0.65,", "0.75]"]
    assert lines[3].split() == ["answer_kind", "-", "2/3"]
    data = eval_model.json_results(results, intervals, kinds)
    assert data["sft"]["sentiment_acc"] == 0.7 and data["sft"]["sentiment_acc_ci"] == [0.646, 0.749]
    assert data["sft"]["answer_kind"] == 2 and data["sft"]["answer_kind_of"] == 3
    assert "answer_kind" not in data["pretrain"]


# ---------------------------------------------------------------------------------------------------------------------
# Two models on the same items


def sentiment_items(n: int = 300) -> list[dict]:
    return [chat("q", "a", task="sentiment", label="正面" if i % 2 else "负面") for i in range(n)]


def answers_right_on(records: list[dict], right: set[int]) -> list[str]:
    """Sentiment answers right on the items in `right`, wrong on the rest."""
    flip = {"正面": "负面", "负面": "正面"}
    return [f"这条评论是{r['meta']['label'] if i in right else flip[r['meta']['label']]}的。"
            for i, r in enumerate(records)]


def test_paired_changes_see_what_two_separate_intervals_cannot():
    records, task = sentiment_items(), TASKS["sentiment"]
    before = answers_right_on(records, set(range(150)))  # 0.50
    after = answers_right_on(records, set(range(165)))  # 0.55: the same 150 right, and 15 more
    first, second = (generation_intervals(task, out, records, task.score(out, records)) for out in (before, after))
    assert second["sentiment_acc"][0] < first["sentiment_acc"][1]  # the two intervals overlap: "inside the noise"
    found = paired_changes({"sentiment": generation_resampler(task, before, records)},
                           {"sentiment": generation_resampler(task, after, records)}, draws=400)
    change, (low, high) = found["sentiment_acc"]
    assert change == pytest.approx(0.05) and 0 < low < change < high  # paired: every resample gains, so it is real

    shuffled = answers_right_on(records, set(range(135, 300)))  # 0.55 too, but right on other items
    change, (low, high) = paired_changes({"sentiment": generation_resampler(task, before, records)},
                                         {"sentiment": generation_resampler(task, shuffled, records)},
                                         draws=400)["sentiment_acc"]
    assert change == pytest.approx(0.05) and low < 0 < high  # the same change, from models that disagree: noise

    same = paired_changes({"sentiment": generation_resampler(task, before, records)},
                          {"sentiment": generation_resampler(task, before, records)}, draws=50)
    assert same == {"sentiment_acc": (0.0, (0.0, 0.0))}


def test_paired_changes_pair_items_whole_and_skip_what_one_model_lacks():
    documents = [{"text": str(i)} for i in range(60)]
    old = [(-20.0, 10)] * 60  # mean NLL 2 everywhere
    new = [(-19.0, 10)] * 60  # 1.9: lower perplexity on every document
    found = paired_changes({"news": likelihood_resampler(TASKS["news"], old, documents)},
                           {"news": likelihood_resampler(TASKS["news"], new, documents),
                            "sentiment": (300, lambda idx: {"sentiment_acc": 1.0})}, draws=100)
    assert set(found) == {"val_ppl"}  # the base model answered no sentiment question: no change to measure
    change, (low, high) = found["val_ppl"]
    assert change == pytest.approx(math.exp(1.9) - math.exp(2.0)) and high < 0

    gold = {"person": ["王建国"], "place": ["上海"], "org": []}
    records = [chat("q", "a", task="entity", entities=gold) for _ in range(100)]
    right, wrong = "人名：王建国\n地名：上海\n机构：无", "人名：王建国\n地名：北京\n机构：无"
    outputs = [wrong if i % 4 else right for i in range(100)]
    n, statistic = generation_resampler(TASKS["entity"], outputs, records)
    assert n == 100 and statistic(list(range(100))) == TASKS["entity"].score(outputs, records)
    assert statistic([0, 0, 1]) == TASKS["entity"].score([outputs[0], outputs[0], outputs[1]], records[:3])
    assert paired_changes({"entity": (100, statistic)}, {"entity": (99, statistic)}) == {}  # other items: no pairs

    texts = ["<think>\nx\n</think>\n<answer>\ny\n</answer>"] * 30 + ["no format"] * 70
    n, statistic = check_resampler(TASKS["think_format"], texts)
    assert statistic(list(range(100))) == {"think_format": 0.3} and statistic([0, 99]) == {"think_format": 0.5}
    texts = ["这条评论是正面的。", "好好好好好好好好", "ab", "a"]
    n, statistic = check_resampler(TASKS["repetition"], texts)
    assert statistic(list(range(4))) == TASKS["repetition"].score(texts)  # "a" has no bigram: left out of both
    assert statistic([3, 3]) == {"distinct2": 1.0}


def test_each_stage_is_compared_with_the_stage_it_starts_from():
    names = ["pretrain", "sft", "lora", "dpo", "distill", "grpo", "anchors"]
    assert eval_model.compared_with(names) == {"sft": "pretrain", "lora": "sft", "dpo": "sft", "distill": "dpo",
                                                "grpo": "distill"}
    assert eval_model.compared_with(["sft", "distill", "mine"]) == {}  # dpo is not a column: distill has no pair
    assert eval_model.compared_with(["distill", "d200", "grpo"], against="distill") == {"d200": "distill",
                                                                                          "grpo": "distill"}
    with pytest.raises(UsageError, match="--against sft: no such model"):
        eval_model.compared_with(["distill", "d200"], against="sft")
