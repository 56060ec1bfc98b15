"""Put the stages side by side: the same prompts through every checkpoint, and one table of held-out metrics.

    python eval_model.py                                   # every stage's checkpoint in out/ that exists
    python eval_model.py --metrics --json out/eval.json    # + the metrics table, and {model: {metric: value}}
    python eval_model.py --models sft=out/sft,dpo=out/dpo --prompts "你是谁？" "1+1等于几？" --text_prompts "今天"
    python eval_model.py --lora out/lora                   # the adapter on the base its adapter_config.json names
    python eval_model.py --lora out/lora --base out/sft    # ... or on a base you name
    python eval_model.py --report                          # + out/report.md and out/report.png: the report card

A model is a checkpoint directory, or a LoRA adapter directory (adapter_config.json), which is applied to its base
and merged in memory (the files on disk are not touched). A base model (one that train_pretrain.py wrote, or, in a
directory without args.json, one whose name starts with "pretrain" or "base") continues the prompt as raw text;
every other model gets the prompt as a ChatML user turn with the assistant turn opened. --text_prompts (default: a
news paragraph's opening, 新华社北京一月一日电) go to every model as raw text, chat models included: what the language
model under the chat still writes (a news opener asked as a chat question gets no sensible answer). Answers are
greedy, with --repetition_penalty.

--metrics scores every model on the held-out files of --data_dir (dataset/demo: no item is in any training file),
the first --limit items of each task (300: every task of the demo has at least 300 held-out items, except the
200 entity traces of reason_eval.jsonl), greedy decoding with no repetition penalty. Every chat model gets the
same chat-formatted questions. A base model gets the likelihood metrics only (val_ppl, pref_acc, pref_style_acc;
`-` for the rest): it cannot follow the chat format, so its answers would score 0 by construction, and generating
them to the token budget took a quarter of the demo's evaluation. The metrics (each task's module in evals/ says more):

  val_ppl        perplexity of the held-out news (pretrain_val.jsonl): each document on its own, after an
                 <|endoftext|>, predicting every token and the closing <|endoftext|>; exp(mean token NLL)
  sentiment_acc  share of sft_eval sentiment questions whose answer parses to the right label
  entity_f1      sft_eval entity questions: F1 per type (person, place, org; micro over items: true positives,
                 false positives and misses summed over items), then the mean over the three types;
                 entity_f1_person / _place / _org are the per-type scores
  identity_acc   share of identity_eval questions (who are you?, in phrasings training never shows) answered with
                 a self-introduction: the model's name, no think trace
  arith_em       share of reason_eval arithmetic problems whose <answer> holds the right number
  arith_plan     share of them whose <think> writes the reference's equations' operators in order (× then -),
                 whatever numbers: the steps chosen, graded apart from copying and computing the numbers
  arith_copy     over every equation the traces write: share of their operands (an earlier step's result aside)
                 that are numbers of the question (0 where no equation is written)
  arith_calc     share of those equations whose result is right for the numbers written (4×5=20, not 12)
  think_format   share of reason_eval outputs (arithmetic and entity traces) that are exactly
                 `<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>` (a blank line may follow </think>, as the
                 chat template writes reasoning_content; trailing whitespace allowed)
  lora_acc       share of lora_eval reviews answered with the right one-word verdict (推荐 / 不推荐)
  pref_acc       share of dpo_eval pairs where the model itself prefers the chosen answer: its mean per-token
                 log-probability of the chosen answer is higher than that of the rejected one (no reference model)
  pref_style_acc the same over the pairs whose rejected answer is right too, in a style other than the preferred
                 one (a quarter of the demo's pairs, evals/preference.py): the preference SFT cannot teach
  distinct2      repetition: for each generated answer, distinct character bigrams / character bigrams, averaged
                 over every answer of the tasks above that has at least 2 bigrams (1.0: nothing repeats); a
                 trace's form lowers it too (its tags and step wording repeat)
  loop_free      share of those answers that do not loop (at least half their bigrams distinct): the loops alone

Every metric comes with its 95% confidence interval over the held-out items (evals/intervals.py): Wilson for the
shares of right answers (sentiment_acc, identity_acc, arith_em, arith_plan, lora_acc, think_format, loop_free), a
percentile bootstrap over items for the rest (entity_f1 over sentences, pref_acc and pref_style_acc over pairs,
val_ppl over documents, distinct2 over answers, arith_copy and arith_calc over problems). The table shows
`value [low, high]`; --json keeps {model: {metric: value}} and adds "<metric>_ci": [low, high].

What each stage changed is measured on the same items: a second table puts each model against the stage it starts
from (trainer/stages.py: sft against pretrain, lora and dpo against sft, distill against dpo, grpo against distill;
--against NAME: every model against NAME), the change in each metric with a 95% interval from a paired bootstrap
(both models get the same resampled items, so what they get right together cancels out) and * where the interval
leaves out 0: a change beyond the noise of the items, an effect or a loss. --json adds "compared_with": NAME and
"<metric>_change": [change, low, high].

The table's last column, `anchors`, is no model: it is what a classical method scores on the same held-out records
(evals/anchors.py), fitted on the training files of --data_dir: a TF-IDF character 1-3-gram logistic regression for
sentiment_acc (on sft.jsonl's reviews) and lora_acc (on lora.jsonl's), a gazetteer of sft.jsonl's tagged entities for
entity_f1. --no_anchors leaves it out; a task whose training file is missing has none.

answer_kind counts, for each chat model, how many of the default side-by-side prompts got an answer of the right
kind, as the tasks' parsers read it: a label for the sentiment prompt, at least one name for the entity prompt, a
number for the arithmetic one (right or not), a self-introduction (the name, no trace) for 你是谁？.

--report [PATH] (default out/report.md; implies --metrics) writes the report card: the machine, each stage's time,
tokens and tokens/s (its summary.json), the metrics table with intervals and the table of changes, the reward
model's held-out pair accuracy
(out/reward) and an RL run's sampled pass@1 before and after training (its --pass_at_k), the side-by-side answers,
and one PNG beside it with every stage's loss curve (its metrics.jsonl).
"""

