"""evals/anchors.py: the TF-IDF features against their formulas, the logistic regression at the optimum of its
objective, the gazetteer's longest match, the tasks' questions read back, and eval_model's anchors column."""

import json
import math
import random

import pytest
import torch

import eval_model
from dataset.errors import UsageError
from evals import TASKS, entities, lora_style, sentiment
from evals.anchors import Gazetteer, TfidfLogisticRegression, char_ngrams, fit_classifier, template_field
from tests.conftest import run_script, write_jsonl
from tests.test_eval_model import chat, demo_folder


def test_char_ngrams_lowercase_and_collapse_whitespace_as_scikit_learn():
    assert char_ngrams("Ab  c") == ["a", "b", " ", "c", "ab", "b ", " c", "ab ", "b c"]
    assert char_ngrams("好", 1, 3) == ["好"]


def test_tfidf_rows_are_counts_times_smoothed_idf_with_unit_norm():
    model = TfidfLogisticRegression(["ab", "b", "bb"], ["x", "y", "y"])
    assert list(model.vocabulary) == ["a", "ab", "b", "bb"]
    idf = {"a": math.log(4 / 2) + 1, "ab": math.log(4 / 2) + 1, "b": math.log(4 / 4) + 1, "bb": math.log(4 / 2) + 1}
    rows = model.features(["ab", "bbb", "zz"]).to_dense()
    ab = torch.tensor([idf["a"], idf["ab"], idf["b"], 0.0], dtype=torch.float64)
    bbb = torch.tensor([0.0, 0.0, 3 * idf["b"], 2 * idf["bb"]], dtype=torch.float64)  # bbb: b three times, bb twice
    torch.testing.assert_close(rows[0], ab / ab.norm())
    torch.testing.assert_close(rows[1], bbb / bbb.norm())
    assert rows[2].abs().sum() == 0  # nothing seen in training: no features


def test_logistic_regression_stops_at_the_optimum_of_its_objective():
    rng = random.Random(0)
    words = {"pos": "好棒赞满意", "neg": "差烂坏失望"}
    texts, labels = [], []
    for _ in range(60):
        label = rng.choice(["pos", "neg"])
        mixed = [rng.choice(words[label]) for _ in range(3)] + [rng.choice(words["pos" if label == "neg" else "neg"])]
        texts.append("".join(rng.sample(mixed, len(mixed))) + "的东西")
        labels.append(label)
    model = TfidfLogisticRegression(texts, labels)
    x = model.features(texts).to_dense()
    y = torch.tensor([float(label == model.classes[1]) for label in labels], dtype=torch.float64)
    p = torch.sigmoid(x @ model.weight.detach() + model.bias.detach())
    # C · Σ log-loss + ½‖w‖² is smallest where its gradient vanishes: X^T (p - y) + w = 0 and Σ (p - y) = 0.
    assert (x.T @ (p - y) + model.weight.detach()).abs().max() < 1e-5
    assert abs((p - y).sum()) < 1e-5
    assert model.classes == ["neg", "pos"]
    assert model.predict(["好棒满意的东西", "差烂失望的东西"]) == ["pos", "neg"]


def test_a_classifier_needs_two_labels():
    assert fit_classifier([("好", "正面"), ("棒", "正面")]) is None
    assert fit_classifier([]) is None
    with pytest.raises(ValueError, match="exactly two labels"):
        TfidfLogisticRegression(["a", "b", "c"], [1, 2, 3])


def test_gazetteer_takes_the_longest_name_under_its_commonest_kind():
    gazetteer = Gazetteer([{"place": ["北京", "北京市"], "org": []}, {"org": ["北京大学"]},
                           {"person": ["北京"]}, {"place": ["北京"]}, {"person": ["王芳"]}])
    found = gazetteer.find("北京大学的王芳在北京市和北京，又见王芳。", ["person", "place", "org"])
    assert found == {"person": ["王芳"], "place": ["北京市", "北京"], "org": ["北京大学"]}
    assert gazetteer.find("上海", ["person"]) == {"person": []}


