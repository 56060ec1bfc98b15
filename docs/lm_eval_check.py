r"""serve.py under lm-evaluation-harness: its `local-completions` model scores the demo's 400 held-out sentiment
questions through the server (two answers each, by log-likelihood), and the same scores computed from the model
directly must agree.

    python -m docs.lm_eval_check task /tmp/lme_task        # danlu_sentiment.yaml and its questions
    python serve.py --model out/sft --port 8765 &
    pip install "lm-eval[api]==0.4.13"                     # not a dependency of danlu: only this check needs it
    HF_DATASETS_OFFLINE=1 lm_eval --model local-completions \
        --model_args model=sft,base_url=http://127.0.0.1:8765/v1/completions \
        --include_path /tmp/lme_task --tasks danlu_sentiment,danlu_sentiment_gen --output_path /tmp/lme_out \
        --log_samples
    python -m docs.lm_eval_check compare out/sft "/tmp/lme_out/sft/samples_danlu_sentiment_2*.jsonl"
    python -m docs.lm_eval_check answers out/sft "/tmp/lme_out/sft/samples_danlu_sentiment_gen_*.jsonl"

lm-eval finds the server's /tokenizer_info and /tokenize and uses its tokenizer (with
`tokenizer_backend=huggingface,tokenizer=out/sft` it reads the checkpoint's own copy, with the same figures).
danlu_sentiment_gen is lm-eval's generate_until: greedy answers through the server, the verdict read by a regex.

lm-eval asks for each (question, answer) the prompt's log-probabilities (`echo`, `logprobs: 1`, `max_tokens: 1`)
and sums the answer's; `compare` computes the same sums in one forward pass each, tokenized as lm-eval tokenizes
(the question's trailing whitespace moved into the answer), and prints both accuracies, how many questions pick the
same answer, and the largest difference of a sum. The README quotes its output.
"""

import argparse
import glob
import json
from pathlib import Path

import torch

from dataset.chat import render_chat
from dataset.formats import iter_records
from dataset.tokenizer import load_tokenizer
from model import LM
from model.generation import token_ids

SERVER_STOPS = ["<|im_end|>", "<|endoftext|>"]  # besides the model's eos, the tokens the server stops on
ANSWERS = ["这条评论是负面的。", "这条评论是正面的。"]  # SFT's two answers; the label's index is the target
TASK = """task: danlu_sentiment
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: {answers}
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
"""
GENERATE = """task: danlu_sentiment_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{verdict}}}}"
generation_kwargs:
  until: ["<|im_end|>"]
  max_gen_toks: 32
  do_sample: false
  temperature: 0
filter_list:
  - name: verdict
    filter:
      - function: regex
        regex_pattern: "(正面|负面)"
      - function: take_first
metric_list:
  - metric: exact_match
"""


def write_task(out: Path, data_dir: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data = out / "sentiment.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for record in iter_records(f"{data_dir}/sft_eval.jsonl", "chat"):
            if record["meta"].get("task") == "sentiment":
                prompt = render_chat(record["messages"][:1], add_generation_prompt=True)
                label = ANSWERS.index(f"这条评论是{record['meta']['label']}的。")
                f.write(json.dumps({"prompt": prompt, "label": label, "verdict": record["meta"]["label"]},
                                   ensure_ascii=False) + "\n")
    (out / "danlu_sentiment.yaml").write_text(TASK.format(data=data, answers=json.dumps(ANSWERS, ensure_ascii=False)),
                                              encoding="utf-8")
    (out / "danlu_sentiment_gen.yaml").write_text(GENERATE.format(data=data), encoding="utf-8")
    print(f"wrote {out}/danlu_sentiment.yaml, {out}/danlu_sentiment_gen.yaml and {data}")


def compare(model_dir: str, samples: str) -> None:
    tokenizer, model = load_tokenizer(model_dir), LM.from_pretrained(model_dir).eval()
    rows = [json.loads(line) for path in sorted(glob.glob(samples)) for line in open(path, encoding="utf-8")]
    worst = same = right = theirs_right = 0
    for row in rows:
        prompt = row["doc"]["prompt"]
        context = tokenizer(prompt.rstrip(), add_special_tokens=False)["input_ids"]
        mine = []
        for answer in ANSWERS:
            ids = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logprobs = model(torch.tensor([ids])).logits[0, len(context) - 1:-1].float().log_softmax(-1)
            mine.append(float(logprobs.gather(1, torch.tensor(ids[len(context):])[:, None]).sum()))
        theirs = [float(resp[0][0]) for resp in row["resps"]]
        worst = max(worst, *(abs(a - b) for a, b in zip(mine, theirs)))
        pick, their_pick = mine.index(max(mine)), theirs.index(max(theirs))
        same += pick == their_pick
        right += pick == row["doc"]["label"]
        theirs_right += their_pick == row["doc"]["label"]
    n = len(rows)
    print(f"{n} questions: accuracy {right / n:.4f} from the model, {theirs_right / n:.4f} through the server and "
          f"lm-eval; the same answer picked on {same}; largest difference of a log-likelihood {worst:.1e}")


def compare_answers(model_dir: str, samples: str) -> None:
    """danlu_sentiment_gen: lm-eval's answers through the server against greedy generation from the model."""
    tokenizer, model = load_tokenizer(model_dir), LM.from_pretrained(model_dir).eval()
    rows = [json.loads(line) for path in sorted(glob.glob(samples)) for line in open(path, encoding="utf-8")]
    stop_ids = {*token_ids(model.generation_config.eos_token_id), *tokenizer.convert_tokens_to_ids(SERVER_STOPS)}
    same = 0
    for row in rows:
        ids = tokenizer(row["doc"]["prompt"], add_special_tokens=False)["input_ids"]
        out = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
        stops = [i for i, t in enumerate(out) if t in stop_ids]
        mine = tokenizer.decode(out[:stops[0]] if stops else out)
        same += mine == row["resps"][0][0]
    n = len(rows)
    print(f"{n} questions: the same answer through the server and lm-eval as from greedy generation on {same}; "
          f"the verdict right on {sum(row['exact_match'] for row in rows) / n:.4f} (lm-eval's exact_match)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    task = sub.add_parser("task", help="write the lm-eval task and its questions")
    task.add_argument("out", type=Path)
    task.add_argument("--data_dir", default="dataset/demo")
    check = sub.add_parser("compare", help="lm-eval's logged scores against the model's own")
    check.add_argument("model_dir")
    check.add_argument("samples", help="lm-eval's samples_danlu_sentiment_*.jsonl (a glob)")
    answers = sub.add_parser("answers", help="lm-eval's generated answers against the model's greedy ones")
    answers.add_argument("model_dir")
    answers.add_argument("samples", help="lm-eval's samples_danlu_sentiment_gen_*.jsonl (a glob)")
    args = p.parse_args()
    if args.command == "task":
        write_task(args.out, args.data_dir)
    elif args.command == "compare":
        compare(args.model_dir, args.samples)
    else:
        compare_answers(args.model_dir, args.samples)


if __name__ == "__main__":
    main()
