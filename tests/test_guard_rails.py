"""Guard rails (issue 15): a user's usual mistakes, each followed by the exact refusal or the right behaviour.

Most checks run in-process on trainer.cli.parse_args / trainer.checkpoint.check_output_dir (what every stage's
parse_args and setup run); the end-to-end runs show the scripts exit 2 with one line, before any work.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import CHAT_TINY, REPO, pretrain_args, run_script, tiny_checkpoint, write_jsonl
from trainer.checkpoint import check_output_dir, model_shape, restore
from trainer.cli import parse_args

SFT_DEMO = dict(data_path="dataset/demo/sft.jsonl", val_data_path="dataset/demo/sft_eval.jsonl",
                sample_prompt="a demo prompt")
ENGLISH = ["The quick brown fox jumps over the lazy dog near the river bank.",
           "A stitch in time saves nine, as my grandmother used to say every morning.",
           "Rain fell all night on the tin roof of the old farmhouse by the hill.",
           "Engineers measure twice and cut once when the budget is tight."]


def refusal(capsys, excinfo) -> str:
    """The one line a refused command printed (argparse errors) or raised (UsageError)."""
    if isinstance(excinfo.value, SystemExit):
        assert excinfo.value.code == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err, err
        return err
    return str(excinfo.value)


def sft_argv(ckpt, chats, out, *extra) -> list:
    return ["--init_from", ckpt, "--data_path", chats, "--out_dir", out, *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, chat_checkpoint):
    """A real SFT run (states at steps 2 and 4) and a real LoRA run, on the tiny chat checkpoint."""
    root = tmp_path_factory.mktemp("runs")
    ckpt, chats = chat_checkpoint["model"], chat_checkpoint["chats"]
    run_script("train_sft.py", *sft_argv(ckpt, chats, root / "sft", "--save_every", "2", "--val_data_path", "",
                                         *CHAT_TINY, "--max_steps", "4"))
    run_script("train_lora.py", *sft_argv(ckpt, chats, root / "lora", "--val_data_path", "", *CHAT_TINY))
    return {"sft": root / "sft", "lora": root / "lora", "root": root}


# --- 1. checkpoints are never overwritten or mixed silently -----------------------------------------------------

@pytest.mark.slow
def test_out_dir_that_is_init_from_is_refused_also_through_a_symlink(tmp_path, chat_checkpoint, capsys):
    ckpt = chat_checkpoint["model"]
    link = tmp_path / "same"
    link.symlink_to(ckpt)
    for out in (ckpt, link):
        args = parse_args("sft", SFT_DEMO, argv=sft_argv(ckpt, chat_checkpoint["chats"], out))
        with pytest.raises(Exception) as excinfo:
            check_output_dir(args)
        assert refusal(capsys, excinfo) == (f"--out_dir {out} is the --init_from directory: this sft run would "
                                            "overwrite the checkpoint it starts from; give another --out_dir")
    result = run_script("train_sft.py", *sft_argv(ckpt, chat_checkpoint["chats"], link), check=False)
    assert result.returncode == 2 and result.stderr.startswith(f"error: --out_dir {link} is the --init_from")


@pytest.mark.slow
def test_train_state_names_its_stage_and_shape(runs):
    states = sorted((runs["sft"] / "train_state").glob("step_*"))
    saved = json.loads((states[-1] / "state.json").read_text())
    config = json.loads((runs["sft"] / "config.json").read_text())
    assert saved["stage"] == "sft" and saved["shape"] == model_shape(config) and saved["shape"]["hidden_size"] == 64


@pytest.mark.slow
def test_pretrain_resume_from_an_sft_run_is_refused(runs, corpus, tokenizer_dir):
    result = run_script("train_pretrain.py", *pretrain_args(corpus, tokenizer_dir, runs["sft"], "--resume"),
                        check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: --resume: {runs['sft']}/train_state/step_00000004 is the state of an sft run (hidden 64, 2 layers, "
        "4 heads, 2 KV heads, MLP 192, vocab 512), not of this pretrain run (hidden 64, 2 layers, 4 heads, 2 KV heads, "
        "MLP 192, vocab 512); give another --out_dir, or --overwrite to start over there")


@pytest.mark.slow
def test_resume_from_a_state_of_another_shape_is_one_line(tmp_path, chat_checkpoint, runs, capsys):
    """Same stage, other shape: refused by name before any work, not with torch's size-mismatch listing."""
    other = tiny_checkpoint(chat_checkpoint["model"], tmp_path / "wide")  # then widen its config
    config = json.loads((other / "config.json").read_text())
    config.update(hidden_size=128, intermediate_size=384)
    (other / "config.json").write_text(json.dumps(config))
    args = parse_args("sft", SFT_DEMO, argv=sft_argv(other, chat_checkpoint["chats"], runs["sft"], "--resume"))
    with pytest.raises(Exception) as excinfo:
        check_output_dir(args)
    assert refusal(capsys, excinfo).startswith(
        f"--resume: {runs['sft']}/train_state/step_00000004 is the state of an sft run (hidden 64, 2 layers, 4 heads, "
        "2 KV heads, MLP 192, vocab 512), not of this sft run (hidden 128, 2 layers, 4 heads, 2 KV heads, MLP 384")


