"""eval_model.py: which models and held-out records it takes, batched generation and scoring against one-by-one
runs, and the CLI end to end on tiny models and a tiny demo-shaped eval folder (the tasks' own parsers and scores
are tested in test_evals.py)."""

import json
import math
from pathlib import Path

import pytest
import torch

import eval_model
from dataset.errors import UsageError
from dataset.tokenizer import load_tokenizer, save_tokenizer
from evals import LIKELIHOOD_TASKS, TASKS, lora_style
from model import LM, LMConfig
from model.lora import apply_lora, lora_layers, save_lora
from tests.conftest import run_script, write_jsonl

CPU = eval_model.Runner(torch.device("cpu"), torch.float32, batch_size=4)


def chat(user: str, assistant: str, **meta) -> dict:
    return {"conversations": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}], **meta}


def demo_folder(root: Path) -> Path:
    """A few held-out records of every task, shaped as dataset/demo writes them."""
    root.mkdir()
    entities = {"person": ["钱其琛"], "place": ["伦敦"], "org": []}
    write_jsonl(root / "pretrain_val.jsonl", [{"text": "新华社北京一月一日电，国务院召开会议。"},
                                              {"text": "林业部部长指出，保护湿地资源迫在眉睫。"}])
    write_jsonl(root / "sft_eval.jsonl", [
        chat("下面这条评论是正面的还是负面的？\n房间干净，服务热情。", "这条评论是正面的。",
             task="sentiment", label="正面"),
        chat("判断这条评论的情感倾向（正面/负面）：太差了，再也不来。", "这条评论是负面的。",
             task="sentiment", label="负面"),
        chat("请找出下面这句话中的人名、地名和机构名：\n钱其琛在伦敦说。", "人名：钱其琛\n地名：伦敦\n机构：无",
             task="entity", entities=entities),
        chat("你是谁？", "我是丹炉。", task="identity"),
    ])
    write_jsonl(root / "reason_eval.jsonl", [
        chat("教室里有3排座位，每排坐5人，现在有几人？", "<think>\n3×5=15。\n</think>\n<answer>\n有15人。\n</answer>",
             task="arith", answer=15),
        chat("请找出下面这句话中的人名、地名和机构名：\n钱其琛在伦敦说。",
             "<think>\n钱其琛是人名。\n</think>\n<answer>\n人名：钱其琛\n地名：伦敦\n机构：无\n</answer>",
             task="entity_reason", entities=entities),
    ])
    write_jsonl(root / "identity_eval.jsonl", [chat("请问你到底是谁？", "我是丹炉。", task="identity")])
    write_jsonl(root / "lora_eval.jsonl", [
        chat(lora_style.PROMPTS[0].format(review="很好"), "推荐", task="lora_sentiment", label="推荐")])
    user = {"role": "user", "content": "这条评论呢？很好"}
    write_jsonl(root / "dpo_eval.jsonl", [
        {"chosen": [user, {"role": "assistant", "content": "这条评论是正面的。"}],
         "rejected": [user, {"role": "assistant", "content": "这条评论是负面的。"}], "task": "sentiment"},
        {"chosen": [user, {"role": "assistant", "content": "这条评论是正面的，属于好评。"}],  # a style pair
         "rejected": [user, {"role": "assistant", "content": "这条评论是正面的。"}], "task": "sentiment"}])
    return root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """Random `tiny` models: a base and a chat model (names decide which), a LoRA adapter on the chat model."""
    root = tmp_path_factory.mktemp("eval")
    tokenizer = load_tokenizer(tokenizer_dir)
    paths = {}
    for seed, name in enumerate(("pretrain", "sft")):
        torch.manual_seed(seed)
        # A wide initialisation, so that greedy answers differ from prompt to prompt.
        config = LMConfig.from_preset("tiny", vocab_size=len(tokenizer), initializer_range=0.3)
        LM(config).save_pretrained(root / name)
        save_tokenizer(tokenizer, root / name)
        paths[name] = root / name
    adapted = apply_lora(LM.from_pretrained(paths["sft"]), r=4, alpha=8)
    with torch.no_grad():
        for layer in lora_layers(adapted).values():
            layer.lora_B.weight.normal_(std=0.1)
    save_lora(adapted, root / "lora", base_model_path=str(paths["sft"]))
    paths["lora"] = root / "lora"
    paths["data"] = demo_folder(root / "demo")
    return paths


# ---------------------------------------------------------------------------------------------------------------------
# Which models, which records


def test_model_list_and_base_or_chat(tmp_path, checkpoints):
    assert eval_model.parse_model_list("sft=out/sft, dpo=out/dpo,out/distill") == [
        ("sft", "out/sft"), ("dpo", "out/dpo"), ("distill", "out/distill")]
    assert not eval_model.model_spec("pretrain", checkpoints["pretrain"]).chat
    assert eval_model.model_spec("sft", checkpoints["sft"]).chat
    spec = eval_model.model_spec("lora", checkpoints["lora"])
    assert (spec.path, spec.adapter, spec.chat) == (checkpoints["sft"], checkpoints["lora"], True)
    (tmp_path / "args.json").write_text(json.dumps({"stage": "pretrain"}))
    assert not eval_model.is_chat_model("anything", tmp_path)  # args.json outranks the name


