"""The report card (`eval_model.py --report`): one Markdown page and one PNG that say what a run of the stages did.

    out/report.md    the machine, each stage's time, tokens and tokens/s (its summary.json), the held-out metrics
                     with 95% intervals, how many side-by-side answers were of the right kind, and the answers
    out/report.png   every stage's loss curve (its metrics.jsonl), one small panel per stage

eval_model.py computes the numbers; this module only reads the stages' own files and writes.
"""

import json
import math
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

from dataset.io import atomic_path, atomic_write_text
from evals import METRICS
from evals.anchors import COLUMN as ANCHORS
from evals.intervals import Interval

__all__ = ["Change", "Interval", "beyond_noise", "change_cell", "changes_rows", "environment", "format_interval",
           "metric_cell", "stage_summary", "write_report"]


# ---------------------------------------------------------------------------------------------------------------------
# Cells


def format_value(metric: str, value: float) -> str:
    """val_ppl with 2 decimals (it is in the hundreds), shares with 3."""
    return f"{value:.2f}" if metric == "val_ppl" else f"{value:.3f}"


def format_interval(metric: str, interval: Interval) -> str:
    """`[low, high]`, one digit less than the value (the interval is itself an estimate)."""
    low, high = interval
    if metric == "val_ppl":
        return f"[{low:.0f}, {high:.0f}]" if high >= 100 else f"[{low:.1f}, {high:.1f}]"
    return f"[{low:.2f}, {high:.2f}]"


def metric_cell(metric: str, value: float | None, interval: Interval | None = None) -> str:
    """`0.700 [0.65, 0.75]`, or the value alone without an interval, `-` without a value."""
    if value is None:
        return "-"
    text = format_value(metric, value)
    return text if interval is None else f"{text} {format_interval(metric, interval)}"


Change = tuple[float, Interval]  # a metric's change from one model to another and its paired 95% interval


def beyond_noise(interval: Interval) -> bool:
    """Whether a change's interval leaves out 0: a change another draw of the held-out items would not undo."""
    return interval[0] > 0 or interval[1] < 0


def change_cell(metric: str, change: Change | None, marked: str = "{}*") -> str:
    """`+0.050 [+0.02, +0.08]*`: the change and its interval, put in `marked` when the interval leaves out 0; `-`
    without a change."""
    if change is None:
        return "-"
    value, (low, high) = change
    if metric == "val_ppl":
        text = f"{value:+.1f} [{low:+.1f}, {high:+.1f}]"
    else:
        text = f"{value:+.3f} [{low:+.2f}, {high:+.2f}]"
    return marked.format(text) if beyond_noise((low, high)) else text


def changes_rows(changes: dict[str, tuple[str, dict[str, Change]]],
                 marked: str = "{}*") -> tuple[list[str], list[list[str]]]:
    """(column headers `model - reference`, one row per metric with a change): the paired-change table's cells."""
    header = [f"{name} - {reference}" for name, (reference, _) in changes.items()]
    rows = [[metric] + [change_cell(metric, found.get(metric), marked) for _, found in changes.values()]
            for metric in METRICS if any(metric in found for _, found in changes.values())]
    return header, rows


# ---------------------------------------------------------------------------------------------------------------------
# What ran where


