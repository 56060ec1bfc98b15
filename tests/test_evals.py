"""evals/: each task's answer parser, score and reward on hand-made answers, and the registry eval_model.py runs."""

import math
import random

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import evals
from dataset.tokenizer import load_tokenizer
from evals import (
    arithmetic,
    entities,
    identity,
    lora_style,
    perplexity,
    preference,
    repetition,
    sentiment,
    think_format,
)
from evals.base import GenerationTask, LikelihoodTask, OutputCheck, chat_record, prompt_messages
from evals.intervals import check_intervals, generation_intervals, wilson_interval

TRACE = "<think>\n先算：12-5=7。再加上：7+8=15。\n</think>\n<answer>\n现在有15个苹果。\n</answer>"


def chat(user: str, assistant: str, **meta) -> dict:
    """A canonical chat record, as dataset.formats reads a held-out file."""
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}], "meta": meta}


# ---------------------------------------------------------------------------------------------------------------------
# The registry


def test_registry_order_is_the_report_order():
    assert list(evals.TASKS) == ["news", "sentiment", "entity", "identity", "arith", "entity_reason", "think_format",
                                 "lora", "pref", "repetition", "loops"]
    assert evals.METRICS == ("val_ppl", "sentiment_acc", "entity_f1", "entity_f1_person", "entity_f1_place",
                             "entity_f1_org", "identity_acc", "arith_em", "arith_plan", "arith_copy", "arith_calc",
                             "think_format", "lora_acc", "pref_acc", "pref_style_acc", "distinct2", "loop_free")
    assert [t.name for t in evals.GENERATION_TASKS] == ["sentiment", "entity", "identity", "arith", "entity_reason",
                                                       "lora"]
    assert {t.name: t.max_new_tokens for t in evals.GENERATION_TASKS} == {
        "sentiment": 16, "entity": 48, "identity": 24, "arith": 96, "entity_reason": 160, "lora": 8}
    assert [t.name for t in evals.LIKELIHOOD_TASKS] == ["news", "pref"]
    assert [t.name for t in evals.OUTPUT_CHECKS] == ["think_format", "repetition", "loops"]
    for task in evals.TASKS.values():
        assert isinstance(task, GenerationTask | LikelihoodTask | OutputCheck)


def test_records_are_picked_by_file_and_task_field():
    sentiment_record = chat("q", "a", task="sentiment", label="正面")
    assert sentiment.TASK.selects(sentiment_record) and not entities.TASK.selects(sentiment_record)
    assert lora_style.TASK.selects(chat("q", "推荐"))  # the whole of lora_eval.jsonl, whatever its task field
    assert (sentiment.TASK.eval_file, arithmetic.TASK.eval_file, preference.TASK.record_kind) == (
        "sft_eval.jsonl", "reason_eval.jsonl", "dpo")