import argparse
import contextlib
import itertools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dataset.chat import IGNORE_INDEX, render_chat
from dataset.errors import UsageError, exit_cleanly_on_bad_input
from dataset.formats import iter_records
from dataset.io import atomic_write_text
from dataset.tokenizer import load_tokenizer
from evals import GENERATION_TASKS, LIKELIHOOD_TASKS, METRICS, OUTPUT_CHECKS, TASKS
from evals.anchors import COLUMN as ANCHORS
from evals.base import GenerationTask, LikelihoodTask
from evals.intervals import (
    DRAWS,
    Resampler,
    check_intervals,
    check_resampler,
    generation_intervals,
    generation_resampler,
    likelihood_intervals,
    likelihood_resampler,
    paired_changes,
)
from evals.report import Change, Interval, changes_rows, environment, metric_cell, write_report
from model import LM
from model.generation import generate_batch, length_batches
from model.lora import ADAPTER_CONFIG, load_lora, merge_lora
from trainer.cli import DEMO_DIR, dtype_name
from trainer.losses import label_logps
from trainer.runtime import keep_freed_memory, resolve_device, resolve_dtype
from trainer.stages import MODEL_STAGES, STAGES

BATCH_TOKENS = 8192  # padded positions per batch at most (prompt + new tokens when generating): bounds memory
DEFAULT_PROMPTS = [
    "下面这条评论是正面的还是负面的？\n屏幕很清楚，电池也耐用，客服回复得很及时，这个价钱买到很值。",
    "请找出下面这句话中的人名、地名和机构名：\n王建国昨天在上海出席了中国科学院举办的学术报告会。",
    "教室里有4排座位，每排坐6人，后来走了5人，又进来3人，现在教室里有几人？",
    "你是谁？",
]
# Raw text that every model continues, chat models too: the language model each stage keeps (val_ppl, side by side).
DEFAULT_TEXT_PROMPTS = ["新华社北京一月一日电"]
# The kind of answer each default prompt asks for, judged by its task's parser (answer_kind).
PROMPT_KINDS = {
    DEFAULT_PROMPTS[0]: ("a sentiment label", lambda text: TASKS["sentiment"].parse(text) is not None),
    DEFAULT_PROMPTS[1]: ("entity names", lambda text: any(TASKS["entity"].parse(text).values())),
    DEFAULT_PROMPTS[2]: ("a number", lambda text: TASKS["arith"].parse(text) is not None),
    DEFAULT_PROMPTS[3]: ("a self-introduction", TASKS["identity"].parse),
}