def cpu_model() -> str:
    """The CPU's model name: lscpu's "Model name", else /proc/cpuinfo's "model name", else platform's guess."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        found = re.search(r"^Model name:\s*(.+)$", out, re.MULTILINE)
        if found:
            return found.group(1).strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        if found:
            return found.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment(device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    """The machine and software the evaluation ran on (the stages' own runs say theirs in args.json)."""
    env = {
        "CPU": cpu_model(),
        "CPU cores (os.cpu_count)": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "Python": platform.python_version(),
        "eval device / precision": f"{device} / {str(dtype).removeprefix('torch.')}",
    }
    if torch.cuda.is_available():
        env["GPU"] = torch.cuda.get_device_name(0)
    return env


def stage_summary(directory: Path) -> dict | None:
    """A stage's summary.json (time, tokens, tokens/s, final losses), None when it has none."""
    path = Path(directory) / "summary.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def loss_rows(directory: Path) -> list[dict]:
    """The rows of a stage's metrics.jsonl (none when it has none; a torn last line is skipped)."""
    rows = []
    path = Path(directory) / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def plot_loss_curves(models: dict[str, Path], png: Path) -> bool:
    """One panel per stage with a metrics.jsonl: training loss against step, validation loss as dots. False when no
    stage has one (no file is written)."""
    curves = {name: loss_rows(directory) for name, directory in models.items()}
    curves = {name: rows for name, rows in curves.items() if any("loss" in r or "val_loss" in r for r in rows)}
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(curves))
    lines = math.ceil(len(curves) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(4 * columns, 3 * lines), dpi=100, squeeze=False)
    for ax, (name, rows) in zip(axes.flat, curves.items()):
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r and math.isfinite(r["loss"])]
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r and math.isfinite(r["val_loss"])]
        if train:
            ax.plot(*zip(*train), linewidth=1, label="train")
        if val:
            ax.plot(*zip(*val), "o-", markersize=3, label="validation")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(curves):]:
        ax.axis("off")
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------------------------------
# The page


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_cell(summary: dict, key: str, fmt: str) -> str:
    value = summary.get(key)
    return fmt.format(value) if isinstance(value, int | float) and not isinstance(value, bool) else "-"


def stages_table(models: dict[str, Path]) -> str:
    """Each model's training run from its summary.json: steps, seconds, tokens, tokens/s, last losses."""
    rows = []
    for name, directory in models.items():
        s = stage_summary(directory) or {}
        cells = [summary_cell(s, key, fmt) for key, fmt in (("steps", "{:,}"), ("seconds", "{:,.0f}"),
                                                            ("tokens", "{:,}"), ("tokens_per_sec", "{:,.0f}"),
                                                            ("final_loss", "{:.3f}"), ("val_loss", "{:.3f}"))]
        rows.append([name, str(directory), *cells])
    return markdown_table(["stage", "directory", "steps", "seconds", "tokens", "tokens/s", "last train loss",
                           "val loss"], rows)


def metrics_table(results: dict[str, dict[str, float]], intervals: dict[str, dict[str, Interval]],
                  kinds: dict[str, dict[str, bool]]) -> str:
    names = list(results)
    rows = [[metric] + [metric_cell(metric, results[n].get(metric), intervals.get(n, {}).get(metric)) for n in names]
            for metric in METRICS if any(metric in results[n] for n in names)]
    if any(kinds.values()):
        rows.append(["answer_kind"] + [f"{sum(kinds[n].values())}/{len(kinds[n])}" if kinds.get(n) else "-"
                                       for n in names])
    return markdown_table(["metric (95% interval)"] + names, rows)


def changes_section(changes: dict[str, tuple[str, dict[str, Change]]]) -> list[str]:
    if not changes:
        return []
    header, rows = changes_rows(changes, marked="**{}**")
    return [
        "## What each stage changed",
        "",
        "Each model against the one it starts from, on the same held-out items: the change in each metric and its "
        "95% interval from a paired bootstrap (both models get the same resampled items). **Bold**: the interval "
        "leaves out 0, a change beyond the noise of the items. val_ppl is better lower; an adapter (LoRA) answers "
        "every prompt as its one task, so its other tasks fall to 0 by design (its base is unchanged).",
        "",
        markdown_table(["metric (change, 95% interval)"] + header, rows),
        "",
    ]


def answers_section(prompts: list[str], answers: dict[str, list[str]], kinds: dict[str, dict[str, bool]],
                    kind_names: dict[str, str], text_prompts: list[str] = ()) -> str:
    parts = []
    for i, prompt in enumerate([*prompts, *text_prompts]):
        if i >= len(prompts):
            asks = " (raw text: every model continues it, chat models too)"
        else:
            asks = f" (asks for {kind_names[prompt]})" if prompt in kind_names else ""
        parts.append(f"**{i + 1}.** {prompt.replace(chr(10), ' / ')}{asks}\n")
        rows = []
        for name, texts in answers.items():
            verdict = kinds.get(name, {}).get(prompt)
            mark = "" if verdict is None else ("right kind" if verdict else "wrong kind")
            rows.append([name, texts[i].strip().replace("\n", " / ") or "(nothing)", mark])
        parts.append(markdown_table(["model", "answer", ""], rows) + "\n")
    return "\n".join(parts)