def test_prompt_is_the_conversation_before_the_last_answer():
    record = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                           {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    assert prompt_messages(record) == record["messages"][:3]
    assert chat_record([("a", "b")], task="x") == {
        "conversations": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "task": "x"}


# ---------------------------------------------------------------------------------------------------------------------
# Sentiment


def test_parse_sentiment_answer():
    for label, answers in sentiment.ANSWERS.items():
        assert all(sentiment.parse_sentiment_answer(answer) == label for answer in answers)
    assert sentiment.parse_sentiment_answer("负面") == "负面"
    assert sentiment.parse_sentiment_answer("我觉得是好评") == "正面"
    assert sentiment.parse_sentiment_answer("可能正面也可能负面") is None
    assert sentiment.parse_sentiment_answer("这条评论是这条评论是这条评论是…") is None


def test_sentiment_reward_and_score():
    record = chat("评论：很好", "这条评论是正面的。", task="sentiment", label="正面")
    assert sentiment.TASK.reward("这条评论是正面的，属于好评。", record) == 1.0
    assert sentiment.TASK.reward("这条评论是负面的。", record) == 0.0
    assert sentiment.TASK.reward("我不知道", record) == 0.0
    negative = chat("评论：太差", "这条评论是负面的。", task="sentiment", label="负面")
    outputs = ["是正面的", "是正面的", "差评"]
    assert sentiment.TASK.score(outputs, [record, negative, negative]) == {"sentiment_acc": pytest.approx(2 / 3)}
    assert sentiment.TASK.score([], []) == {"sentiment_acc": 0.0}


# ---------------------------------------------------------------------------------------------------------------------
# Entities


def test_parse_entity_answer_is_tolerant():
    assert entities.parse_entity_answer("人名：江泽民、李鹏\n地名：北京\n机构：无") == {
        "person": ["江泽民", "李鹏"], "place": ["北京"], "org": []}
    assert entities.parse_entity_answer(" 人名 : 江泽民 , 李鹏，江泽民\n机构名：新华社") == {
        "person": ["江泽民", "李鹏"], "place": [], "org": ["新华社"]}
    trace = "<think>\n人名：张三\n</think>\n<answer>\n人名：李四\n地名：无\n机构：无\n</answer>"
    assert entities.parse_entity_answer(trace)["person"] == ["李四"]
    assert entities.parse_entity_answer("我不知道") == {"person": [], "place": [], "org": []}


names = st.lists(st.text(alphabet="江泽民李鹏北京上海新华社中国政府", min_size=1, max_size=5), unique=True, max_size=4)


@given(names, names, names)
def test_entity_answer_round_trip(person, place, org):
    found = {"person": person, "place": place, "org": org}
    answer = entities.format_entity_answer(found)
    assert len(answer.splitlines()) == 3
    assert entities.parse_entity_answer(answer) == found


def test_entity_f1_counts_misses_and_inventions_per_type():
    gold = [{"person": ["钱其琛", "李鹏"], "place": ["伦敦"], "org": []},
            {"person": [], "place": [], "org": ["国务院"]}]
    predicted = [{"person": ["钱其琛"], "place": ["伦敦", "巴黎"], "org": []}, {"person": [], "place": [], "org": []}]
    scores = entities.entity_f1(predicted, gold)
    assert scores["entity_f1_person"] == pytest.approx(2 / 3)  # tp 1, missed 1: 2 / (2 + 0 + 1)
    assert scores["entity_f1_place"] == pytest.approx(2 / 3)  # tp 1, invented 1
    assert scores["entity_f1_org"] == 0.0  # the only org missed
    assert scores["entity_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    assert entities.entity_f1(gold, gold)["entity_f1"] == 1.0


def test_entity_reward_is_the_answers_f1():
    record = chat("句子", "人名：钱其琛\n地名：伦敦\n机构：新华社", task="entity",
                  entities={"person": ["钱其琛"], "place": ["伦敦"], "org": ["新华社"]})
    assert entities.TASK.reward("人名：钱其琛\n地名：伦敦\n机构：新华社", record) == 1.0
    assert entities.TASK.reward("人名：无\n地名：无\n机构：无", record) == 0.0
    # person right (1), place wrong: tp 0, fp 1, fn 1 (0), org right (1)
    assert entities.TASK.reward("人名：钱其琛\n地名：巴黎\n机构：新华社", record) == pytest.approx(2 / 3)
    # person: tp 1, fp 1 -> 2/3; place and org missed
    assert entities.TASK.reward("人名：钱其琛、李鹏", record) == pytest.approx((2 / 3) / 3)
    none = chat("句子", "人名：无\n地名：无\n机构：无", task="entity", entities={"person": [], "place": [], "org": []})
    assert entities.TASK.reward("人名：无\n地名：无\n机构：无", none) == 1.0
    assert entities.TASK.reward("人名：李鹏", none) == pytest.approx(2 / 3)  # an invented person


def test_entity_score_is_micro_f1_over_the_records():
    gold = {"person": ["钱其琛"], "place": [], "org": []}
    records = [chat("a", "", entities=gold), chat("b", "", entities={"person": [], "place": ["伦敦"], "org": []})]
    scores = entities.TASK.score(["人名：钱其琛", "人名：钱其琛"], records)
    # person: tp 1, fp 1 -> 2/3; place: missed -> 0; org: nothing anywhere -> 1
    assert scores == {"entity_f1": pytest.approx((2 / 3 + 0 + 1) / 3), "entity_f1_person": pytest.approx(2 / 3),
                      "entity_f1_place": 0.0, "entity_f1_org": 1.0}


def test_entity_trace_names_each_entity_and_parses_back():
    found = {"person": ["钱其琛"], "place": ["伦敦"], "org": ["新华社"]}
    mentions = [("钱其琛", "person"), ("伦敦", "place"), ("新华社", "org")]
    sentence = entities.Sentence("钱其琛在伦敦会见新华社记者。", found, mentions)
    text = entities.reason_trace(sentence)
    assert think_format.is_think_format(text)
    assert "专有名词共3个" in text and "\n2. “伦敦”是地点的名称，属于地名。\n3. “新华社”" in text
    none = entities.reason_trace(entities.Sentence("他说。", {k: [] for k in found}, []))
    # a sentence without entities goes the same way, and 无 where a name belongs is its trace, not a dead end
    assert none.startswith("<think>\n专有名词共0个，逐个判断类别：\n1. “无”——句中没有人名")
    assert think_format.is_think_format(none) and entities.parse_entity_answer(none) == {k: [] for k in found}
    record = chat("q", text, task="entity_reason", entities=sentence.entities)
    assert entities.REASON_TASK.reward(text, record) == 1.0
    assert entities.REASON_TASK.reward("<think>\n人名：钱其琛\n</think>\n<answer>\n人名：无\n</answer>", record) == 0.0
    assert entities.REASON_TASK.score([text], [record]) == {}  # counted by think_format and distinct2


# ---------------------------------------------------------------------------------------------------------------------
# Arithmetic


def test_identity_is_a_self_introduction_not_a_trace():
    record = chat("请问你到底是谁？", identity.ANSWERS[0], task="identity")
    for answer in ("我是丹炉。", "I'm danlu, a small model.", "I am DANLU", *identity.ANSWERS, *identity.ANSWERS_EN):
        assert identity.TASK.reward(answer, record) == 1.0, answer
    # the distilled model's answer before the reasoning set asked who it is: a trace, whatever it ends with
    for answer in ("<think>\n先算：10-2=8。\n</think>\n<answer>\n答：现在有8个。\n</answer>",
                   "<think>\n我是丹炉\n</think>\n<answer>\n丹炉\n</answer>", "这条评论是正面的。", "我是ChatGPT。", ""):
        assert identity.TASK.reward(answer, record) == 0.0, answer
    assert identity.TASK.score(["我是丹炉。", "我是ChatGPT。"], [record, record]) == {"identity_acc": 0.5}
    assert [r["conversations"][0]["content"] for r in identity.eval_records()] == identity.EVAL_QUESTIONS


def test_parse_arith_answer():
    assert arithmetic.parse_arith_answer(TRACE) == 15
    assert arithmetic.parse_arith_answer("<answer>\n10-3=7\n</answer>") == 7
    assert arithmetic.parse_arith_answer("<answer>\n还剩9") == 9  # generation cut before </answer>
    assert arithmetic.parse_arith_answer("<answer>\n差-3\n</answer>") == -3
    assert arithmetic.parse_arith_answer("<think>12+3=15</think>") is None  # a trace that never reached its answer
    assert arithmetic.parse_arith_answer("<think>\n12+3=15") is None
    assert arithmetic.parse_arith_answer("<answer>不知道</answer>") is None
    assert arithmetic.parse_arith_answer("答：现在有15个苹果。") == 15  # a plain answer is read whole
    assert arithmetic.parse_arith_answer("这条评论是正面的。") is None


def test_arith_reward_and_score():
    record = chat("题目", TRACE, task="arith", answer=15)
    assert arithmetic.TASK.reward(TRACE, record) == 1.0
    assert arithmetic.TASK.reward(TRACE.replace("15个", "16个"), record) == 0.0
    assert arithmetic.TASK.reward("现在有15个苹果。", record) == 1.0  # a plain answer, right
    assert arithmetic.TASK.reward("现在有16个苹果。", record) == 0.0
    # a plain "15" is right, but takes no steps; the question "题目" has no number to copy, TRACE's sums are right
    steps = {"arith_plan": 0.5, "arith_copy": 0.0, "arith_calc": 1.0}
    assert arithmetic.TASK.score([TRACE, "15"], [record, record]) == {"arith_em": 1.0, **steps}
    assert arithmetic.TASK.score([TRACE, "16"], [record, record]) == {"arith_em": 0.5, **steps}


def test_arith_plan_is_the_steps_taken_whatever_the_numbers():
    assert arithmetic.plan(TRACE) == ["-", "+"]
    assert arithmetic.plan("<think>\n有：2×8=31人。走后：9 - 3 = 3人。\n</think>\n<answer>\n12-5=7") == ["×", "-"]
    record = chat("题目", TRACE, task="arith", answer=15)
    wrong_numbers = "<think>\n先算：11-10=12。再加上：12+10=12。\n</think>\n<answer>\n现在有12个。\n</answer>"
    wrong_steps = "<think>\n先算：12+5=17。再加上：17+8=25。\n</think>\n<answer>\n现在有25个。\n</answer>"
    one_step = "<think>\n先算：12-5=7。\n</think>\n<answer>\n现在有7个。\n</answer>"
    assert [arithmetic.TASK.item_metrics(text, record)["arith_plan"] for text in
            (TRACE, wrong_numbers, wrong_steps, one_step, "现在有15个苹果。")] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert arithmetic.TASK.reward(wrong_numbers, record) == 0.0  # the RL reward stays the exact answer


def test_step_counts_count_copying_and_computing_apart():
    count = arithmetic.step_counts
    question = "小华有17颗糖，小强比小华多6颗，小丽比小强少18颗，小丽有几颗糖？"
    reference = "<think>\n小强有：17+6=23。小丽比小强少18颗：23-18=5。\n</think>\n<answer>\n答：5\n</answer>"
    # 23 is the first step's result, not a number to copy; the answer block's equation is not the trace's
    assert count(question, reference + "2+2=5") == dict(equations=2, right=2, digit_facts=0, digit_facts_right=0,
                                                       operands=3, copied=3)
    copied_wrong_sum = "<think>\n小强有：17+6=22。小丽比小强少18颗：22-18=4。\n</think>"  # copies, cannot add
    assert count(question, copied_wrong_sum) == dict(equations=2, right=1, digit_facts=0, digit_facts_right=0,
                                                     operands=3, copied=3)
    made_up = "<think>\n小林有：4×5=12。小林比小林少3个：11-3=8。\n</think>"  # numbers from nowhere, one sum right
    assert count(question, made_up) == dict(equations=2, right=1, digit_facts=1, digit_facts_right=0,
                                            operands=4, copied=0)

    # arith_copy and arith_calc pool the equations of the answers: (3 + 3 + 0) of 10 operands, (2 + 1 + 1) of 6
    record = chat(question, reference, task="arith", answer=5)
    answers = [reference, copied_wrong_sum, made_up, "答：5"]  # the plain answer writes no equation, and is right
    scores = arithmetic.TASK.score(answers, [record] * 4)
    assert scores == pytest.approx({"arith_em": 0.5, "arith_plan": 0.5, "arith_copy": 0.6, "arith_calc": 4 / 6})
    assert arithmetic.TASK.item_metrics("答：5", record) == {"arith_em": 1.0, "arith_plan": 0.0, "arith_copy": 0.0,
                                                             "arith_calc": 0.0}
    # a resample is scored as its own answers: the made-up trace twice copies 0 of 8 operands
    assert arithmetic.TASK.statistic(answers, [record] * 4)([2, 2]) == {"arith_em": 0.0, "arith_plan": 0.0,
                                                                        "arith_copy": 0.0, "arith_calc": 0.5}
    intervals = generation_intervals(arithmetic.TASK, answers * 50, [record] * 200, scores)
    assert intervals["arith_em"] == wilson_interval(100, 200)  # a share of answers
    low, high = intervals["arith_copy"]  # pooled over equations: a bootstrap over the problems
    assert 0.5 < low < 0.6 < high < 0.7


def test_loop_free_tells_a_loop_from_a_trace():
    is_loop = repetition.is_loop
    trace = "<think>\n小强有：17+6=23。小丽比小强少18颗：23-18=5。\n</think>\n<answer>\n答：小丽有5颗糖。\n</answer>"
    assert not is_loop(trace) and not is_loop("这条评论是正面的，属于好评。") and not is_loop("好")
    assert is_loop("人名：无\n地名：" + "美国、" * 20)
    assert repetition.distinct2([trace]) < repetition.distinct2(["这条评论是正面的，属于好评。"]) == 1.0  # tags repeat
    # loop_free counts the loop and not the trace's form; a share of answers, so its interval is Wilson's
    answers = [trace, "这条评论是正面的，属于好评。", "人名：无\n地名：" + "美国、" * 20, "好"]
    assert repetition.LOOPS.score(answers) == {"loop_free": 0.75}
    assert [repetition.LOOPS.reward(a) for a in answers] == [1.0, 1.0, 0.0, 1.0]
    assert check_intervals(repetition.LOOPS, answers, {"loop_free": 0.75}) == {"loop_free": wilson_interval(3, 4)}


@pytest.mark.parametrize("prompt_loss_weight", [0.0, 0.1])
def test_weighted_tokens_pick_the_tokens_copied_from_the_prompt(tmp_path, tokenizer_dir, prompt_loss_weight):
    from dataset.lm_dataset import SFTDataset
    from docs.weighted_tokens import copied_rule

    from .conftest import write_jsonl

    tokenizer = load_tokenizer(tokenizer_dir)
    answer = {"role": "assistant", "content": "王建国有：17+6=23。"}
    chats = [[{"role": "user", "content": "王建国有17颗糖，又买了6颗。"}, answer],
             [{"role": "user", "content": "李明有40颗糖，又买了5颗。"}, answer]]
    data = SFTDataset(str(write_jsonl(tmp_path / "c.jsonl", [{"conversations": c} for c in chats])), tokenizer, 160,
                      quiet=True, prompt_loss_weight=prompt_loss_weight)
    batch = {key: value[None] for key, value in data[0].items()}
    assert batch["segment_ids"].max() == 2  # both conversations packed into one row
    scored = (batch["labels"] != -100) & (batch.get("loss_weights", torch.ones(1)) >= 1)
    targets = batch["labels"][scored].tolist()
    assert tokenizer.decode(targets) == "王建国有：17+6=23。<|im_end|>" * 2

    weights = copied_rule(tokenizer, 4.0)(batch)
    assert set(weights.unique().tolist()) == {1.0, 4.0}
    picked = tokenizer.decode([t for t, w in zip(targets, weights[scored].tolist()) if w == 4.0])
    # the first answer copies the name, 有, the question's numbers and the full stop from its prompt (：, +, = and the
    # computed 23 are not there); the second only 有 and 。 from its own prompt, none of the first's
    assert picked == "王建国有176。" + "有。"


def test_arith_records_are_distinct_and_keep_their_result():
    taken: set[tuple] = set()
    heldout = arithmetic.records(random.Random(1), 30, taken, task="arith")
    training = arithmetic.records(random.Random(1), 30, taken)
    assert len(taken) == 60
    for record in heldout:
        answer = record["conversations"][1]["content"]
        assert record["task"] == "arith" and arithmetic.parse_arith_answer(answer) == record["answer"]
        assert think_format.is_think_format(answer)
    assert all(set(record) == {"conversations"} for record in training)
    plain = arithmetic.records(random.Random(1), 30, taken, reason=False, task="arith")
    assert len(taken) == 90
    for record in plain:
        answer = record["conversations"][1]["content"]
        assert answer.startswith("答：") and "<" not in answer
        assert arithmetic.parse_arith_answer(answer) == record["answer"]


# ---------------------------------------------------------------------------------------------------------------------
# The LoRA task


def test_lora_parse_reward_and_score():
    assert lora_style.parse_verdict("推荐。") == "推荐"
    assert lora_style.parse_verdict(" 不推荐") == "不推荐"
    assert lora_style.parse_verdict("不推荐不推荐") == "不推荐"
    assert lora_style.parse_verdict("推荐还是不推荐") is None  # both named
    assert lora_style.parse_verdict("这条评论是正面的。") is None
    record = chat(lora_style.PROMPTS[0].format(review="很好"), "推荐", task="lora_sentiment", label="推荐")
    assert lora_style.TASK.reward("推荐", record) == 1.0
    assert lora_style.TASK.reward("不推荐", record) == 0.0
    assert lora_style.TASK.reward("正面", record) == 0.0
    assert lora_style.TASK.score(["推荐", "不知道"], [record, record]) == {"lora_acc": 0.5}


# ---------------------------------------------------------------------------------------------------------------------
# Preferences, perplexity


def pair(chosen: str, rejected: str, task: str) -> dict:
    user = [{"role": "user", "content": "问题"}]
    return {"prompt": user, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], "meta": {"task": task}}


def test_preference_score_compares_mean_token_logprobs():
    # pair 1: chosen -2/2 = -1 > rejected -6/2 = -3; pair 2: chosen -3/1 < rejected -1/1
    logps = [(-2.0, 2), (-6.0, 2), (-3.0, 1), (-1.0, 1)]
    assert preference.TASK.score(logps, [{}, {}]) == {"pref_acc": 0.5}


def test_pref_style_acc_counts_only_the_pairs_that_differ_in_style():
    logps = [(-2.0, 2), (-6.0, 2), (-3.0, 1), (-1.0, 1), (-3.0, 1), (-1.0, 1)]
    style = pair("这条评论是正面的，属于好评。", "这条评论是正面的。", "sentiment")
    label = pair("这条评论是正面的，属于好评。", "这条评论是负面的，属于差评。", "sentiment")
    entity = pair("人名：钱其琛\n地名：伦敦\n机构：无", "人名：钱其琛\n地名：无\n机构：无", "entity")
    assert [preference.is_style_pair(p) for p in (style, label, entity)] == [True, False, False]
    assert preference.TASK.score(logps, [style, label, entity]) == {"pref_acc": 1 / 3, "pref_style_acc": 1.0}
    assert preference.TASK.score(logps, [label, style, entity]) == {"pref_acc": 1 / 3, "pref_style_acc": 0.0}


def test_preference_reward_judges_by_the_pairs_task():
    sentiment_pair = pair("这条评论是正面的。", "这条评论是负面的。", "sentiment")
    assert preference.TASK.reward("是正面的", sentiment_pair) == 1.0
    assert preference.TASK.reward("这条评论是负面的。", sentiment_pair) == 0.0
    entity_pair = pair("人名：钱其琛\n地名：伦敦\n机构：无", "人名：无\n地名：伦敦\n机构：无", "entity")
    assert preference.TASK.reward("人名：钱其琛\n地名：伦敦", entity_pair) == 1.0
    assert preference.TASK.reward("人名：无\n地名：伦敦\n机构：无", entity_pair) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="task 'identity'"):
        preference.TASK.reward("我是丹炉", pair("我是丹炉", "我是ChatGPT", "identity"))


