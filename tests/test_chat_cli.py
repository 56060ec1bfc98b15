"""chat.py: the terminal chat driven through a pipe and through a pseudo-terminal, on a tiny random model."""

import io
import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dataset.chat import load_tokenizer
from model import LM
from model.lora import apply_lora, save_lora
from serving.chat_format import AnswerStream
from serving.engine import Engine, SamplingParams, complete
from serving.loading import load
from serving.terminal import Conversation, Printer

REPO = Path(__file__).resolve().parents[1]


def chat(model_dir: Path, stdin: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "chat.py", "--model", str(model_dir), "--seed", "0", *args],
                          input=stdin, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_pipe_commands_and_streamed_answers(chat_checkpoint):
    script = "你好\n/think off\n好评吗\n/system 你是一个助手\n/reset\n/think maybe\n/bogus\n/help\n再见\n"
    result = chat(chat_checkpoint["model"], script, "--max_new_tokens", "6", "--temperature", "1")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("danlu chat (chat model, context 512 tokens)")
    for said in ("(thinking off)", "(system prompt set)", "(conversation cleared)", "usage: /think on|off",
                 "unknown command /bogus", "/system TEXT"):
        assert said in out
    assert out.count("[max_new_tokens reached]") + out.count("\n") >= 3
    assert "\x1b[" not in out  # no colours on a pipe
    again = chat(chat_checkpoint["model"], script, "--max_new_tokens", "6", "--temperature", "1")
    assert again.stdout == out  # --seed makes the samples repeatable
    # The answer itself: what the engine samples for the rendered question with chat.py's parameters and seed, on
    # the line after the banner.
    loaded = load(chat_checkpoint["model"], None, "cpu", None)
    question = "这条评论是好评还是差评？质量很好"
    prompt, _ = Conversation(loaded.tokenizer, loaded.context_length, "").prompt(question, 6)
    engine = Engine(loaded.model, max_batch=1, max_context=loaded.context_length).start()
    try:
        params = SamplingParams(max_new_tokens=6, temperature=1.0, top_p=0.9, seed=0,
                                stop_token_ids=tuple(loaded.stop_token_ids))
        expected = loaded.tokenizer.decode(complete(engine, prompt, params).tokens, skip_special_tokens=True)
    finally:
        engine.close()
    sampled = chat(chat_checkpoint["model"], question + "\n", "--max_new_tokens", "6", "--temperature", "1")
    assert expected.strip() and sampled.stdout.split("\n", 1)[1].startswith(expected)


@pytest.mark.slow
def test_long_conversation_drops_oldest_turns(chat_checkpoint):
    message = "这条评论是好评还是差评？质量很好，物流很快，包装也不错，下次还会再来买的。" * 3
    result = chat(chat_checkpoint["model"], (message + "\n") * 8, "--max_new_tokens", "40", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert "(context window full: dropped the" in result.stdout


def test_conversation_keeps_within_context(chat_checkpoint):
    tokenizer = load_tokenizer(chat_checkpoint["model"])
    conversation = Conversation(tokenizer, context_length=200, system="系统")
    for i in range(6):
        ids, dropped = conversation.prompt(f"第{i}个问题：质量很好吗？" * 3, answer_room=50)
        assert len(ids) + 50 <= 200
        conversation.turns += [{"role": "user", "content": f"第{i}个问题：质量很好吗？" * 3},
                               {"role": "assistant", "content": "好评" * 10}]
    assert dropped >= 2 and conversation.turns[0]["role"] == "user"
    assert "系统" in tokenizer.decode(ids)  # the system prompt is never dropped


def test_think_block_printed_apart(chat_checkpoint):
    tokenizer = load_tokenizer(chat_checkpoint["model"])
    out = io.StringIO()
    printer, stream = Printer(out, color=False), AnswerStream(tokenizer)
    for token in tokenizer("<think>\n先看评论。\n</think>\n\n好评", add_special_tokens=False)["input_ids"]:
        printer.write(stream.feed(token))
    printer.write(stream.finish("stop")[0])
    assert out.getvalue() == "[think] 先看评论。\n[/think]\n好评"


@pytest.mark.slow
def test_base_model_continues_raw_text(chat_checkpoint, tmp_path):
    base = tmp_path / "pretrain"
    base.mkdir()
    for f in Path(chat_checkpoint["model"]).iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    (base / "args.json").write_text(json.dumps({"stage": "pretrain"}))
    result = chat(base, "质量很好\n", "--max_new_tokens", "5", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert "base model" in result.stdout.splitlines()[0]
    tokenizer = load_tokenizer(base)
    prompt = tokenizer("质量很好", add_special_tokens=False)["input_ids"]
    new_tokens = LM.from_pretrained(base).eval().generate(torch.tensor([prompt]), max_new_tokens=5,
                                                          do_sample=False)[0, len(prompt):]
    continuation = tokenizer.decode(new_tokens, skip_special_tokens=True)
    assert continuation.strip() and result.stdout.splitlines()[1].startswith("质量很好" + continuation)


@pytest.mark.slow
def test_lora_adapter_and_bad_directories(chat_checkpoint, tmp_path):
    model = LM.from_pretrained(chat_checkpoint["model"])
    apply_lora(model, r=4, alpha=8)
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_()
    save_lora(model, tmp_path / "lora", base_model_path=str(chat_checkpoint["model"]))
    greedy = ("--max_new_tokens", "4", "--temperature", "0")
    result = chat(chat_checkpoint["model"], "你好\n", "--lora", str(tmp_path / "lora"), *greedy)
    assert result.returncode == 0, result.stderr
    plain = chat(chat_checkpoint["model"], "你好\n", *greedy)
    assert result.stdout != plain.stdout  # the adapter changes the (greedy) answer
    bad = chat(tmp_path / "lora", "")
    assert bad.returncode == 2 and "pass it as --lora" in bad.stderr
    missing = chat(tmp_path / "nothing", "")
    assert missing.returncode == 2 and "no config.json" in missing.stderr


def read_until(fd: int, marker: str, timeout: float = 60) -> str:
    seen = b""
    deadline = time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
            if marker.encode() in seen:
                break
    return seen.decode("utf-8", errors="replace")


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(pty, "openpty"), reason="no pseudo-terminals here")
def test_terminal_session_through_a_pty(chat_checkpoint):
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "chat.py", "--model", str(chat_checkpoint["model"]), "--seed", "0",
                             "--max_new_tokens", "5"], cwd=REPO, stdin=follower, stdout=follower,
                            stderr=subprocess.DEVNULL, env={**os.environ, "TERM": "xterm"})
    os.close(follower)
    try:
        assert "你> " in read_until(leader, "你> ")
        os.write(leader, "你好\n".encode())
        answer = read_until(leader, "你> ")
        assert "模型> " in answer
        os.write(leader, b"/reset\n")
        assert "(conversation cleared)" in read_until(leader, "你> ")
        os.write(leader, b"\x04")  # Ctrl-D leaves
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
