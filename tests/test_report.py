"""The report card: evals/report.py's page and PNG from stage directories, and `eval_model.py --report` end to end
on tiny checkpoints."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from evals.report import change_cell, cpu_model, environment, metric_cell, write_report
from tests.conftest import run_script, tiny_checkpoint, write_jsonl

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def stage_dir(root: Path, name: str, losses: list[float]) -> Path:
    """A directory as a stage leaves it: summary.json and metrics.jsonl (log rows and one validation row)."""
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    rows = [{"step": 10 * (i + 1), "loss": loss, "lr": 1e-3, "tokens_per_sec": 9000.0} for i, loss in enumerate(losses)]
    rows.append({"step": 10 * len(losses), "val_loss": losses[-1] + 0.1, "val_ppl": 2.0})
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "summary.json").write_text(json.dumps({"stage": name, "steps": 10 * len(losses), "tokens": 123456,
                                                        "seconds": 12.5, "tokens_per_sec": 9876, "final_loss": 4.25,
                                                        "val_loss": 4.5}))
    return directory


def test_cells_and_environment():
    assert metric_cell("val_ppl", 612.34, (590.2, 640.9)) == "612.34 [590, 641]"
    assert metric_cell("sentiment_acc", 0.7, (0.646, 0.749)) == "0.700 [0.65, 0.75]"
    assert metric_cell("sentiment_acc", None) == "-"
    assert change_cell("sentiment_acc", (0.05, (0.021, 0.08))) == "+0.050 [+0.02, +0.08]*"  # leaves out 0
    assert change_cell("sentiment_acc", (-0.02, (-0.05, 0.01))) == "-0.020 [-0.05, +0.01]"  # noise
    assert change_cell("val_ppl", (-0.3, (-0.44, -0.12)), "**{}**") == "**-0.3 [-0.4, -0.1]**"
    assert change_cell("val_ppl", None) == "-"
    assert cpu_model() not in ("", None)
    env = environment(torch.device("cpu"), torch.bfloat16)
    assert env["torch"] == torch.__version__ and env["eval device / precision"] == "cpu / bfloat16"


def test_report_page_and_loss_panels(tmp_path):
    models = {"pretrain": stage_dir(tmp_path, "pretrain", [8.0, 6.0, 5.0]),
              "sft": stage_dir(tmp_path, "sft", [3.0, 2.0]), "other": tmp_path / "no_summary"}
    prompts = ["下面这条评论是正面的还是负面的？\n很好", "你是谁？"]
    png = write_report(tmp_path / "out" / "report.md", models=models, environment={"CPU": "Test CPU"},
                       results={"pretrain": {"sentiment_acc": 0.0}, "sft": {"sentiment_acc": 0.8},
                                "other": {"sentiment_acc": 0.5}},
                       intervals={"pretrain": {"sentiment_acc": (0.0, 0.0126)}, "sft": {"sentiment_acc": (0.75, 0.84)},
                                  "other": {}},
                       items={"sentiment": 300}, prompts=prompts, text_prompts=["新华社北京电"],
                       answers={"pretrain": ["很好很好", "你是", "（记者张）"],
                                "sft": ["这条评论是正面的。", "我是丹炉。", "（记者王）"], "other": ["", "x", "y"]},
                       kinds={"sft": {prompts[0]: True}, "other": {prompts[0]: False}},
                       kind_names={prompts[0]: "a sentiment label"},
                       changes={"sft": ("pretrain", {"sentiment_acc": (0.8, (0.75, 0.84))}),
                                "other": ("sft", {"sentiment_acc": (-0.3, (-0.35, 0.01))})})
    assert png == tmp_path / "out" / "report.png" and png.read_bytes().startswith(PNG_MAGIC)
    page = (tmp_path / "out" / "report.md").read_text()
    for heading in ("## Environment", "## Stages", "## Held-out metrics", "## What each stage changed",
                    "## Side-by-side answers"):
        assert heading in page
    assert "| metric (change, 95% interval) | sft - pretrain | other - sft |" in page
    assert "| sentiment_acc | **+0.800 [+0.75, +0.84]** | -0.300 [-0.35, +0.01] |" in page  # bold: beyond the noise
    assert "- CPU: Test CPU" in page and "![loss curves](report.png)" in page
    assert "| pretrain | " + str(models["pretrain"]) + " | 30 | 12 | 123,456 | 9,876 | 4.250 | 4.500 |" in page
    assert "| other | " + str(models["other"]) + " | - | - | - | - | - | - |" in page
    assert "| sentiment_acc | 0.000 [0.00, 0.01] | 0.800 [0.75, 0.84] | 0.500 |" in page
    assert "| answer_kind | - | 1/1 | 0/1 |" in page
    assert "| sft | 这条评论是正面的。 | right kind |" in page and "| other | (nothing) | wrong kind |" in page
    # the text prompt comes last, marked, with no kind verdict
    assert "**3.** 新华社北京电 (raw text: every model continues it, chat models too)" in page
    assert "| sft | （记者王） |  |" in page


def test_reward_accuracy_and_rl_gain_are_reported(tmp_path):
    reward, grpo, sft = tmp_path / "reward", tmp_path / "grpo", tmp_path / "sft"
    for directory, summary in ((reward, {"val_accuracy": 0.667, "val_margin": 0.5}),
                               (grpo, {"start_pass@1": 0.48, "start_pass@1_ci95": 0.037, "end_pass@1": 0.696,
                                       "end_pass@1_ci95": 0.037, "gain_pass@1": 0.216, "gain_pass@1_ci95": 0.038}),
                               (sft, {"steps": 3})):
        directory.mkdir()
        (directory / "summary.json").write_text(json.dumps(summary))
    write_report(tmp_path / "r.md", models={"sft": sft, "grpo": grpo}, environment={}, results={"sft": {}, "grpo": {}},
                 intervals={}, items={}, prompts=["你好"], answers={"sft": ["好"], "grpo": ["好"]}, kinds={},
                 kind_names={}, scorers={"reward": reward})
    page = (tmp_path / "r.md").read_text()
    section = page.split("## Reward model and RL")[1].split("## Side-by-side answers")[0]
    assert f"- reward ({reward}): held-out pair accuracy 0.667" in section
    assert f"- grpo ({grpo}): held-out pass@1 of sampled answers 0.480 ± 0.037 before RL, 0.696 ± 0.037 after " \
           "(paired gain +0.216 ± 0.038, 95%)" in section
    assert "- sft" not in section


def test_no_metrics_jsonl_no_png(tmp_path):
    png = write_report(tmp_path / "r.md", models={"x": tmp_path}, environment={}, results={"x": {}},
                       intervals={"x": {}}, items={}, prompts=["你好"], answers={"x": ["好"]}, kinds={}, kind_names={})
    assert png is None and not (tmp_path / "r.png").exists() and (tmp_path / "r.md").is_file()


@pytest.mark.slow
def test_cli_report(tmp_path, tokenizer_dir):
    base = tiny_checkpoint(tokenizer_dir, tmp_path / "pretrain")
    stage_dir(tmp_path, "pretrain", [7.0, 6.5])
    (base / "args.json").write_text(json.dumps({"stage": "pretrain"}))
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "pretrain_val.jsonl", [{"text": "新华社北京一月一日电"}, {"text": "国务院召开会议"}])
    write_jsonl(data / "sft_eval.jsonl", [
        {"conversations": [{"role": "user", "content": "这条评论是正面还是负面？很好"},
                           {"role": "assistant", "content": "这条评论是正面的。"}], "task": "sentiment",
         "label": "正面"}])
    chat = shutil.copytree(base, tmp_path / "sft")  # the same weights, as a chat model
    (chat / "args.json").write_text(json.dumps({"stage": "sft"}))
    report = tmp_path / "card" / "report.md"
    result = run_script("eval_model.py", "--models", f"pretrain={base},chat={chat}", "--report", report,
                        "--data_dir", data, "--dtype", "fp32", "--max_new_tokens", "4", "--threads", "1",
                        "--ci_draws", "50")
    page = report.read_text()
    assert (tmp_path / "card" / "report.png").read_bytes().startswith(PNG_MAGIC)
    assert "| pretrain | " in page and "| 20 | 12 | 123,456 | 9,876 |" in page
    assert "val_ppl" in page and "sentiment_acc" in page and "answer_kind" in page
    assert f"wrote {report}" in result.stdout
    # The same weights as a chat model: its chat prompts get the chat template, the raw-text prompt does not, so its
    # continuation of the news opener is the base model's
    raw = page[page.index("新华社北京一月一日电 (raw text"):]
    rows = {line.split(" | ")[0]: line.split(" | ")[1] for line in raw.splitlines() if line.startswith("| pretrain |")
            or line.startswith("| chat |")}
    assert rows["| pretrain"] == rows["| chat"], rows
    header = next(line for line in result.stdout.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "pretrain", "chat"]