@dataclass
class ModelSpec:
    """One column of the comparison: a checkpoint, optionally with a LoRA adapter applied on top."""

    name: str
    path: Path
    adapter: Path | None
    chat: bool


@dataclass
class Runner:
    """Where and how models run: device, autocast precision, rows per batch."""

    device: torch.device
    dtype: torch.dtype
    batch_size: int

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Which models


def is_chat_model(name: str, directory: Path) -> bool:
    """False for a base model: the trainer's args.json names the stage; without one, the name decides."""
    args_file = directory / "args.json"
    if args_file.is_file():
        stage = json.loads(args_file.read_text(encoding="utf-8")).get("stage")
        if stage:
            return STAGES[stage].chat if stage in STAGES else True
    return not name.startswith(("pretrain", "base"))


def model_spec(name: str, directory: str | Path, base: str | None = None) -> ModelSpec:
    """A checkpoint or adapter directory as a ModelSpec; a clear error when it is neither."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UsageError(f"model {name}: {directory} does not exist")
    adapter_config = directory / ADAPTER_CONFIG
    if adapter_config.is_file():
        base = base or json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path")
        if not base:
            raise UsageError(f"model {name}: {adapter_config} names no base model; pass --base DIR")
        if not (Path(base) / "config.json").is_file():
            raise UsageError(f"model {name}: the adapter's base model {base} is not a checkpoint directory "
                             "(no config.json); pass --base DIR")
        return ModelSpec(name, Path(base), directory, is_chat_model(name, directory))
    if not (directory / "config.json").is_file():
        raise UsageError(f"model {name}: {directory} has neither config.json nor {ADAPTER_CONFIG}; "
                         "is it a checkpoint directory?")
    return ModelSpec(name, directory, None, is_chat_model(name, directory))


def parse_model_list(text: str) -> list[tuple[str, str]]:
    """`sft=out/sft,dpo=out/dpo` (or bare directories, named after their last part) -> [(name, dir)]."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, directory = item.partition("=")
        pairs.append((name, directory) if sep else (Path(item).name, item))
    return pairs


def resolve_models(args: argparse.Namespace) -> list[ModelSpec]:
    """The --models and --lora given, else every stage directory under out/ that exists."""
    pairs = parse_model_list(args.models or "") + parse_model_list(args.lora or "")
    if not pairs:
        out_dirs = {name: STAGES[name].out_dir for name in MODEL_STAGES}
        pairs = [(name, out_dir) for name, out_dir in out_dirs.items()
                 if any(Path(out_dir, file).is_file() for file in ("config.json", ADAPTER_CONFIG))]
        if not pairs:
            raise UsageError(f"no checkpoints found (looked for {', '.join(out_dirs.values())}); train a stage first "
                             "or pass --models NAME=DIR,...")
    names = [name for name, _ in pairs]
    if len(set(names)) < len(names):
        raise UsageError(f"model names must differ, got {names}; name them: --models NAME=DIR,...")
    if ANCHORS in names:
        raise UsageError(f"no model may be named {ANCHORS!r}: the metrics table's column of the anchors has it")
    return [model_spec(name, directory, args.base) for name, directory in pairs]