@pytest.mark.slow
def test_restore_turns_size_mismatches_into_one_line(tmp_path, chat_checkpoint, runs):
    """A state without stage/shape (written before they were recorded) of another shape: one UsageError line."""
    from dataset.errors import UsageError
    from model import LM, LMConfig
    from trainer.runtime import Runtime, Trainable

    out = tmp_path / "old"
    shutil.copytree(runs["sft"], out)
    model = LM(LMConfig.from_preset("tiny", vocab_size=512, hidden_size=128))
    run = Runtime(device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(UsageError) as excinfo:
        restore(str(out), Trainable(raw=model, model=model), torch.optim.AdamW(model.parameters()), None, run)
    message = str(excinfo.value)
    assert "\n" not in message and message.startswith(f"--resume: {out}/train_state/step_00000004 holds a model of "
                                                      "another shape than this run's (")
    assert message.endswith("resume with the flags that wrote it, or start over with --overwrite")


@pytest.mark.slow
def test_out_dir_holding_another_stages_checkpoint_is_refused_then_cleared_with_overwrite(runs, chat_checkpoint):
    ckpt, chats, lora = chat_checkpoint["model"], chat_checkpoint["chats"], runs["lora"]
    out = runs["root"] / "lora_then_sft"
    shutil.copytree(lora, out)
    assert (out / "adapter_config.json").is_file()
    refused = run_script("train_sft.py", *sft_argv(ckpt, chats, out, *CHAT_TINY), check=False)
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        f"error: --out_dir {out} holds a lora run (hidden 64, 2 layers, 4 heads, 2 KV heads, MLP 192, vocab 512); this "
        "sft run (hidden 64, 2 layers, 4 heads, 2 KV heads, MLP 192, vocab 512) would mix its files with it: give "
        "another --out_dir, or --overwrite to delete them first")
    done = run_script("train_sft.py", *sft_argv(ckpt, chats, out, "--overwrite", "--val_data_path", "", *CHAT_TINY))
    assert (f"--overwrite: deleted a lora run (hidden 64, 2 layers, 4 heads, 2 KV heads, MLP 192, vocab 512) from "
            f"{out}") in done.stdout
    assert not (out / "adapter_config.json").exists() and not (out / "adapter_model.safetensors").exists()
    assert (out / "model.safetensors").is_file()
    states = sorted((out / "train_state").glob("step_*"))
    assert [json.loads((s / "state.json").read_text())["stage"] for s in states] == ["sft"]


def test_resume_and_overwrite_together_are_refused(chat_checkpoint, tmp_path, capsys):
    with pytest.raises(Exception) as excinfo:
        parse_args("sft", SFT_DEMO, argv=sft_argv(chat_checkpoint["model"], chat_checkpoint["chats"], tmp_path / "o",
                                                  "--resume", "--overwrite"))
    assert refusal(capsys, excinfo) == ("--resume continues the run in --out_dir and --overwrite deletes it: give "
                                        "one of them")


@pytest.mark.slow
def test_a_fresh_run_into_its_own_stages_dir_replaces_the_earlier_states(runs, chat_checkpoint):
    out = runs["root"] / "rerun"
    shutil.copytree(runs["sft"], out)
    assert sorted(p.name for p in (out / "train_state").glob("step_*")) == ["step_00000002", "step_00000004"]
    result = run_script("train_sft.py", *sft_argv(chat_checkpoint["model"], chat_checkpoint["chats"], out,
                                                  "--val_data_path", "", *CHAT_TINY, "--max_steps", "1"))
    assert (f"{out} holds an earlier sft run (train state at step 4); starting over: this run's first save replaces "
            "it (--resume continues it instead)") in result.stdout
    assert sorted(p.name for p in (out / "train_state").glob("step_*")) == ["step_00000001"]