def test_default_models_are_the_stages_found_in_out(tmp_path, checkpoints, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="no checkpoints found .*out/pretrain, out/sft, out/lora, out/dpo"):
        eval_model.resolve_models(eval_model.parse_args([]))
    (tmp_path / "out").mkdir()
    for name in ("sft", "pretrain"):
        (tmp_path / "out" / name).symlink_to(checkpoints[name])
    specs = eval_model.resolve_models(eval_model.parse_args([]))
    assert [(s.name, s.path, s.chat) for s in specs] == [("pretrain", Path("out/pretrain"), False),
                                                          ("sft", Path("out/sft"), True)]


def test_dtype_takes_the_stages_spellings():
    assert [eval_model.parse_args(["--dtype", name]).dtype for name in ("float32", "BF16", "float16", "auto")] == [
        "fp32", "bf16", "fp16", "auto"]
    with pytest.raises(SystemExit):
        eval_model.parse_args(["--dtype", "int8"])


def test_eval_sets_are_each_tasks_records(checkpoints, tmp_path):
    with pytest.raises(UsageError, match=r"holds none of the held-out files \(dpo_eval.jsonl, .*sft_eval.jsonl"):
        eval_model.load_eval_sets(tmp_path, limit=0)  # an empty folder scores nothing: said, not a table of dashes
    with pytest.raises(UsageError, match="is not a folder"):
        eval_model.load_eval_sets(tmp_path / "nope", limit=0)
    sets = eval_model.load_eval_sets(checkpoints["data"], limit=0)
    assert {name: len(records) for name, records in sets.items()} == {
        "sentiment": 2, "entity": 1, "identity": 1, "arith": 1, "entity_reason": 1, "lora": 1, "news": 2,
        "pref": 2}
    assert sets["arith"][0]["meta"] == {"task": "arith", "answer": 15}
    assert {name: len(records) for name, records in eval_model.load_eval_sets(checkpoints["data"], 1).items()} == {
        "sentiment": 1, "entity": 1, "identity": 1, "arith": 1, "entity_reason": 1, "lora": 1, "news": 1,
        "pref": 1}


def test_table_has_a_column_per_model_and_dashes_for_missing():
    table = eval_model.format_table({"pretrain": {"val_ppl": 123.456, "sentiment_acc": 0.0},
                                     "sft": {"val_ppl": 45.6, "sentiment_acc": 0.875, "lora_acc": 0.5}})
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "pretrain", "sft"]
    assert lines[1].split() == ["val_ppl", "123.46", "45.60"]
    assert lines[2].split() == ["sentiment_acc", "0.000", "0.875"]
    assert lines[3].split() == ["lora_acc", "-", "0.500"]


# ---------------------------------------------------------------------------------------------------------------------
# Batched model runs agree with one-at-a-time runs


def test_left_padded_batches_generate_what_single_prompts_do(checkpoints):
    model, tokenizer = eval_model.load_model(eval_model.model_spec("sft", checkpoints["sft"]), torch.device("cpu"))
    texts = ("你好", "请找出下面这句话中的人名：钱其琛在伦敦说。", "1+1=?", "这条评论是正面还是负面的？很好")
    prompts = [eval_model.chat_prompt_ids(tokenizer, [{"role": "user", "content": text}]) for text in texts]
    batched = eval_model.generate(model, tokenizer, prompts, 12, CPU, repetition_penalty=1.1)
    alone = [eval_model.generate(model, tokenizer, [p], 12, CPU, repetition_penalty=1.1)[0] for p in prompts]
    assert batched == alone
    assert len(set(batched)) > 1


def test_perplexity_and_preference_match_direct_computation(checkpoints):
    model, tokenizer = eval_model.load_model(eval_model.model_spec("sft", checkpoints["sft"]), torch.device("cpu"))
    texts = ["新华社北京一月一日电，国务院召开会议。", "好"]
    ppl = eval_model.likelihood_metrics(model, tokenizer, TASKS["news"], [{"text": t} for t in texts], CPU)["val_ppl"]
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    total_nll, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([[eot, *tokenizer(text)["input_ids"], eot]])
        with torch.no_grad():
            total_nll += float(model(ids, labels=ids).loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    assert ppl == pytest.approx(math.exp(total_nll / count), rel=1e-4)

    prompt = [{"role": "user", "content": "这条评论呢？很好"}]
    pair = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "正面"}],
            "rejected": [{"role": "assistant", "content": "这条评论是负面的，属于差评。"}]}
    swapped = {**pair, "chosen": pair["rejected"], "rejected": pair["chosen"]}
    # Each answer's summed log-prob over its tokens and <|im_end|>, after the rendered question (not the question's).
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    direct = []
    for side in ("chosen", "rejected"):
        question = eval_model.chat_prompt_ids(tokenizer, prompt)
        answer = [*tokenizer(pair[side][0]["content"])["input_ids"], im_end]
        ids = torch.tensor([question + answer])
        with torch.no_grad():
            logps = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        direct.append((sum(float(logps[len(question) - 1 + i, t]) for i, t in enumerate(answer)), len(answer)))
    scored = eval_model.scored_logps(model, TASKS["pref"].sequences(tokenizer, [pair]), CPU)
    assert [count for _, count in scored] == [count for _, count in direct]
    assert [total for total, _ in scored] == pytest.approx([total for total, _ in direct], abs=1e-3)
    chosen_wins = direct[0][0] / direct[0][1] > direct[1][0] / direct[1][1]
    pref = TASKS["pref"]
    assert eval_model.likelihood_metrics(model, tokenizer, pref, [pair], CPU) == {"pref_acc": float(chosen_wins)}
    assert eval_model.likelihood_metrics(model, tokenizer, pref, [swapped], CPU) == {"pref_acc": float(not chosen_wins)}
    assert eval_model.likelihood_metrics(model, tokenizer, pref, [pair, swapped], CPU) == {"pref_acc": 0.5}