def load_model(spec: ModelSpec, device: torch.device):
    """(model in eval mode, its tokenizer). An adapter is merged into its base in memory: same outputs, full speed."""
    model = LM.from_pretrained(spec.path)
    tokenizer_dir = spec.path
    if spec.adapter is not None:
        merge_lora(load_lora(model, spec.adapter))
        if (spec.adapter / "tokenizer.json").is_file():
            tokenizer_dir = spec.adapter
    return model.to(device).eval(), load_tokenizer(tokenizer_dir)


# ---------------------------------------------------------------------------------------------------------------------
# Running a model


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The chat as SFT rendered it, ending with the opened assistant turn the model should complete."""
    return tokenizer(render_chat(messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]


@torch.no_grad()
def generate(model: LM, tokenizer, prompts: list[list[int]], max_new_tokens: int, runner: Runner,
             repetition_penalty: float = 1.0) -> list[str]:
    """Greedy continuations of token-id prompts, decoded without special tokens; batched by length, each row
    stopping at its own eos (model.generation.generate_batch)."""
    keep = model.config.max_position_embeddings - max_new_tokens  # a too-long prompt keeps its end
    with runner.autocast():
        completions = generate_batch(model, [prompt[-keep:] for prompt in prompts], max_new_tokens,
                                     max_batch_rows=runner.batch_size, max_batch_tokens=BATCH_TOKENS,
                                     do_sample=False, repetition_penalty=repetition_penalty)
    return [tokenizer.decode(completion.tokens, skip_special_tokens=True) for completion in completions]


@torch.no_grad()
def scored_logps(model: LM, sequences: list[tuple[list[int], list[int]]], runner: Runner) -> list[tuple[float, int]]:
    """(summed log-prob, token count) of the marked tokens of each (ids, mask) sequence: token t counts when
    mask[t] is 1, predicted from the tokens before it. Batched, right-padded (padding after a sequence's last
    token changes nothing before it under causal attention)."""
    limit = model.config.max_position_embeddings
    sequences = [(ids[:limit], mask[:limit]) for ids, mask in sequences]
    results: list[tuple[float, int]] = [(0.0, 0)] * len(sequences)
    for rows in length_batches([len(ids) for ids, _ in sequences], runner.batch_size, BATCH_TOKENS):
        cut = [sequences[i] for i in rows]
        width = max(len(ids) for ids, _ in cut)
        input_ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in cut], device=runner.device)
        # labels[t] is the target of position t: token t + 1 where it is marked, else ignored.
        labels = torch.tensor([[t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]
                               + [IGNORE_INDEX] * (width - len(ids) + 1) for ids, mask in cut], device=runner.device)
        with runner.autocast():
            logps, scored = label_logps(model, input_ids, labels)  # the output layer only where there is a label
        for i, total, count in zip(rows, logps.sum(-1).tolist(), scored.sum(-1).tolist()):
            results[i] = (total, int(count))
    return results


# ---------------------------------------------------------------------------------------------------------------------
# The held-out sets and the metrics (the tasks are in evals/)


def load_eval_sets(data_dir: str | Path, limit: int) -> dict[str, list[dict]]:
    """The first `limit` held-out records of every task in evals.TASKS (0: all), by task name; a file missing
    from data_dir leaves its tasks out."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UsageError(f"--data_dir {data_dir} is not a folder (python -m dataset.demo builds dataset/demo)")
    sets: dict[str, list[dict]] = {}
    tasks = (*GENERATION_TASKS, *LIKELIHOOD_TASKS)
    for task in tasks:
        path = data_dir / task.eval_file
        if path.is_file():
            records = filter(task.selects, iter_records(str(path), task.record_kind))
            sets[task.name] = list(itertools.islice(records, limit or None))
    if not sets:
        files = sorted({task.eval_file for task in tasks})
        raise UsageError(f"--data_dir {data_dir} holds none of the held-out files ({', '.join(files)}); "
                         "python -m dataset.demo builds dataset/demo")
    return sets