def reward_and_rl_section(models: dict[str, Path], scorers: dict[str, Path]) -> list[str]:
    """What the summaries of reward models and RL runs say about held-out data: pair accuracy; sampled pass@1 before
    and after RL (train_grpo.py / train_ppo.py --pass_at_k) with the paired gain. No lines when there is neither."""
    lines = []
    for name, directory in scorers.items():
        s = stage_summary(directory) or {}
        if "val_accuracy" in s:
            lines.append(f"- {name} ({directory}): held-out pair accuracy {s['val_accuracy']:.3f} (chosen scored above "
                         f"rejected; mean margin {s.get('val_margin', float('nan')):.3f})")
    for name, directory in models.items():
        s = stage_summary(directory) or {}
        if "end_pass@1" in s:
            line = f"- {name} ({directory}): held-out pass@1 of sampled answers"
            if "start_pass@1" in s:
                line += f" {s['start_pass@1']:.3f} ± {s['start_pass@1_ci95']:.3f} before RL,"
            line += f" {s['end_pass@1']:.3f} ± {s['end_pass@1_ci95']:.3f} after"
            if "gain_pass@1" in s:
                line += f" (paired gain {s['gain_pass@1']:+.3f} ± {s['gain_pass@1_ci95']:.3f}, 95%)"
            lines.append(line)
    return ["## Reward model and RL", "", *lines, ""] if lines else []


def write_report(path: str | Path, *, models: dict[str, Path], environment: dict[str, str],
                 results: dict[str, dict[str, float]], intervals: dict[str, dict[str, Interval]],
                 items: dict[str, int], prompts: list[str], answers: dict[str, list[str]],
                 kinds: dict[str, dict[str, bool]], kind_names: dict[str, str], text_prompts: list[str] = (),
                 scorers: dict[str, Path] | None = None,
                 changes: dict[str, tuple[str, dict[str, Change]]] | None = None) -> Path | None:
    """Write the report card to `path` and its loss curves to `path` with .png; returns the PNG's path (None when no
    model has a metrics.jsonl). `models` are the directories (an adapter's own directory for LoRA); `scorers` reward
    model directories, whose held-out pair accuracy the card reports; `changes` {model: (the model it is compared
    with, {metric: paired change})}, the table of what each stage changed. `answers` hold each model's answers to
    `prompts`, then to `text_prompts` (raw text for every model)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    png = path.with_suffix(".png")
    has_png = plot_loss_curves(models, png)
    counts = ", ".join(f"{task} {n}" for task, n in items.items())
    page = [
        "# danlu report card",
        "",
        "## Environment",
        "",
        *(f"- {key}: {value}" for key, value in environment.items()),
        "",
        "## Stages",
        "",
        stages_table(models),
        "",
    ]
    if has_png:
        page += [f"![loss curves]({png.name})", ""]
    page += [
        "## Held-out metrics",
        "",
        f"Items per task: {counts}. 95% intervals: Wilson for shares of right answers (sentiment_acc, identity_acc, "
        "arith_em, arith_plan, lora_acc, think_format, loop_free), percentile bootstrap over items for the rest "
        "(entity_f1 over sentences, pref_acc and pref_style_acc over pairs, val_ppl over documents, distinct2 over "
        "answers, arith_copy and arith_calc over problems; a bootstrap interval of [0, 0] means no item scored at "
        "all). answer_kind: side-by-side answers of the right kind / default prompts asked (chat models).",
        *([f"The `{ANCHORS}` column is no model: a TF-IDF character 1-3-gram logistic regression (sentiment, the LoRA "
           "verdict) and a gazetteer of the tagged entities (entities), fitted on the same training files and graded "
           "on the same held-out records (evals/anchors.py)."] if ANCHORS in results else []),
        "",
        metrics_table(results, intervals, kinds),
        "",
        *changes_section(changes or {}),
        *reward_and_rl_section(models, scorers or {}),
        "## Side-by-side answers",
        "",
        "Greedy, with the side-by-side repetition penalty; base models continue the prompt as raw text, and every "
        "model continues the raw-text prompts.",
        "",
        answers_section(prompts, answers, kinds, kind_names, text_prompts),
    ]
    atomic_write_text(path, "\n".join(page))
    return png if has_png else None