def test_preference_pairs_prefer_the_right_answer_in_the_preferred_style():
    rng = random.Random(0)
    kinds = set()
    for _ in range(60):
        record = preference.sentiment_pair(rng, "很好用", "正面", task="sentiment")
        chosen, rejected = record["chosen"][1]["content"], record["rejected"][1]["content"]
        assert chosen == preference.PREFERRED_SENTIMENT["正面"] == "这条评论是正面的，属于好评。" != rejected
        assert record["chosen"][0] == record["rejected"][0] and record["task"] == "sentiment"
        label = sentiment.parse_sentiment_answer(rejected)
        # the same label in another of the styles SFT teaches, the other label, or a loop
        kinds.add("style" if label == "正面" and rejected in sentiment.ANSWERS["正面"] else
                  "label" if label == "负面" else "loop" if rejected.endswith("…") else rejected)
    assert kinds == {"style", "label", "loop"}
    sentence = entities.Sentence("钱其琛在伦敦说。", {"person": ["钱其琛"], "place": ["伦敦"], "org": []},
                                 [("钱其琛", "person"), ("伦敦", "place")])
    names = {"person": ["李鹏"], "place": ["巴黎"], "org": ["新华社"]}
    for _ in range(40):
        record = preference.entity_pair(rng, sentence, names)
        chosen, rejected = record["chosen"][1]["content"], record["rejected"][1]["content"]
        wrong = entities.parse_entity_answer(rejected)
        assert entities.parse_entity_answer(chosen) == sentence.entities != wrong
        # never a missed entity: every one of the sentence's names is still in the rejected answer
        assert rejected.endswith("…") or {"钱其琛", "伦敦"} <= {name for found in wrong.values() for name in found}