def generate_answers(model: LM, tokenizer, task: GenerationTask, records: list[dict], runner: Runner) -> list[str]:
    """The model's greedy answers to a task's records, within the task's token budget."""
    prompts = [chat_prompt_ids(tokenizer, task.prompt_messages(record)) for record in records]
    return generate(model, tokenizer, prompts, task.max_new_tokens, runner)


def likelihood_metrics(model: LM, tokenizer, task: LikelihoodTask, records: list[dict],
                       runner: Runner) -> dict[str, float]:
    """A likelihood task's metrics: the log-probs of its sequences, scored by the task."""
    return task.score(scored_logps(model, task.sequences(tokenizer, records), runner), records)


def evaluate(model: LM, tokenizer, sets: dict[str, list[dict]], runner: Runner, draws: int = DRAWS,
             chat: bool = True) -> tuple[dict[str, float], dict[str, Interval], dict[str, Resampler]]:
    """Every metric whose held-out set is present, for one model, in METRICS order (see the module docstring),
    its 95% confidence interval (evals/intervals.py; `draws` bootstrap resamples), and what they were computed from,
    as one resampler per task (to pair the model's items with another model's: evals.intervals.paired_changes). A
    base model (chat=False) gets the likelihood metrics only: it cannot answer a chat question, so generating its
    answers would only spend time (a quarter of the demo's evaluation) on zeros; the table shows `-` there."""
    metrics: dict[str, float] = {}
    intervals: dict[str, Interval] = {}
    items: dict[str, Resampler] = {}
    for task in LIKELIHOOD_TASKS:
        if sets.get(task.name):
            logps = scored_logps(model, task.sequences(tokenizer, sets[task.name]), runner)
            metrics.update(task.score(logps, sets[task.name]))
            intervals.update(likelihood_intervals(task, logps, sets[task.name], draws))
            items[task.name] = likelihood_resampler(task, logps, sets[task.name])
    outputs = {task.name: generate_answers(model, tokenizer, task, sets[task.name], runner)
               for task in GENERATION_TASKS if chat and sets.get(task.name)}
    for task in GENERATION_TASKS:
        if task.name in outputs:
            scores = task.score(outputs[task.name], sets[task.name])
            metrics.update(scores)
            intervals.update(generation_intervals(task, outputs[task.name], sets[task.name], scores, draws))
            items[task.name] = generation_resampler(task, outputs[task.name], sets[task.name])
    for check in OUTPUT_CHECKS:
        names = [name for name in outputs if check.tasks is None or name in check.tasks]
        if names:
            texts = [text for name in names for text in outputs[name]]
            scores = check.score(texts)
            metrics.update(scores)
            intervals.update(check_intervals(check, texts, scores, draws))
            items[f"{check.name}:{','.join(names)}"] = check_resampler(check, texts)  # pairs with the same tasks'
    return (*in_report_order(metrics, intervals), items)


def in_report_order(metrics: dict[str, float],
                    intervals: dict[str, Interval]) -> tuple[dict[str, float], dict[str, Interval]]:
    """The metrics and their intervals in METRICS order (the report's rows)."""
    ordered = [metric for metric in METRICS if metric in metrics]
    return {m: metrics[m] for m in ordered}, {m: intervals[m] for m in ordered if m in intervals}


def anchor_metrics(data_dir: str | Path, sets: dict[str, list[dict]],
                   draws: int = DRAWS) -> tuple[dict[str, float], dict[str, Interval]]:
    """The anchors' metrics and intervals (evals/anchors.py): every task with an anchor whose training file is in
    data_dir answers its held-out records with its anchor, and is scored as a model's answers are."""
    metrics: dict[str, float] = {}
    intervals: dict[str, Interval] = {}
    training: dict[Path, list[dict]] = {}
    for task in GENERATION_TASKS:
        path = Path(data_dir, task.anchor_file) if task.anchor_file else None
        if path is None or not path.is_file() or not sets.get(task.name):
            continue
        if path not in training:
            training[path] = list(iter_records(str(path), "chat"))
        answers = task.anchor_answers(training[path], sets[task.name])
        if answers is not None:
            scores = task.score(answers, sets[task.name])
            metrics.update(scores)
            intervals.update(generation_intervals(task, answers, sets[task.name], scores, draws))
    return in_report_order(metrics, intervals)