def test_each_tasks_questions_give_back_what_they_ask_about():
    review, sentence = "质量不错，就是物流慢", "江泽民在北京会见了来宾。"
    for template in sentiment.PROMPTS + sentiment.FOLLOWUPS:
        assert sentiment.review_of(template.format(review=review)) == review, template
    for template in entities.PROMPTS + entities.FOLLOWUPS:
        assert entities.sentence_of(template.format(sentence=sentence)) == sentence, template
    for template in lora_style.PROMPTS:
        assert template_field(lora_style.PROMPTS, template.format(review=review), "review") == review
    assert sentiment.review_of("你是谁？") is None
    assert entities.sentence_of(sentiment.PROMPTS[0].format(review="x")) is None
    assert template_field(["问：{x}"], "问：", "x") is None  # an empty field is no fit


def anchor_folder(root):
    """demo_folder's held-out records, and training files for the anchors: reviews that say 好 or 差, sentences
    whose entities are tagged."""
    folder = demo_folder(root)
    rng = random.Random(0)
    train = []
    for i in range(40):
        label = "正面" if i % 2 else "负面"
        review = ("房间干净，服务热情" if label == "正面" else "太差了，再也不来") + "。" * (i % 3)
        train.append(chat(sentiment.PROMPTS[i % len(sentiment.PROMPTS)].format(review=review),
                          rng.choice(sentiment.ANSWERS[label])))
    tagged = {"person": ["钱其琛"], "place": ["伦敦"], "org": []}
    train.append(chat(entities.PROMPTS[0].format(sentence="钱其琛到了伦敦。"), entities.format_entity_answer(tagged)))
    train.append(chat("你是谁？", "我是丹炉。"))
    write_jsonl(folder / "sft.jsonl", train)
    write_jsonl(folder / "lora.jsonl", [chat(lora_style.PROMPTS[i % 2].format(review=text), verdict)
                                        for i in range(20) for text, verdict in (("很好", "推荐"), ("很差", "不推荐"))])
    return folder


def test_the_anchors_answer_the_held_out_records_as_the_tasks_score_them(tmp_path):
    folder = anchor_folder(tmp_path / "demo")
    sets = eval_model.load_eval_sets(folder, 0)
    metrics, intervals = eval_model.anchor_metrics(folder, sets, draws=50)
    # The held-out reviews are the training ones' words, the sentence's names are tagged in training, the LoRA review
    # is a training one: every anchor is right, and each value sits in its interval.
    assert metrics == {"sentiment_acc": 1.0, "entity_f1": 1.0, "entity_f1_person": 1.0, "entity_f1_place": 1.0,
                       "entity_f1_org": 1.0, "lora_acc": 1.0}
    assert all(intervals[m][0] <= value <= intervals[m][1] for m, value in metrics.items())
    answers = TASKS["sentiment"].anchor_answers([], sets["sentiment"])
    assert answers is None  # nothing to fit on: no column rather than a guess
    (folder / "lora.jsonl").unlink()
    assert "lora_acc" not in eval_model.anchor_metrics(folder, sets, draws=50)[0]


@pytest.mark.slow
def test_cli_shows_the_anchors_column_unless_told_not_to(tmp_path, chat_checkpoint):
    folder = anchor_folder(tmp_path / "demo")
    common = ["--models", f"sft={chat_checkpoint['model']}", "--data_dir", folder, "--dtype", "fp32",
              "--max_new_tokens", "4", "--threads", "1", "--ci_draws", "50", "--prompts", "你是谁？"]
    result = run_script("eval_model.py", *common, "--json", tmp_path / "a.json", "--report", tmp_path / "r.md")
    page = (tmp_path / "r.md").read_text()
    assert f"| metric (95% interval) | sft | {eval_model.ANCHORS} |" in page and "column is no model" in page
    results = json.loads((tmp_path / "a.json").read_text())
    assert list(results) == ["sft", eval_model.ANCHORS]
    assert results[eval_model.ANCHORS]["sentiment_acc"] == 1.0 and "sentiment_acc_ci" in results[eval_model.ANCHORS]
    assert "val_ppl" not in results[eval_model.ANCHORS]  # a metric no anchor has stays out
    header = next(line for line in result.stdout.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "sft", eval_model.ANCHORS]
    run_script("eval_model.py", *common, "--json", tmp_path / "b.json", "--no_anchors")
    assert list(json.loads((tmp_path / "b.json").read_text())) == ["sft"]
    with pytest.raises(UsageError, match="no model may be named"):
        eval_model.resolve_models(eval_model.parse_args(["--models", f"anchors={chat_checkpoint['model']}"]))