# --- 2. the demo's defaults are the demo's ------------------------------------------------------------------------

def test_own_data_holds_out_a_split_and_samples_its_own_prompt(chat_checkpoint, tmp_path):
    ckpt, chats = chat_checkpoint["model"], chat_checkpoint["chats"]
    args = parse_args("sft", SFT_DEMO, argv=sft_argv(ckpt, chats, tmp_path / "o"))
    first = json.loads(chats.read_text().splitlines()[0])["conversations"][0]["content"]
    assert (args.val_data_path, args.val_split, args.sample_prompt) == (None, 0.02, first)
    args = parse_args("sft", SFT_DEMO, argv=sft_argv(ckpt, chats, tmp_path / "o", "--val_data_path", ""))
    assert (args.val_data_path, args.val_split) == (None, 0.0)
    args = parse_args("sft", SFT_DEMO, argv=sft_argv(ckpt, chats, tmp_path / "o", "--sample_prompt", "mine"))
    assert args.sample_prompt == "mine"
    demo = parse_args("sft", SFT_DEMO, argv=["--init_from", ckpt, "--out_dir", tmp_path / "o"])
    assert (demo.val_data_path, demo.val_split, demo.sample_prompt) == (SFT_DEMO["val_data_path"], 0.0,
                                                                        "a demo prompt")


@pytest.mark.slow
def test_pretraining_on_own_data(tmp_path, corpus, tokenizer_dir):
    """Held-out split said once, a sample from the data's own text, bins beside the run, no carriage-return
    flood in a pipe, no transformers deprecation warning."""
    out = tmp_path / "runs" / "mine"
    args = [a for a in pretrain_args(corpus, tokenizer_dir, out, "--max_steps", "4")]
    cut = args.index("--val_data_path")
    del args[cut:cut + 2]
    cut = args.index("--bin_dir")
    del args[cut:cut + 2]
    result = run_script("train_pretrain.py", *args)
    first_text = json.loads(corpus["train"].read_text().splitlines()[0])["text"]
    assert result.stdout.count("validation: the last ") == 1
    assert "validation: the last 2 of 9" in result.stdout or "(2.0%" in result.stdout or "--val_split 0.02" in \
        result.stdout
    assert f"sample: {first_text.strip()[:16]} → " in result.stdout
    assert list((tmp_path / "runs" / "bins").glob("*.bin")) and not (out / "bins").exists()
    assert "\r" not in result.stdout + result.stderr
    assert "pretrain: step 4/4  loss" in result.stdout
    assert "deprecated" not in result.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in row for row in rows)
    none = run_script("train_pretrain.py", *args, "--val_data_path", "", "--out_dir", tmp_path / "runs" / "none")
    assert none.stdout.count("validation: none (no --val_data_path): val_loss is not measured") == 1


@pytest.mark.slow
def test_tokenizer_reports_compression_on_the_users_held_out_text(tmp_path):
    data = write_jsonl(tmp_path / "english.jsonl", [{"text": f"{t} ({i})"} for i in range(50) for t in ENGLISH])
    result = run_script("train_tokenizer.py", "--data_path", data, "--out_dir", tmp_path / "tok", "--vocab_size", "300")
    assert "training text  " in result.stdout and "in 196 lines from" in result.stdout
    assert f"in 4 lines from {data} (the last 4 of the 200 lines read, not trained on)" in result.stdout
    assert "compression" in result.stdout and "dataset/demo" not in result.stdout
    none = run_script("train_tokenizer.py", "--data_path", data, "--out_dir", tmp_path / "tok2", "--vocab_size",
                      "300", "--val_data_path", "")
    assert none.stdout.count("held-out text  none (--val_data_path ''): no compression figure or round-trip "
                             "check") == 1


# --- 3. mismatches ------------------------------------------------------------------------------------------------