def answer_kinds(prompts: list[str], answers: list[str]) -> dict[str, bool]:
    """For each default side-by-side prompt among `prompts`: whether the answer to it is of the kind it asks for."""
    return {prompt: PROMPT_KINDS[prompt][1](answer) for prompt, answer in zip(prompts, answers)
            if prompt in PROMPT_KINDS}


# ---------------------------------------------------------------------------------------------------------------------
# Printing


def side_by_side_ids(tokenizer, prompts: list[str], text_prompts: list[str], chat: bool) -> list[list[int]]:
    """Token ids of the side-by-side prompts, then the text prompts: a chat model gets each prompt as a ChatML user
    turn (the assistant turn opened), a base model as raw text; every model gets the text prompts as raw text."""
    def raw(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return [chat_prompt_ids(tokenizer, [{"role": "user", "content": p}]) if chat else raw(p) for p in prompts] \
        + [raw(p) for p in text_prompts]


def format_answers(prompts: list[str], answers: dict[str, list[str]], text_prompts: list[str] = ()) -> str:
    """Each prompt (then each text prompt, marked), then every model's answer under it, labelled; continuation lines
    indented."""
    width = max(map(len, answers)) + 2
    lines = []
    for i, prompt in enumerate([*prompts, *text_prompts]):
        raw = "   (raw text: every model continues it)" if i >= len(prompts) else ""
        lines.append(f"\n== {i + 1}. " + prompt.replace("\n", "\n   ") + raw)
        for name, texts in answers.items():
            body = texts[i].strip().replace("\n", "\n" + " " * width) or "(nothing)"
            lines.append(f"{'[' + name + ']':<{width}}{body}")
    return "\n".join(lines)


def format_table(results: dict[str, dict[str, float]], intervals: dict[str, dict[str, Interval]] | None = None,
                 kinds: dict[str, dict[str, bool]] | None = None) -> str:
    """Rows = metrics, columns = models; `-` where a metric was not computed. With intervals, each cell is
    `value [low, high]`; with kinds, a last row answer_kind: right-kind answers / default prompts (chat models)."""
    names = list(results)
    intervals = intervals or {}
    cell_width = 12 if not intervals else 24
    width = max(cell_width, *(len(name) + 2 for name in names))
    rows = [f"{'metric':<16}" + "".join(f"{name:>{width}}" for name in names)]
    for metric in METRICS:
        if not any(metric in values for values in results.values()):
            continue
        cells = [metric_cell(metric, results[name].get(metric), intervals.get(name, {}).get(metric))
                 for name in names]
        rows.append(f"{metric:<16}" + "".join(f"{cell:>{width}}" for cell in cells))
    if kinds and any(kinds.values()):
        cells = [f"{sum(kinds[name].values())}/{len(kinds[name])}" if kinds.get(name) else "-" for name in names]
        rows.append(f"{'answer_kind':<16}" + "".join(f"{cell:>{width}}" for cell in cells))
    return "\n".join(rows)


def json_results(results: dict[str, dict[str, float]], intervals: dict[str, dict[str, Interval]],
                 kinds: dict[str, dict[str, bool]], changes: dict[str, tuple[str, dict[str, Change]]] | None = None
                 ) -> dict:
    """{model: {metric: value, ..., metric_ci: [low, high], ..., answer_kind: n, answer_kind_of: m,
    compared_with: other, metric_change: [change, low, high], ...}}: the values under their usual keys, the
    intervals, the answer-kind count and the paired changes from the model it is compared with under their own."""
    out = {}
    for name, values in results.items():
        row = dict(values)
        row.update({f"{metric}_ci": [round(lo, 6), round(hi, 6)] for metric, (lo, hi) in intervals[name].items()})
        if kinds.get(name):
            row.update(answer_kind=sum(kinds[name].values()), answer_kind_of=len(kinds[name]))
        if changes and name in changes:
            reference, found = changes[name]
            row["compared_with"] = reference
            row.update({f"{metric}_change": [round(value, 6), round(lo, 6), round(hi, 6)]
                        for metric, (value, (lo, hi)) in found.items()})
        out[name] = row
    return out


def compared_with(names: list[str], against: str | None = None) -> dict[str, str]:
    """{model: the model its changes are measured from}: `against` for every other model, else the stage it starts
    from (trainer/stages.py's init_from: lora and dpo from sft, distill from dpo, ...) when that stage is a column."""
    if against:
        if against not in names:
            raise UsageError(f"--against {against}: no such model (the models: {', '.join(names)})")
        return {name: against for name in names if name != against}
    stage_at = {stage.out_dir: name for name, stage in STAGES.items()}
    pairs = {}
    for name in names:
        stage = STAGES.get(name)
        reference = stage_at.get(stage.init_from) if stage and stage.init_from else None
        if reference in names:
            pairs[name] = reference
    return pairs


def format_changes(changes: dict[str, tuple[str, dict[str, Change]]]) -> str:
    """Rows = metrics, columns = `model - reference`: the paired change, its 95% interval, * beyond the noise."""
    header, rows = changes_rows(changes)
    width = max(28, *(len(name) + 2 for name in header))
    lines = [f"{'metric':<16}" + "".join(f"{name:>{width}}" for name in header)]
    lines += [f"{row[0]:<16}" + "".join(f"{cell:>{width}}" for cell in row[1:]) for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", help="NAME=DIR,... checkpoint or adapter directories (default: the stages in out/)")
    p.add_argument("--lora", help="[NAME=]DIR,... LoRA adapters, each applied to the base its "
                                  "adapter_config.json names (or to --base)")
    p.add_argument("--base", help="base checkpoint for every adapter, instead of the one its config names")
    p.add_argument("--prompts", nargs="+", default=DEFAULT_PROMPTS, help="prompts for the side-by-side answers")
    p.add_argument("--text_prompts", nargs="*", default=DEFAULT_TEXT_PROMPTS,
                   help="raw text every model continues side by side, chat models too (no chat template); none: "
                        "--text_prompts alone")
    p.add_argument("--max_new_tokens", type=int, default=96, help="tokens per side-by-side answer")
    p.add_argument("--repetition_penalty", type=float, default=1.1, help="for the side-by-side answers")
    p.add_argument("--metrics", action="store_true", help="score every model on the held-out sets")
    p.add_argument("--json", help="write {model: {metric: value}} to this file (implies --metrics)")
    p.add_argument("--data_dir", default=DEMO_DIR, help="folder with the held-out *_eval.jsonl files")
    p.add_argument("--limit", type=int, default=300, help="held-out items per task (0: all)")
    p.add_argument("--no_anchors", action="store_true",
                   help="leave out the anchors' column (a TF-IDF logistic regression and a gazetteer fitted on the "
                        "training files of --data_dir: evals/anchors.py)")
    p.add_argument("--ci_draws", type=int, default=DRAWS, help="bootstrap resamples per confidence interval")
    p.add_argument("--against", metavar="NAME",
                   help="measure every other model's changes from this one (default: each stage from the stage it "
                        "starts from, when both are columns)")
    p.add_argument("--report", nargs="?", const="out/report.md",
                   help="write the report card here (default out/report.md) and its loss curves beside it as .png "
                        "(implies --metrics)")
    p.add_argument("--batch_size", type=int, default=64, help="sequences per forward pass")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default, one per core); 1 is steadier on a loaded machine")
    p.add_argument("--dtype", default="auto", type=dtype_name, metavar="{auto,fp32,bf16,fp16}",
                   help="autocast precision (auto: bf16 on CUDA and on CPUs with bf16 matrix units, else fp32; "
                        "float32, bfloat16 and float16 are accepted too)")
    args = p.parse_args(argv)
    args.metrics = args.metrics or bool(args.json) or bool(args.report)
    return args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@exit_cleanly_on_bad_input
def main() -> None:
    args = parse_args()
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cpu":
        keep_freed_memory()  # the batches' large buffers come back every call; see trainer/runtime.py
    runner = Runner(device, resolve_dtype(args.dtype, device), args.batch_size)
    specs = resolve_models(args)
    if args.metrics and args.data_dir == DEMO_DIR and not Path(DEMO_DIR).is_dir():
        from dataset.demo import build_demo

        build_demo(DEMO_DIR)
    sets = load_eval_sets(args.data_dir, args.limit) if args.metrics else {}

    answers: dict[str, list[str]] = {}
    results: dict[str, dict[str, float]] = {}
    intervals: dict[str, dict[str, Interval]] = {}
    items: dict[str, dict[str, Resampler]] = {}
    kinds: dict[str, dict[str, bool]] = {}
    pairs = compared_with([spec.name for spec in specs], args.against)  # before the models: a wrong name fails now
    for spec in specs:
        start = time.time()
        model, tokenizer = load_model(spec, device)
        prompts = side_by_side_ids(tokenizer, args.prompts, args.text_prompts, spec.chat)
        answers[spec.name] = generate(model, tokenizer, prompts, args.max_new_tokens, runner, args.repetition_penalty)
        if spec.chat:
            kinds[spec.name] = answer_kinds(args.prompts, answers[spec.name])
        if args.metrics:
            results[spec.name], intervals[spec.name], items[spec.name] = evaluate(model, tokenizer, sets, runner,
                                                                                  args.ci_draws, spec.chat)
        source = f"{spec.adapter} on {spec.path}" if spec.adapter else str(spec.path)
        log(f"{spec.name} ({source}, {'chat' if spec.chat else 'base'}): {time.time() - start:.1f}s")
        del model

    print(format_answers(args.prompts, answers, args.text_prompts))
    if args.metrics and not args.no_anchors:
        start = time.time()
        metrics, anchor_intervals = anchor_metrics(args.data_dir, sets, args.ci_draws)
        if metrics:
            results[ANCHORS], intervals[ANCHORS] = metrics, anchor_intervals
            log(f"{ANCHORS} (evals/anchors.py, fitted on the training files of {args.data_dir}): "
                f"{time.time() - start:.1f}s")
    if args.metrics:
        counts = ", ".join(f"{name} {len(records)}" for name, records in sets.items())
        print(f"\n== metrics with 95% intervals (held-out sets in {args.data_dir}, items per task: {counts})")
        print(format_table(results, intervals, kinds))
        changes = {name: (reference, paired_changes(items[reference], items[name], args.ci_draws))
                   for name, reference in pairs.items()}
        if changes:
            start = f"from {args.against}" if args.against else "from the one it starts from"
            print(f"\n== what each model changed {start}: paired on the same held-out items, 95% intervals, "
                  "* beyond the noise (the interval leaves out 0)")
            print(format_changes(changes))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps(json_results(results, intervals, kinds, changes), indent=1, ensure_ascii=False)
            atomic_write_text(args.json, text + "\n")
            print(f"wrote {args.json}")
        if args.report:
            png = write_report(args.report, models={spec.name: spec.adapter or spec.path for spec in specs},
                               environment=environment(runner.device, runner.dtype), results=results,
                               intervals=intervals, items={name: len(records) for name, records in sets.items()},
                               prompts=args.prompts, text_prompts=args.text_prompts, answers=answers, kinds=kinds,
                               kind_names={p: kind for p, (kind, _) in PROMPT_KINDS.items()},
                               scorers={name: Path(s.out_dir) for name, s in STAGES.items()
                                        if not s.generates and Path(s.out_dir, "summary.json").is_file()},
                               changes=changes)
            print(f"wrote {args.report}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()