# ---------------------------------------------------------------------------------------------------------------------
# The command line


@pytest.mark.slow
def test_cli_metrics_json_and_side_by_side(checkpoints, tmp_path):
    out = tmp_path / "eval.json"
    models = f"pretrain={checkpoints['pretrain']},sft={checkpoints['sft']}"
    result = run_script("eval_model.py", "--models", models, "--lora", f"lora={checkpoints['lora']}", "--metrics",
                        "--json", out, "--data_dir", checkpoints["data"], "--limit", "3", "--dtype", "fp32",
                        "--max_new_tokens", "6", "--threads", "1", "--prompts", "你好",
                        "--text_prompts", "新华社北京一月一日电")
    results = json.loads(out.read_text())
    assert list(results) == ["pretrain", "sft", "lora"]
    likelihood = {metric for task in LIKELIHOOD_TASKS for metric in task.metrics}
    references = {"sft": "pretrain", "lora": "sft"}  # each stage against the stage it starts from
    for name, row in results.items():
        metrics = {key: value for key, value in row.items() if key in eval_model.METRICS}
        expected = [m for m in eval_model.METRICS if name != "pretrain" or m in likelihood]
        assert list(metrics) == expected, name  # the values keep their keys; intervals are added; a base model gets
        # the likelihood metrics only (it cannot answer a chat question: no generation spent on zeros)
        added = {f"{metric}_ci" for metric in metrics}
        if name in references:  # the paired changes, on the metrics both models have
            reference = results[references[name]]
            compared = [m for m in metrics if m in reference]
            added |= {"compared_with"} | {f"{m}_change" for m in compared}
            assert row["compared_with"] == references[name]
            for m in compared:
                change, low, high = row[f"{m}_change"]
                assert change == pytest.approx(metrics[m] - reference[m], abs=1e-5), (name, m)
                assert low - 1e-6 <= change <= high + 1e-6, (name, m)
        assert set(row) - set(metrics) == added, name  # no answer_kind: the prompts are the test's own
        assert metrics["val_ppl"] > 1
        assert all(0 <= value <= 1 for metric, value in metrics.items() if metric != "val_ppl"), metrics
        assert all(row[f"{m}_ci"][0] - 1e-6 <= value <= row[f"{m}_ci"][1] + 1e-6 for m, value in metrics.items()), row
    assert results["lora"]["val_ppl"] != results["sft"]["val_ppl"]  # the adapter was applied

    stdout = result.stdout
    assert "== 1. 你好" in stdout and "== 2. 新华社北京一月一日电   (raw text: every model continues it)" in stdout
    assert stdout.count("[pretrain]") == 2 and stdout.count("[lora]") == 2
    header, changes = [line for line in stdout.splitlines() if line.startswith("metric")]
    assert header.split() == ["metric", "pretrain", "sft", "lora"]
    assert changes.split() == ["metric", "sft", "-", "pretrain", "lora", "-", "sft"]
    for metric in eval_model.METRICS:
        assert any(line.split()[:1] == [metric] for line in stdout.splitlines()), metric
    assert "lora (" in result.stderr and "on " + str(checkpoints["sft"]) in result.stderr


def test_missing_or_wrong_model_dirs_are_clear_errors(tmp_path, checkpoints):
    with pytest.raises(UsageError, match=r"model sft: .*nope does not exist"):
        eval_model.resolve_models(eval_model.parse_args(["--models", f"sft={tmp_path / 'nope'}"]))
    with pytest.raises(UsageError, match="neither config.json nor adapter_config.json"):
        eval_model.resolve_models(eval_model.parse_args(["--models", f"x={checkpoints['data']}"]))
    with pytest.raises(UsageError, match="base model .*elsewhere is not a checkpoint"):
        eval_model.resolve_models(eval_model.parse_args(["--lora", str(checkpoints["lora"]),
                                                         "--base", str(tmp_path / "elsewhere")]))
    with pytest.raises(UsageError, match="model names must differ"):
        eval_model.resolve_models(eval_model.parse_args(["--models", f"{checkpoints['sft']},{checkpoints['sft']}"]))