def test_perplexity_sequences_and_score(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    [(ids, mask)] = perplexity.TASK.sequences(tokenizer, [{"text": "新华社北京电"}])
    assert ids[0] == ids[-1] == eot and ids[1:-1] == tokenizer("新华社北京电", add_special_tokens=False)["input_ids"]
    assert mask == [0] + [1] * (len(ids) - 1)
    assert perplexity.TASK.score([(-2.0, 2), (-4.0, 2)], [{}, {}]) == {"val_ppl": pytest.approx(math.exp(1.5))}
    with pytest.raises(NotImplementedError, match="no reward"):
        perplexity.TASK.reward("text", {"text": "text"})


# ---------------------------------------------------------------------------------------------------------------------
# Format, repetition


def test_think_format_accepts_only_one_think_then_one_answer():
    good = "<think>\n3×5=15。\n</think>\n<answer>\n有15人。\n</answer>"
    assert good == think_format.trace("3×5=15。", "有15人。")
    variants = [good, good + "\n", good.replace("</think>\n", "</think>\n\n")]
    assert think_format.TASK.score(variants) == {"think_format": 1.0}
    broken = [
        "有15人。",  # no tags
        "<think>\n3×5=15。\n</think>\n有15人。",  # no answer block
        "<think>\n3×5=15。\n</think>\n<answer>\n有15人。",  # cut off before </answer>
        "<think>\n\n</think>\n<answer>\n15\n</answer>",  # empty thinking
        "好的。<think>\n3×5=15。\n</think>\n<answer>\n15\n</answer>",  # text before <think>
        good + "还有别的话",  # text after </answer>
        good.replace("\n</answer>", "\n</think>\n<answer>\n15\n</answer>"),  # a second block inside the answer
        "<think>\n<think>\n3×5=15。\n</think>\n<answer>\n15\n</answer>",  # <think> twice
    ]
    assert think_format.TASK.score(broken) == {"think_format": 0.0}
    assert think_format.TASK.score([good, broken[0]]) == {"think_format": 0.5}
    assert think_format.TASK.reward(good) == 1.0 and think_format.TASK.reward(broken[2]) == 0.0


def test_answer_block():
    assert think_format.answer_block(TRACE) == "\n现在有15个苹果。\n"
    assert think_format.answer_block("<answer>a</answer><answer>b") == "b"  # the last block, even unclosed
    assert think_format.answer_block("no block") is None


def test_distinct2_is_low_for_repetition():
    assert repetition.distinct2(["这条评论是正面的。"]) == 1.0
    assert repetition.distinct2(["的的的的的"]) == pytest.approx(1 / 4)  # 4 bigrams, all "的的"
    assert repetition.distinct2(["新闻新闻新闻"]) == pytest.approx(2 / 5)  # 新闻, 闻新
    assert repetition.distinct2(["的的的的的", "好", ""]) == pytest.approx(1 / 4)  # too short to count: skipped
    assert repetition.TASK.score(["好", ""]) == {"distinct2": 1.0}
    assert repetition.TASK.reward("这条评论是正面的。") == 1.0
    assert repetition.TASK.reward("的的的的的") == pytest.approx(1 / 4)
    assert repetition.TASK.reward("好") == 1.0