def test_a_tokenizer_that_is_not_the_models_is_refused(tmp_path, chat_checkpoint, capsys):
    from dataset.tokenizer import save_tokenizer, train_bpe

    ckpt, chats = chat_checkpoint["model"], chat_checkpoint["chats"]
    save_tokenizer(train_bpe(ENGLISH * 20, 300), tmp_path / "small")
    with pytest.raises(Exception) as excinfo:
        parse_args("sft", SFT_DEMO, argv=sft_argv(ckpt, chats, tmp_path / "o", "--tokenizer_dir", tmp_path / "small"))
    small = len(json.loads((tmp_path / "small" / "tokenizer.json").read_text())["model"]["vocab"])
    assert refusal(capsys, excinfo) == (
        f"--tokenizer_dir {tmp_path / 'small'} ({small} tokens) is not the tokenizer of --init_from {ckpt} (512 "
        "tokens): the model's token ids would mean other tokens; drop --tokenizer_dir to use the model's own")
    copy = shutil.copytree(ckpt, tmp_path / "copy_of_own")  # the model's own tokenizer, elsewhere: fine
    parse_args("sft", SFT_DEMO, argv=sft_argv(ckpt, chats, tmp_path / "o", "--tokenizer_dir", copy))


@pytest.mark.slow
def test_merge_lora_refuses_another_base_unless_forced(runs, chat_checkpoint, tmp_path):
    other = tiny_checkpoint(chat_checkpoint["model"], tmp_path / "other_base")
    lora = runs["lora"]
    base = json.loads((lora / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert os.path.realpath(base) == os.path.realpath(chat_checkpoint["model"])
    cmd = [sys.executable, "-m", "scripts.merge_lora", "--init_from", str(other), "--lora", str(lora)]
    refused = subprocess.run([*cmd, "--out_dir", str(tmp_path / "merged")], cwd=REPO, capture_output=True, text=True)
    assert refused.returncode == 2
    assert refused.stderr.strip() == (f"error: --lora {lora} was trained on {base} (its adapter_config.json), not on "
                                      f"--init_from {other}; merge it onto {base}, or pass --force to merge onto "
                                      f"{other} anyway")
    forced = subprocess.run([*cmd, "--out_dir", str(tmp_path / "merged"), "--force"], cwd=REPO, capture_output=True,
                            text=True)
    assert forced.returncode == 0 and f"warning: --force: {lora} was trained on {base}" in forced.stdout
    same = subprocess.run([*cmd, "--out_dir", str(other)], cwd=REPO, capture_output=True, text=True)
    assert same.returncode == 2 and "is the --init_from directory" in same.stderr


def test_max_seq_len_past_the_models_positions_is_refused(chat_checkpoint, tmp_path, capsys):
    with pytest.raises(Exception) as excinfo:
        parse_args("sft", SFT_DEMO, argv=sft_argv(chat_checkpoint["model"], chat_checkpoint["chats"], tmp_path / "o",
                                                  "--max_seq_len", "1024"))
    assert refusal(capsys, excinfo) == (f"--max_seq_len 1024 is above the max_position_embeddings 512 of --init_from "
                                        f"{chat_checkpoint['model']}; allowed: max_seq_len <= 512")


@pytest.mark.slow
def test_shape_flags_beside_init_from_are_refused(chat_checkpoint, corpus, tmp_path):
    result = run_script("train_pretrain.py", "--init_from", chat_checkpoint["model"], "--data_path", corpus["train"],
                        "--out_dir", tmp_path / "o", "--hidden_size", "256", "--preset", "small", check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: --preset, --hidden_size set the shape of a new model, but --init_from "
                                     f"{chat_checkpoint['model']} already has one (its config.json); drop them, or "
                                     "drop --init_from to train a new model")


# --- 4. bad values: one line, exit 2, before any work -------------------------------------------------------------

@pytest.mark.parametrize("flag, value, allowed", [
    ("--batch_size", "0", "int >= 1"), ("--learning_rate", "-1", "float > 0"), ("--max_steps", "-3", "int >= 0"),
    ("--epochs", "0", "int >= 1"), ("--accumulation_steps", "0", "int >= 1"), ("--warmup_steps", "-1", "int >= 0"),
    ("--grad_clip", "-0.5", "float >= 0"), ("--val_split", "1", "0 <= float < 1"),
    ("--system_prompt_ratio", "1.5", "0 <= float <= 1"), ("--log_every", "0", "int >= 1"),
])
def test_out_of_range_values_are_one_line(flag, value, allowed, chat_checkpoint, tmp_path, capsys):
    from trainer.chat_stage import add_chat_flags

    with pytest.raises(SystemExit) as excinfo:
        parse_args("sft", SFT_DEMO, add_chat_flags, argv=[flag, value])
    assert refusal(capsys, excinfo).startswith(f"error: argument {flag}: {value} is out of range; allowed: {allowed} "
                                               "(see ")


@pytest.mark.slow
def test_a_bad_value_stops_the_script_before_any_work(tmp_path, chat_checkpoint):
    out = tmp_path / "never"
    result = run_script("train_sft.py", *sft_argv(chat_checkpoint["model"], chat_checkpoint["chats"], out),
                        "--batch_size", "0", check=False)
    assert result.returncode == 2 and not out.exists()
    assert result.stderr == ("error: argument --batch_size: 0 is out of range; allowed: int >= 1 "
                             "(see train_sft.py --help)\n")
    dpo = run_script("train_dpo.py", "--beta", "-1", check=False)
    assert dpo.returncode == 2
    assert dpo.stderr.startswith("error: argument --beta: -1 is out of range; allowed: float > 0")


# --- 5. help, warnings, hints -------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("script, expect", [
    ("train_tokenizer.py", ["--vocab_size VOCAB_SIZE", "(default: 6400)", "(default: out/tokenizer)"]),
    ("train_pretrain.py", ["(default: 256)", "(default: demo)", "OUT_DIR/../bins", "(default: 0.002)"]),
    ("train_sft.py", ["(default: out/pretrain)", "(default: out/sft)", "(default: 1)"]),
    ("train_lora.py", ["(default: 2)", "(default: 8)"]),
    ("train_dpo.py", ["(default: 2e-05)", "(default: 0.1)"]),
    ("train_distill_reason.py", ["(default: 384)", "(default: 2.0)"]),
    ("-m scripts.merge_lora", ["--force"]),
])
def test_help_shows_each_flags_meaning_and_real_default(script, expect):
    result = subprocess.run([sys.executable, *script.split(), "--help"], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "400"})
    assert result.returncode == 0, result.stderr
    text = result.stdout
    module = script if script.endswith(".py") else script.split()[-1].replace(".", "/") + ".py"
    doc_first_line = (REPO / module).read_text().split('"""')[1].strip().splitlines()[0]
    assert doc_first_line in text  # the description says what the stage does
    for item in expect:
        assert item in text, item
    entries: list[list[str]] = []  # each flag's lines: its invocation, then its help
    for line in text.split("options:")[1].splitlines():
        if line.startswith("  --"):
            entries.append(line.strip().split("  ", 1))
        elif entries and line.startswith("      "):
            entries[-1].append(line.strip())
    assert len(entries) > 3
    for flag, *meaning in entries:  # every flag says what it is; in a stage, a valued flag its default too
        assert " ".join(meaning).strip(), f"{flag} has no help"
        if script.startswith("train_") and " " in flag:
            assert "default" in " ".join(meaning), f"{flag} shows no default"


@pytest.mark.slow
def test_an_adapter_as_init_from_points_at_merge_lora(runs, chat_checkpoint, tmp_path, capsys):
    lora = runs["lora"]
    with pytest.raises(Exception) as excinfo:
        parse_args("dpo", SFT_DEMO, argv=sft_argv(lora, chat_checkpoint["chats"], tmp_path / "o"))
    base = json.loads((lora / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert refusal(capsys, excinfo) == (
        f"--init_from {lora} is a LoRA adapter, not a whole model; merge it into its base first: `python -m "
        f"scripts.merge_lora --init_from {base} --lora {lora} --out_dir {lora}_merged`, then --init_from {lora}_merged")


def test_a_chat_file_given_to_pretraining_points_at_sft(chat_checkpoint, corpus, tmp_path, capsys):
    chats = chat_checkpoint["chats"]
    with pytest.raises(Exception) as excinfo:
        parse_args("pretrain", {"data_path": "dataset/demo/pretrain.jsonl"}, argv=["--data_path", chats])
    assert refusal(capsys, excinfo) == (f"--data_path {chats} holds chat records (conversations), not the pretraining "
                                        f"text ({{\"text\"}}) pretrain trains on; train on it with `python "
                                        f"train_sft.py --data_path {chats}`")
    with pytest.raises(Exception) as excinfo:
        parse_args("sft", SFT_DEMO, argv=sft_argv(chat_checkpoint["model"], corpus["train"], tmp_path / "o"))
    message = refusal(capsys, excinfo)
    assert "train_pretrain.py --data_path" in message and "--data_path chats.jsonl:0.8,TEXT.jsonl:0.2" in message
    # After chat data, by weight, the same text is SFT's replay of pretraining: no refusal.
    args = parse_args("sft", SFT_DEMO, argv=sft_argv(chat_checkpoint["model"], f"{chats}:0.8,{corpus['train']}:0.2",
                                                     tmp_path / "o"))
    assert args.data_path.endswith(":0.2")
