"""serve.py: the OpenAI-compatible server, driven by the official `openai` client against a live server process
on a tiny random model (a test of the protocol, not of the answers); the engine's continuous batching against
plain generation; the answer stream (stop strings, think block, tool calls) on its own."""

import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from dataset.chat import load_tokenizer, render_chat
from model import LM
from model.lora import apply_lora, load_lora, save_lora, stack_adapters
from serving.chat_format import (
    AnswerStream,
    StopMatcher,
    ThinkSplitter,
    chat_logprobs,
    completion_logprobs,
    parse_tool_calls,
    token_bytes,
)
from serving.engine import Engine, NoSuchAdapter, SamplingParams, complete, start_together, wait_idle
from tests.conftest import FIXTURES

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-test-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model_dir: Path, *args: str, timeout: float = 120) -> tuple[subprocess.Popen, str]:
    """serve.py on 127.0.0.1 and a free port; (process, base url) once /health answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "serve.py", "--model", str(model_dir), "--port", str(port), *args],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve.py exited {proc.returncode}:\n{proc.stdout.read()}")
        try:
            if requests.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except requests.RequestException:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("serve.py did not answer /health in time")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def serve_model(chat_checkpoint, tmp_path_factory) -> Path:
    """The tiny chat model with a 2048-token context (room for the tool prompt, which this tokenizer spells
    mostly byte by byte)."""
    out = tmp_path_factory.mktemp("serve") / "model"
    out.mkdir()
    for f in Path(chat_checkpoint["model"]).iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    config = json.loads((out / "config.json").read_text())
    config["max_position_embeddings"] = 2048
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def server(serve_model):
    proc, url = start_server(serve_model, "--api_key", KEY)
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model_id(client) -> str:
    return client.models.list().data[0].id


def health(url: str) -> dict:
    return requests.get(f"{url}/health").json()


def greedy_text(model_dir: Path, messages: list[dict], max_new_tokens: int,
                adapter: Path | None = None) -> tuple[list[int], str]:
    """What plain greedy generation of our model gives for a chat (the reference for the server's answers)."""
    return greedy_continuation(model_dir, render_chat(messages, add_generation_prompt=True), max_new_tokens, adapter)


def greedy_continuation(model_dir: Path, text: str, max_new_tokens: int,
                        adapter: Path | None = None) -> tuple[list[int], str]:
    """Plain greedy generation after a text (its tokens, and the text up to a stop token), with `adapter`'s LoRA
    loaded (unmerged) where one is given."""
    tokenizer = load_tokenizer(model_dir)
    model = LM.from_pretrained(model_dir).eval()
    if adapter is not None:
        load_lora(model, adapter)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False)
    tokens = out[0, len(prompt):].tolist()
    stops = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    kept = []
    for token in tokens:
        if token in stops:
            break
        kept.append(token)
    return tokens, tokenizer.decode(kept, clean_up_tokenization_spaces=False)


MESSAGES = [{"role": "system", "content": "你是一个助手。"},
            {"role": "user", "content": "这条评论是好评还是差评？质量很好"}]


# -- the protocol -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_models_and_health(server, client, serve_model):
    openai = pytest.importorskip("openai")
    models = client.models.list().data
    assert [m.id for m in models] == [serve_model.name]
    assert client.models.retrieve(serve_model.name).id == serve_model.name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    assert health(server)["status"] == "ok"


@pytest.mark.slow
def test_chat_completion_equals_greedy_generation_with_usage(client, model_id, serve_model):
    tokens, text = greedy_text(serve_model, MESSAGES, 12)
    answer = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=12, temperature=0)
    choice = answer.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == text
    stopped = len(tokens) < 12 or tokens[-1] in (0, 2)
    assert choice.finish_reason == ("stop" if stopped else "length")
    assert answer.usage.completion_tokens == len(tokens)
    assert answer.usage.prompt_tokens > 10
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")


@pytest.mark.slow
def test_max_tokens_gives_finish_reason_length(client, model_id):
    answer = client.chat.completions.create(model=model_id, messages=MESSAGES, max_completion_tokens=3,
                                            temperature=0, stop=None, extra_body={"ignore_eos": True})
    assert answer.usage.completion_tokens == 3 and answer.choices[0].finish_reason == "length"


@pytest.mark.slow
def test_stream_chunks_role_content_finish_done(server, model_id, serve_model):
    _, text = greedy_text(serve_model, MESSAGES, 20)
    body = {"model": model_id, "messages": MESSAGES, "max_tokens": 20, "temperature": 0, "stream": True}
    with requests.post(f"{server}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                       stream=True, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == model_id for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and all(isinstance(c["created"], int) for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["choices"][0]["index"] == 0 for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == text


@pytest.mark.slow
def test_stream_with_openai_client_and_usage(client, model_id):
    stream = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=8, temperature=0.7,
                                            seed=1, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 8 or chunks[-2].choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    again = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=8, temperature=0.7, seed=1)
    assert again.choices[0].message.content == streamed  # the same seed, the same sample


@pytest.mark.slow
def test_seed_and_sampling_parameters(client, model_id):
    def ask(**kw):
        return client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=16, **kw) \
            .choices[0].message.content
    sampled = dict(temperature=1.0, top_p=0.95, seed=123, frequency_penalty=0.5, presence_penalty=0.3)
    assert ask(**sampled) == ask(**sampled)
    texts = {ask(temperature=1.0, seed=s) for s in range(4)}
    assert len(texts) > 1
    assert ask(temperature=0, extra_body={"repetition_penalty": 1.3, "top_k": 5}) is not None


@pytest.mark.slow
def test_logit_bias_forces_and_bans_tokens(client, model_id, serve_model):
    tokenizer = load_tokenizer(serve_model)
    forced = tokenizer("好", add_special_tokens=False)["input_ids"]
    assert len(forced) == 1

    def ask(bias, **kw):
        return client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=4, logit_bias=bias,
                                              extra_body={"ignore_eos": True}, **kw).choices[0].message.content
    assert ask({str(forced[0]): 100}, temperature=1.0, seed=0) == "好" * 4
    tokens, text = greedy_text(serve_model, MESSAGES, 4)
    assert ask({}, temperature=0) == text
    assert ask({str(tokens[0]): -100}, temperature=0) != text  # its first token banned, greedy answers otherwise


def model_logprobs(model_dir: Path, prompt: list[int], tokens: list[int], adapter: Path | None = None) -> torch.Tensor:
    """log p(token | everything before it) for each of `tokens` after `prompt`, from one forward pass (with
    `adapter`'s LoRA loaded where one is given)."""
    model = LM.from_pretrained(model_dir).eval()
    if adapter is not None:
        load_lora(model, adapter)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1].float()
    return logits.log_softmax(-1)


@pytest.mark.slow
def test_logprobs_are_the_models(server, client, model_id, serve_model):
    tokenizer = load_tokenizer(serve_model)
    prompt = tokenizer(render_chat(MESSAGES, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    ask = dict(model=model_id, messages=MESSAGES, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    answer = client.chat.completions.create(**ask, logprobs=True, top_logprobs=3).choices[0]
    tokens, _ = greedy_text(serve_model, MESSAGES, 6)
    expected = model_logprobs(serve_model, prompt, tokens)
    content = answer.logprobs.content
    assert b"".join(bytes(c.bytes) for c in content).decode() == answer.message.content
    for position, (entry, token) in enumerate(zip(content, tokens)):
        assert entry.logprob == pytest.approx(float(expected[position, token]), abs=2e-3)
        top = expected[position].topk(3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=2e-3)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the most likely
    assert len(content) == 6
    plain = client.chat.completions.create(**ask).choices[0]
    assert plain.logprobs is None and plain.message.content == answer.message.content
    # streamed: the same records, spread over the chunks
    chunks = client.chat.completions.create(**ask, logprobs=True, top_logprobs=3, stream=True)
    streamed = [entry for chunk in chunks if chunk.choices[0].logprobs for entry in chunk.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    # completions: parallel lists, text offsets, and the top alternatives as {token: logprob}. logit_bias forces
    # the tokens (so they are known), and the logprobs are the model's own, before the bias.
    text, bang = "The review says: good", tokenizer("!", add_special_tokens=False)["input_ids"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    body = dict(model=model_id, prompt=text, max_tokens=3, temperature=0, logprobs=2, logit_bias={str(bang[0]): 100},
                extra_body={"ignore_eos": True})
    completion = client.completions.create(**body).choices[0]
    logprobs = completion.logprobs
    assert completion.text == "!!!" and logprobs.tokens == ["!"] * 3 and logprobs.text_offset == [0, 1, 2]
    expected = model_logprobs(serve_model, ids, bang * 3)
    assert logprobs.token_logprobs == pytest.approx(expected[:, bang[0]].tolist(), abs=2e-3)
    for top, row in zip(logprobs.top_logprobs, expected):
        assert sorted(top.values(), reverse=True) == pytest.approx(row.topk(2).values.tolist(), abs=2e-3)
    streamed = [c.choices[0].logprobs for c in client.completions.create(**body, stream=True) if c.choices[0].logprobs]
    assert sum((s.tokens for s in streamed), []) == logprobs.tokens
    assert sum((s.text_offset for s in streamed), []) == logprobs.text_offset


@pytest.mark.slow
def test_echo_scores_the_prompt(server, client, model_id, serve_model):
    """echo + logprobs + max_tokens 0 scores a text (what lm-evaluation-harness's loglikelihood asks a server)."""
    tokenizer = load_tokenizer(serve_model)
    text = "The review says: good quality, 12+7=19."  # ASCII: every token is whole characters
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    expected = model_logprobs(serve_model, ids[:1], ids[1:])
    scored = client.completions.create(model=model_id, prompt=text, max_tokens=0, echo=True, logprobs=1).choices[0]
    assert scored.text == text and scored.finish_reason == "length"
    logprobs = scored.logprobs
    assert "".join(logprobs.tokens) == text and logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.token_logprobs[1:] == pytest.approx([float(expected[i, t]) for i, t in enumerate(ids[1:])],
                                                        abs=2e-3)
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(ids))]
    # with a completion: the prompt's records, then the new tokens'; streamed, the same
    body = dict(model=model_id, prompt=ids, max_tokens=3, temperature=0, echo=True, logprobs=2,
                extra_body={"ignore_eos": True})
    both = client.completions.create(**body).choices[0]
    assert both.text.startswith(tokenizer.decode(ids)) and len(both.logprobs.tokens) == len(ids) + 3
    assert both.logprobs.token_logprobs[0] is None
    assert both.logprobs.token_logprobs[1:len(ids)] == pytest.approx(logprobs.token_logprobs[1:], abs=1e-4)
    streamed = [c.choices[0] for c in client.completions.create(**body, stream=True)]
    assert "".join(c.text for c in streamed) == both.text
    assert sum((c.logprobs.tokens for c in streamed if c.logprobs), []) == both.logprobs.tokens
    assert client.completions.create(model=model_id, prompt=text, max_tokens=0, echo=True).choices[0].text == text
    # what lm-evaluation-harness's local-completions sends for loglikelihood: several prompts as token ids, one
    # answer each, choice i for prompt i; it reads token_logprobs[context:-1] and whether each was the top one
    short = ids[:5]
    lm_eval = {"model": model_id, "prompt": [ids, short], "temperature": 0, "max_tokens": 1, "logprobs": 1,
               "seed": 1234, "echo": True}
    reply = requests.post(f"{server}/v1/completions", json=lm_eval, headers={"Authorization": f"Bearer {KEY}"}).json()
    assert [c["index"] for c in reply["choices"]] == [0, 1]
    assert reply["usage"]["prompt_tokens"] == len(ids) + len(short)
    for choice, prompt in zip(reply["choices"], (ids, short)):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(prompt) + 1 and choice["text"].startswith(tokenizer.decode(prompt))
        assert lp["token_logprobs"][1:len(prompt)] == pytest.approx(logprobs.token_logprobs[1:len(prompt)], abs=1e-4)
        assert all(len(top) == 1 for top in lp["top_logprobs"][1:])
    # the one generated token is there when it is a stop token too (lm-eval drops the last token as the generated one)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    stopped = requests.post(f"{server}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                            json={**lm_eval, "prompt": [short], "logit_bias": {str(im_end): 100}}).json()["choices"][0]
    assert stopped["finish_reason"] == "stop" and stopped["logprobs"]["tokens"][-1] == "<|im_end|>"
    assert len(stopped["logprobs"]["token_logprobs"]) == len(short) + 1 and stopped["text"] == tokenizer.decode(short)
    # several string prompts with n = 2: prompt i's answers are choices 2i and 2i + 1
    several = client.completions.create(model=model_id, prompt=[text, text[:10]], n=2, max_tokens=2, temperature=0,
                                        echo=True)
    assert [c.index for c in several.choices] == [0, 1, 2, 3]
    assert [c.text.startswith(text) for c in several.choices] == [True, True, False, False]
    assert several.choices[2].text.startswith(text[:10])
    for bad in (dict(max_tokens=0), dict(echo=True, max_tokens=-1)):  # 0 only with echo
        response = requests.post(f"{server}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                                 json={"model": model_id, "prompt": text, **bad})
        assert response.status_code == 400 and response.json()["error"]["param"] == "max_tokens", bad


@pytest.mark.slow
def test_tokenizer_endpoints(server, serve_model):
    """vLLM's /tokenizer_info, /tokenize and /detokenize, which lm-evaluation-harness looks for."""
    tokenizer = load_tokenizer(serve_model)
    info = requests.get(f"{server}/tokenizer_info").json()
    assert info["eos_token"] == tokenizer.eos_token and info["chat_template"] == tokenizer.chat_template
    text = "质量很好，12+7=19"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    tokenized = requests.post(f"{server}/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert tokenized["tokens"] == ids and tokenized["count"] == len(ids)
    chat = requests.post(f"{server}/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    assert chat == tokenizer(render_chat(MESSAGES, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    assert requests.post(f"{server}/detokenize", json={"tokens": ids}).json() == {"prompt": text}
    for path, body, param in (("tokenize", {}, "prompt"), ("tokenize", {"prompt": 5}, "prompt"),
                              ("detokenize", {"tokens": [10 ** 9]}, "tokens"), ("detokenize", {}, "tokens")):
        response = requests.post(f"{server}/{path}", json=body)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, (path, body)


@pytest.mark.slow
def test_continue_final_message_and_echo(client, model_id, serve_model):
    """vLLM's continue_final_message: the answer goes on from the assistant's unfinished last message (a prefill),
    which echo repeats first, streamed or not; add_generation_prompt false opens no assistant turn."""
    prefill = "这条评论"
    messages = MESSAGES + [{"role": "assistant", "content": prefill}]
    tokens, text = greedy_continuation(serve_model, render_chat(MESSAGES, add_generation_prompt=True) + prefill, 5)
    for echo in (False, True):
        answer = client.chat.completions.create(model=model_id, messages=messages, max_tokens=5, temperature=0,
                                                extra_body={"continue_final_message": True, "echo": echo})
        assert answer.choices[0].message.content == (prefill if echo else "") + text
    chunks = client.chat.completions.create(model=model_id, messages=messages, max_tokens=5, temperature=0,
                                            stream=True, extra_body={"continue_final_message": True, "echo": True})
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == prefill + text
    tokenizer = load_tokenizer(serve_model)
    bare = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=1,
                                          extra_body={"add_generation_prompt": False})
    assert bare.usage.prompt_tokens == len(tokenizer(render_chat(MESSAGES), add_special_tokens=False)["input_ids"])


def test_stop_strings_are_cut_out_also_across_tokens(client, model_id):
    sampled = dict(model=model_id, messages=MESSAGES, max_tokens=24, temperature=1.0, seed=5)
    deltas = [c.choices[0].delta.content for c in client.chat.completions.create(**sampled, stream=True)
              if c.choices and c.choices[0].delta.content]
    text = "".join(deltas)
    # a stop string that spans a token boundary: the last character of one delta and the first of the next
    k = next(i for i in range(1, len(deltas) - 1) if deltas[i][-1] + deltas[i + 1][0] not in
             "".join(deltas[:i]) + deltas[i][:-1])
    stop = deltas[k][-1] + deltas[k + 1][0]
    expected = text[:text.index(stop)]
    answer = client.chat.completions.create(**sampled, stop=[stop, *(f"never-{i}" for i in range(5))])  # 6 > 4
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(**sampled, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_n_choices(client, model_id):
    answer = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=6, n=3, temperature=1.0,
                                            seed=7)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert 3 <= answer.usage.completion_tokens <= 18
    stream = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=6, n=2, stream=True)
    finished = {c.choices[0].index for c in stream if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}
    # the largest seed: the second choice's seed wraps around (torch takes seeds below 2**64)
    wrapped = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=3, n=2, temperature=1.0,
                                             seed=2**64 - 1)
    assert [c.finish_reason for c in wrapped.choices] in (["length"] * 2, ["length", "stop"], ["stop", "length"],
                                                          ["stop"] * 2)


@pytest.mark.slow
def test_completions_endpoint(client, model_id, serve_model):
    answer = client.completions.create(model=model_id, prompt="质量很好", max_tokens=5, temperature=0)
    assert answer.object == "text_completion" and answer.choices[0].finish_reason in ("stop", "length")
    assert answer.choices[0].text == greedy_continuation(serve_model, "质量很好", 5)[1]  # the raw text, no template
    assert answer.usage.completion_tokens <= 5
    stream = client.completions.create(model=model_id, prompt="质量很好", max_tokens=5, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == answer.choices[0].text
    chunks = list(client.completions.create(model=model_id, prompt="质量很好", max_tokens=5, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    assert chunks[-1].usage.model_dump() == answer.usage.model_dump()  # the same tokens in, the same out


@pytest.mark.slow
def test_tools_are_rendered(client, model_id, serve_model):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "天气",
                                               "parameters": {"type": "object", "properties": {
                                                   "city": {"type": "string"}}}}}]
    answer = client.chat.completions.create(model=model_id, messages=MESSAGES, tools=tools, max_tokens=4)
    assert answer.usage.prompt_tokens > client.chat.completions.create(
        model=model_id, messages=MESSAGES, max_tokens=1).usage.prompt_tokens + 20
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"北京\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "晴"}]
    with_history = client.chat.completions.create(model=model_id, messages=history, tools=tools, max_tokens=2)
    rendered = render_chat(history, tools=tools, add_generation_prompt=True)  # the call and its result in the prompt
    assert "北京" in rendered and "晴" in rendered
    in_tokens = len(load_tokenizer(serve_model)(rendered, add_special_tokens=False)["input_ids"])
    assert with_history.usage.prompt_tokens == in_tokens > answer.usage.prompt_tokens


VERDICT = {"type": "object", "properties": {"label": {"enum": ["好评", "差评"]}, "stars": {"type": "integer"},
                                            "why": {"type": "string", "maxLength": 4}},
           "required": ["label", "stars", "why"]}


def fits_verdict(text: str) -> bool:
    value = json.loads(text)
    return set(value) == {"label", "stars", "why"} and value["label"] in ("好评", "差评") and \
        isinstance(value["stars"], int) and isinstance(value["why"], str) and len(value["why"]) <= 4


@pytest.mark.slow
def test_structured_output(client, model_id):
    """response_format: the tiny model's sampled answers parse and fit the schema, streamed or not, in a chat and a
    completion; json_object gives an object."""
    response_format = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": VERDICT, "strict": True}}
    answer = client.chat.completions.create(model=model_id, messages=MESSAGES, response_format=response_format,
                                            temperature=1.0, seed=3, n=3, max_tokens=200)
    assert all(c.finish_reason == "stop" and fits_verdict(c.message.content) for c in answer.choices)
    stream = client.chat.completions.create(model=model_id, messages=MESSAGES, response_format=response_format,
                                            temperature=1.0, seed=4, max_tokens=200, stream=True)
    assert fits_verdict("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
    completion = client.completions.create(model=model_id, prompt="质量很好", max_tokens=200, temperature=1.0, seed=5,
                                           extra_body={"response_format": response_format})
    assert completion.choices[0].finish_reason == "stop" and fits_verdict(completion.choices[0].text)
    free = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=40, temperature=0,
                                          response_format={"type": "json_object"},
                                          logit_bias={str(t): 100 for t in json_tokens(client, model_id, "{}")})
    assert json.loads(free.choices[0].message.content) == {}  # the bias can pick among what fits, nothing else
    # a pattern, a format and integer bounds, as pydantic writes them
    order = {"type": "object", "required": ["code", "day", "stars"], "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{3}-\\d+$"}, "day": {"type": "string", "format": "date"},
        "stars": {"type": "integer", "minimum": 1, "maximum": 5}}}
    for seed in range(3):
        answer = client.chat.completions.create(model=model_id, messages=MESSAGES, temperature=1.0, seed=seed,
                                                max_tokens=300, response_format={"type": "json_schema", "json_schema":
                                                                                 {"name": "order", "schema": order}})
        value = json.loads(answer.choices[0].message.content)
        assert re.fullmatch(r"[A-Z]{3}-\d+", value["code"]) and 1 <= value["stars"] <= 5, value
        assert re.fullmatch(r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])", value["day"]), value


@pytest.mark.slow
def test_structured_output_choice(server, client, model_id):
    """vLLM's structured_outputs.choice (and its older guided_choice): the answer is one of the texts, sampled;
    its regex and its grammar (GBNF) too: the whole answer matches."""
    choices = ["好评", "差评", "好评价"]
    answers = set()
    for seed in range(6):
        answer = client.chat.completions.create(model=model_id, messages=MESSAGES, temperature=1.0, seed=seed,
                                                max_tokens=20, extra_body={"structured_outputs": {"choice": choices}})
        assert answer.choices[0].message.content in choices and answer.choices[0].finish_reason == "stop"
        answers.add(answer.choices[0].message.content)
    assert len(answers) > 1
    old = client.completions.create(model=model_id, prompt="质量很好", max_tokens=20, temperature=0,
                                    extra_body={"guided_choice": ["对", "错"]})
    assert old.choices[0].text in ("对", "错")
    schema = client.chat.completions.create(model=model_id, messages=MESSAGES, temperature=1.0, seed=0,
                                            max_tokens=200, extra_body={"structured_outputs": {"json": VERDICT}})
    assert fits_verdict(schema.choices[0].message.content)
    # structured_outputs.regex and .grammar (a GBNF): the whole answer matches, and ends where nothing more may come
    gbnf = 'root ::= verdict "：" [1-5] "星" ("，" why)?\nverdict ::= "好评" | "差评"\nwhy ::= [\\u4e00-\\u9fa5]{1,6}'
    for kind, value, pattern in [("regex", r"(好评|差评)：[1-5]星，\d{2}元", r"(好评|差评)：[1-5]星，\d{2}元"),
                                 ("grammar", gbnf, r"(好评|差评)：[1-5]星(，[\u4e00-\u9fa5]{1,6})?")]:
        texts = set()
        for seed in range(4):
            answer = client.chat.completions.create(model=model_id, messages=MESSAGES, temperature=1.0, seed=seed,
                                                    max_tokens=40, extra_body={"structured_outputs": {kind: value}})
            assert re.fullmatch(pattern, answer.choices[0].message.content), answer.choices[0].message.content
            assert answer.choices[0].finish_reason == "stop"
            texts.add(answer.choices[0].message.content)
        assert len(texts) > 1, kind
    # the older names, and llama.cpp's grammar
    for param, value, pattern in [("guided_regex", r"[a-z]{2,4}\.\d", r"[a-z]{2,4}\.\d"),
                                  ("guided_grammar", 'root ::= "[" in "]"\nin ::= "[" [a-z] "]" | [0-9]',
                                   r"\[(\[[a-z]\]|[0-9])\]"),
                                  ("grammar", 'root ::= [a-z]{2} ("." [0-9])?', r"[a-z]{2}(\.[0-9])?")]:
        old = client.completions.create(model=model_id, prompt="质量很好", max_tokens=30, temperature=0,
                                        extra_body={param: value})
        assert re.fullmatch(pattern, old.choices[0].text) and old.choices[0].finish_reason == "stop", param


@pytest.mark.slow
def test_tool_calls_the_model_opens_fit(client, model_id):
    """tool_choice "auto": the model decides whether to call, and a call it opens fits its function. The untrained
    model is made to open calls with logit_bias on `<tool_call>`: with the tools' grammar every call it opens
    parses; the same bias without tools' grammar (no tools in the request) writes none that parses."""
    (open_id,) = json_tokens(client, model_id, "<tool_call>")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 3}}, "required": ["city"]}}},
             {"type": "function", "function": {"name": "add", "parameters": {
                 "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}]
    calls = []
    for seed in range(3):
        answer = client.chat.completions.create(model=model_id, messages=MESSAGES, tools=tools, temperature=1.0,
                                                seed=seed, max_tokens=150, logit_bias={str(open_id): 100})
        assert answer.choices[0].finish_reason == "tool_calls"
        calls += answer.choices[0].message.tool_calls
    assert len(calls) >= 3
    one = client.chat.completions.create(model=model_id, messages=MESSAGES, tools=tools, temperature=1.0, seed=0,
                                         max_tokens=150, logit_bias={str(open_id): 100}, parallel_tool_calls=False)
    assert one.choices[0].finish_reason == "tool_calls" and len(one.choices[0].message.tool_calls) == 1
    assert one.usage.completion_tokens < 150  # the answer ended with its call
    for call in calls:
        arguments = json.loads(call.function.arguments)
        assert (call.function.name, set(arguments)) in (("get_weather", {"city"}), ("add", {"a"}))
    free = client.chat.completions.create(model=model_id, messages=MESSAGES, temperature=1.0, seed=0,
                                          max_tokens=150, logit_bias={str(open_id): 100})
    assert "<tool_call>" in free.choices[0].message.content and not parse_tool_calls(
        free.choices[0].message.content)[1]


def json_tokens(client, model_id: str, text: str) -> list[int]:
    base = str(client.base_url).removesuffix("/v1/")
    return requests.post(f"{base}/tokenize", json={"prompt": text}, timeout=10).json()["tokens"]


@pytest.mark.slow
def test_tool_choice_forces_a_call(client, model_id):
    """A named function or "required": the answer is a call, its arguments fit the function's parameters."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
                 "type": "object", "properties": {"city": {"type": "string", "maxLength": 4}}, "required": ["city"]}}},
             {"type": "function", "function": {"name": "add", "parameters": {
                 "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                 "required": ["a", "b"]}}}]
    named = client.chat.completions.create(model=model_id, messages=MESSAGES, tools=tools, temperature=1.0, seed=1,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           max_tokens=200)
    choice = named.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and len(json.loads(call.function.arguments)["city"]) <= 4
    names = set()
    for seed in range(4):
        required = client.chat.completions.create(model=model_id, messages=MESSAGES, tools=tools, temperature=1.0,
                                                  seed=seed, tool_choice="required", max_tokens=200)
        (call,) = required.choices[0].message.tool_calls
        arguments = json.loads(call.function.arguments)
        assert call.function.name in ("get_weather", "add")
        assert set(arguments) == ({"city"} if call.function.name == "get_weather" else {"a", "b"})
        names.add(call.function.name)
    assert names == {"get_weather", "add"}  # the model chose between them


# -- bad requests: OpenAI's error object, never a 500, the server lives on --------------------------------------------


BAD = [
    ("malformed JSON", b'{"model": "x", "messages": [', 400, "invalid_json"),
    ("not an object", b"[1, 2]", 400, "invalid_json"),
    ("missing messages", {"model": "MODEL"}, 400, "missing_required_parameter"),
    ("messages not a list", {"model": "MODEL", "messages": "hi"}, 400, "invalid_type"),
    ("bad role", {"model": "MODEL", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_value"),
    ("role a list", {"model": "MODEL", "messages": [{"role": ["user"], "content": "hi"}]}, 400, "invalid_value"),
    ("content of wrong type", {"model": "MODEL", "messages": [{"role": "user", "content": 5}]}, 400, "invalid_type"),
    ("image part", {"model": "MODEL", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "invalid_content"),
    ("temperature as string", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}],
                               "temperature": "hot"}, 400, "invalid_type"),
    ("temperature too high", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}],
                              "temperature": 9}, 400, "invalid_value"),
    ("max_tokens zero", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400,
     "invalid_value"),
    ("17 stop strings", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "stop": ["a"] * 17}, 400,
     "invalid_type"),
    ("an empty stop string", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", ""]},
     400, "invalid_value"),
    ("stop of wrong type", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "stop": 3}, 400,
     "invalid_type"),
    ("n too large", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "n": 1000}, 400,
     "invalid_value"),
    ("stream not a boolean", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"},
     400, "invalid_type"),
    ("tools malformed", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "tools": [{"x": 1}]},
     400, "invalid_type"),
    ("continue_final_message after a user", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}],
                                             "continue_final_message": True}, 400, "invalid_value"),
    ("continue_final_message with a generation prompt", {
        "model": "MODEL", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
        "continue_final_message": True, "add_generation_prompt": True}, 400, "invalid_value"),
    ("response_format of an unknown type", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}],
                                            "response_format": {"type": "yaml"}}, 400, "invalid_value"),
    ("json_schema without a name", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}],
                                    "response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, 400,
     "invalid_value"),
    ("a schema keyword not enforced", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}],
                                       "response_format": {"type": "json_schema", "json_schema": {
                                           "name": "x", "schema": {"type": "number", "multipleOf": 2}}}}, 400,
     "invalid_schema"),
    ("a schema with a dangling $ref", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}],
                                       "response_format": {"type": "json_schema", "json_schema": {
                                           "name": "x", "schema": {"$ref": "#/$defs/y"}}}}, 400, "invalid_schema"),
    ("a schema nested too deeply", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}],
                                    "response_format": {"type": "json_schema", "json_schema": {
                                        "name": "x", "schema": json.loads(
                                            '{"properties": {"a": ' * 450 + "{}" + "}}" * 450)}}},
     400, "invalid_schema"),
    ("temperature NaN", b'{"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
     400, "invalid_type"),
    ("seed out of range", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "seed": 2 ** 70}, 400,
     "invalid_value"),
    ("tool call without arguments", {"model": "MODEL", "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f"}}]}]}, 400, "invalid_type"),
    ("missing model", {"messages": [{"role": "user", "content": "hi"}]}, 400, "missing_required_parameter"),
    ("unknown model", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found"),
    ("prompt longer than the context", {"model": "MODEL", "messages": [{"role": "user", "content": "好评" * 5000}]},
     400, "context_length_exceeded"),
    ("max_tokens past the context", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}],
                                     "max_tokens": 100000}, 400, "context_length_exceeded"),
    ("a number too large for a float", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}],
                                        "temperature": 10 ** 400}, 400, "invalid_type"),
    ("a lone surrogate", b'{"model": "MODEL", "messages": [{"role": "user", "content": "\\ud800"}]}', 400,
     "invalid_json"),
    ("nested too deeply", b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json"),
    ("nested as deep as JSON reads", b"[" * 600 + b"]" * 600, 400, "invalid_json"),
    ("no content", {"model": "MODEL", "messages": [{"role": "user"}]}, 400, "missing_required_parameter"),
    ("a tool result without its call's id", {"model": "MODEL", "messages": [
        {"role": "user", "content": "hi"}, {"role": "tool", "content": "晴"}]}, 400, "missing_required_parameter"),
    ("tool calls from a user", {"model": "MODEL", "messages": [{"role": "user", "content": "hi", "tool_calls": []}]},
     400, "invalid_value"),
    ("reasoning_content a number", {"model": "MODEL", "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "a", "reasoning_content": 5},
        {"role": "user", "content": "hi"}]}, 400, "invalid_type"),
    ("structured_outputs grammar left-recursive", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}],
                                                   "structured_outputs": {"grammar": "root ::= root \"a\" | \"a\""}},
     400, "invalid_schema"),
    ("guided_grammar without root", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}],
                                     "guided_grammar": "answer ::= \"a\""}, 400, "invalid_schema"),
    ("grammar not a string", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "grammar": 5}, 400,
     "invalid_value"),
    ("structured_outputs grammar", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}],
                                    "structured_outputs": {"lark": "start: \"a\""}}, 400,
     "unsupported_parameter"),
    ("structured_outputs regex with a backreference", {"model": "MODEL", "messages": [
        {"role": "user", "content": "hi"}], "structured_outputs": {"regex": "(a)\\1"}}, 400, "invalid_schema"),
    ("guided_regex not a string", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}],
                                   "guided_regex": ["a"]}, 400, "invalid_value"),
    ("structured_outputs choice empty", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}],
                                         "structured_outputs": {"choice": []}}, 400, "invalid_value"),
    ("guided_choice not texts", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}],
                                 "guided_choice": ["a", 1]}, 400, "invalid_value"),
    ("guided_json not JSON", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}],
                              "guided_json": "{not json"}, 400, "invalid_schema"),
    ("json_schema's schema not an object", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}],
                                            "response_format": {"type": "json_schema", "json_schema": {
                                                "name": "x", "schema": [1]}}}, 400, "invalid_schema"),
    ("response_format and structured_outputs", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}],
                                                "response_format": {"type": "json_object"},
                                                "structured_outputs": {"choice": ["a"]}}, 400, "invalid_value"),
    ("tool_choice required without tools", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}],
                                            "tool_choice": "required"}, 400, "invalid_value"),
    ("tool_choice naming no tool", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}],
                                    "tool_choice": {"type": "function", "function": {"name": "g"}},
                                    "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "invalid_value"),
    ("a forced call's parameters not enforceable", {
        "model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required", "tools": [
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
                "d": {"type": "string", "format": "hostname"}}}}}]}, 400, "invalid_schema"),
    ("a forced call and a response format", {
        "model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required",
        "tools": [{"type": "function", "function": {"name": "f"}}], "response_format": {"type": "json_object"}}, 400,
     "invalid_value"),
    ("tool_choice unknown", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "tool_choice": "x"},
     400, "invalid_value"),
    ("logit_bias not an object", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}],
                                  "logit_bias": [5]}, 400, "invalid_type"),
    ("logit_bias key not a token id", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}],
                                       "logit_bias": {"好": 5}}, 400, "invalid_value"),
    ("logit_bias key past the vocabulary", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}],
                                            "logit_bias": {"99999999": 5}}, 400, "invalid_value"),
    ("logit_bias above 100", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}],
                              "logit_bias": {"1": 101}}, 400, "invalid_value"),
    ("logit_bias a string", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}],
                             "logit_bias": {"1": "5"}}, 400, "invalid_type"),
    ("logprobs a number in a chat", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}],
                                     "logprobs": 5}, 400, "invalid_type"),
    ("top_logprobs without logprobs", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}],
                                       "top_logprobs": 2}, 400, "invalid_value"),
    ("top_logprobs above 20", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                               "top_logprobs": 21}, 400, "invalid_value"),
    ("best_of", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "best_of": 2}, 400,
     "unsupported_parameter"),
    ("user a number", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "user": 5}, 400,
     "invalid_type"),
    ("stream_options without stream", {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}],
                                       "stream_options": {"include_usage": True}}, 400, "invalid_value"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,body,status,code", BAD, ids=[b[0] for b in BAD])
def test_bad_chat_requests_get_openai_errors(server, model_id, name, body, status, code):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    if isinstance(body, dict):
        body = json.dumps(body)
    body = body.replace(b'"MODEL"', json.dumps(model_id).encode()) if isinstance(body, bytes) else \
        body.replace('"MODEL"', json.dumps(model_id)).encode()
    response = requests.post(f"{server}/v1/chat/completions", data=body, headers=headers, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code and error["message"]
    assert health(server)["status"] == "ok"


@pytest.mark.slow
def test_bad_completion_requests_and_api_key(server, client, model_id):
    headers = {"Authorization": f"Bearer {KEY}"}
    for body in ({"model": model_id}, {"model": model_id, "prompt": 5}, {"model": model_id, "prompt": [10 ** 9]},
                 {"model": model_id, "prompt": ""}, {"model": model_id, "prompt": []},
                 {"model": model_id, "prompt": ["好", 5]}, {"model": model_id, "prompt": [[1, 2], []]},
                 {"model": model_id, "prompt": [[[1]]]}, {"model": model_id, "prompt": ["好"] * 65}):
        response = requests.post(f"{server}/v1/completions", json=body, headers=headers)
        assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    for logprobs, code in ((6, "invalid_value"), (True, "invalid_type")):
        response = requests.post(f"{server}/v1/completions", headers=headers,
                                 json={"model": model_id, "prompt": "好", "logprobs": logprobs})
        assert response.status_code == 400 and response.json()["error"]["code"] == code, logprobs
    for bad in ({}, {"Authorization": "Bearer wrong"}):
        response = requests.get(f"{server}/v1/models", headers=bad)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    response = requests.get(f"{server}/v1/nothing-here", headers=headers)
    assert response.status_code == 404 and "error" in response.json()
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=MESSAGES)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="nope", max_retries=0).models.list()
    assert client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=2).choices


@pytest.mark.slow
def test_client_disconnect_stops_generation(server, client, model_id):
    # a greedy answer that runs to max_tokens, so only the disconnect can end it early
    messages = [{"role": "user", "content": "好"}]
    budget = 1500  # a few seconds of decoding: far longer than the server takes to notice the disconnect (0.25 s)
    before = health(server)
    body = {"model": model_id, "messages": messages, "max_tokens": budget, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with requests.post(f"{server}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                       stream=True, timeout=60) as response:
        for i, _ in enumerate(response.iter_lines()):
            if i == 3:
                break
    deadline = time.time() + 10
    while time.time() < deadline and health(server)["active"]:
        time.sleep(0.05)
    after = health(server)
    assert after["active"] == 0
    assert after["finished"].get("cancelled", 0) == before["finished"].get("cancelled", 0) + 1
    assert after["tokens_generated"] - before["tokens_generated"] < budget
    aborted = f'vllm:request_success_total{{model_name="{model_id}",finished_reason="abort"}} '
    assert any(line.startswith(aborted) and float(line.split()[-1]) >= 1
               for line in requests.get(f"{server}/metrics").text.splitlines())  # counted as vLLM counts it


@pytest.mark.slow
def test_concurrent_requests_join_the_running_batch(server, client, model_id):
    prompts = [[{"role": "user", "content": f"这条评论是好评还是差评？{'很好' * i}"}] for i in range(6)]
    sampled = dict(model=model_id, max_tokens=40, temperature=1.0, seed=11)  # seeded: a fixed sample per prompt
    alone = [client.chat.completions.create(messages=m, **sampled).choices[0].message.content for m in prompts]
    results = [None] * len(prompts)

    def ask(i):
        time.sleep(0.02 * i)  # staggered: later requests arrive while earlier ones decode
        stream = client.chat.completions.create(messages=prompts[i], stream=True, **sampled)
        results[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone  # batching does not change the answers
    assert health(server)["max_batch_seen"] > 1


@pytest.mark.slow
def test_embeddings_are_the_last_hidden_state(client, model_id, serve_model):
    """/v1/embeddings through the official client (which asks for base64): each input's final hidden state at its
    last token, L2-normalised, as transformers' LlamaModel computes it; floats and base64 agree; bad inputs get a
    400."""
    openai = pytest.importorskip("openai")
    from transformers import LlamaForCausalLM

    reference = LlamaForCausalLM.from_pretrained(serve_model).eval()
    tokenizer = load_tokenizer(serve_model)
    texts = ["质量很好", "物流太慢了，差评", "好"]
    got = client.embeddings.create(model=model_id, input=texts)
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    assert [d.index for d in got.data] == [0, 1, 2] and got.usage.prompt_tokens == sum(map(len, ids))
    for row, d in zip(ids, got.data):
        with torch.no_grad():
            hidden = reference.model(torch.tensor([row])).last_hidden_state[0, -1]
        assert np.allclose(d.embedding, (hidden / hidden.norm()).numpy(), atol=1e-5)
    assert abs(np.dot(got.data[0].embedding, got.data[1].embedding)) < 0.999  # different texts, different vectors
    floats = client.embeddings.create(model=model_id, input=ids[1], encoding_format="float")  # token ids, floats
    assert np.allclose(floats.data[0].embedding, got.data[1].embedding, atol=1e-6)
    for bad in [{"input": ""}, {"input": ["a"] * 300}, {"input": "a", "dimensions": 3},
                {"input": "a", "encoding_format": "hex"}, {"input": [[10**9]]}]:
        with pytest.raises(openai.BadRequestError):
            client.embeddings.create(model=model_id, **bad)


def test_metrics_count_the_requests(server, client, model_id):
    """GET /metrics: Prometheus' text format under vLLM's names; a request's prompt and generated tokens, its
    finish reason and its two timings are counted for its model; histogram buckets add up to their count."""
    def scrape() -> tuple[str, dict[str, float]]:
        text = requests.get(f"{server}/metrics").text  # outside /v1: no key, as vLLM's
        return text, {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                      if line and not line.startswith("#")}

    text, before = scrape()
    model = f'model_name="{model_id}"'
    answer = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=3, temperature=0, n=2,
                                            extra_body={"ignore_eos": True})
    text, after = scrape()

    def grew(name: str) -> float:
        return after[name] - before[name]

    assert grew(f"vllm:prompt_tokens_total{{{model}}}") == 2 * answer.usage.prompt_tokens  # n=2: two sequences
    assert grew(f"vllm:generation_tokens_total{{{model}}}") == answer.usage.completion_tokens == 6
    assert grew(f'vllm:request_success_total{{{model},finished_reason="length"}}') == 2
    assert grew(f'vllm:request_success_total{{{model},finished_reason="stop"}}') == 0
    for histogram in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds"):
        assert grew(f"{histogram}_count{{{model}}}") == 2 and grew(f"{histogram}_sum{{{model}}}") > 0
        buckets = [v for k, v in after.items() if k.startswith(f"{histogram}_bucket{{{model},")]
        assert buckets == sorted(buckets) and buckets[-1] == after[f"{histogram}_count{{{model}}}"]
    assert after[f"vllm:num_requests_running{{{model}}}"] == after[f"vllm:num_requests_waiting{{{model}}}"] == 0
    for family in ("num_requests_running", "prompt_tokens_total", "request_success_total",
                   "time_to_first_token_seconds"):
        assert f"# TYPE vllm:{family} " in text and f"# HELP vllm:{family} " in text


def test_web_page_is_served(server):
    page = requests.get(f"{server}/")
    assert page.status_code == 200 and "<html" in page.text.lower() and "/v1/chat/completions" in page.text


@pytest.mark.slow
def test_base_model_served(tmp_path, chat_checkpoint):
    """A base model: /v1/models says so, /v1/completions continues raw text."""
    base = tmp_path / "pretrain"
    base.mkdir()
    for f in Path(chat_checkpoint["model"]).iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    (base / "args.json").write_text(json.dumps({"stage": "pretrain"}))
    proc, url = start_server(base)
    try:
        models = requests.get(f"{url}/v1/models").json()["data"]
        assert models[0]["id"] == "pretrain" and models[0]["chat"] is False
        body = {"model": "pretrain", "prompt": "质量很好", "max_tokens": 4, "temperature": 0}
        assert requests.post(f"{url}/v1/completions", json=body).json()["usage"]["completion_tokens"] <= 4
    finally:
        stop_server(proc)


@pytest.mark.slow
def test_several_models_served(tmp_path, serve_model):
    """serve.py --model A --model other=B: both listed, each request answered by the model it names (its greedy
    answer), an unknown name a 404 listing both; two models under one name refused before serving."""
    from model import LMConfig

    other = tmp_path / "other-dir"
    shutil.copytree(serve_model, other)
    torch.manual_seed(1)
    LM(LMConfig.from_pretrained(serve_model)).save_pretrained(other)  # other weights, the same tokenizer
    proc, url = start_server(serve_model, "--model", f"other={other}", "--api_key", KEY)
    headers = {"Authorization": f"Bearer {KEY}"}
    try:
        names = [m["id"] for m in requests.get(f"{url}/v1/models", headers=headers).json()["data"]]
        assert names == [serve_model.name, "other"] and requests.get(f"{url}/health").json()["models"] == names
        for name, directory in zip(names, (serve_model, other)):
            body = {"model": name, "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
            answer = requests.post(f"{url}/v1/chat/completions", json=body, headers=headers).json()
            assert answer["model"] == name
            assert answer["choices"][0]["message"]["content"] == greedy_text(directory, MESSAGES, 8)[1]
        wrong = requests.post(f"{url}/v1/chat/completions", json={"model": "x", "messages": MESSAGES},
                              headers=headers)
        assert wrong.status_code == 404 and f"`{serve_model.name}`, `other`" in wrong.json()["error"]["message"]
    finally:
        stop_server(proc)
    twice = subprocess.run([sys.executable, "serve.py", "--model", str(serve_model), "--model", str(serve_model)],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert twice.returncode == 2 and "two models would be served under one name" in twice.stderr


def random_adapter(model_dir: Path, out: Path, seed: int, **lora) -> Path:
    """A LoRA adapter of `model_dir` with random B (so that it changes the answers), saved in `out`; the same one
    for the same seed, whatever ran before (A's initialisation draws from the global generator too)."""
    torch.manual_seed(seed)
    model = apply_lora(LM.from_pretrained(model_dir), **lora)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(std=0.1)
    save_lora(model, out, base_model_path=str(model_dir))
    return out


@pytest.mark.slow
def test_lora_adapters_served_next_to_their_base(tmp_path, serve_model):
    """serve.py --lora_modules a=DIR DIR: the base and both adapters listed (each adapter with its parent), each
    request answered by the adapter it names, as that adapter loaded alone answers; bad adapters refused."""
    first = random_adapter(serve_model, tmp_path / "first", 1, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    second = random_adapter(serve_model, tmp_path / "second", 2, r=8, alpha=8)
    shutil.copy(serve_model / "tokenizer.json", second)  # the LoRA stage saves its tokenizer: the base's
    proc, url = start_server(serve_model, "--lora_modules", f"a={first}", str(second))
    try:
        data = requests.get(f"{url}/v1/models").json()["data"]
        assert [(m["id"], m["parent"]) for m in data] == [(serve_model.name, None), ("a", serve_model.name),
                                                          ("second", serve_model.name)]
        tokenizer = load_tokenizer(serve_model)
        prompt = tokenizer(render_chat(MESSAGES, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        first_logprobs = []
        for name, adapter in ((serve_model.name, None), ("a", first), ("second", second)):
            body = {"model": name, "messages": MESSAGES, "max_tokens": 4, "temperature": 0, "logprobs": True,
                    "ignore_eos": True}
            answer = requests.post(f"{url}/v1/chat/completions", json=body).json()
            assert answer["model"] == name
            tokens, text = greedy_text(serve_model, MESSAGES, 4, adapter)
            assert answer["choices"][0]["message"]["content"] == text
            expected = model_logprobs(serve_model, prompt, tokens, adapter)
            got = [entry["logprob"] for entry in answer["choices"][0]["logprobs"]["content"]]
            assert got == pytest.approx([float(expected[i, t]) for i, t in enumerate(tokens)], abs=2e-3)
            first_logprobs.append(got[0])
        # each adapter changes the model's distribution (the tiny model's greedy text is the same for all three)
        assert min(abs(a - b) for i, a in enumerate(first_logprobs) for b in first_logprobs[:i]) > 0.01
    finally:
        stop_server(proc)

    def refused(*args: str) -> str:
        result = subprocess.run([sys.executable, "serve.py", "--model", str(serve_model), *args], cwd=REPO,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        return result.stderr

    assert f"{serve_model} is not a LoRA adapter directory" in refused("--lora_modules", f"x={serve_model}")
    (tmp_path / "other").mkdir()
    shutil.copy(FIXTURES / "minimind" / "tokenizer.json", tmp_path / "other")
    shutil.copy(first / "adapter_config.json", tmp_path / "other")
    assert "its tokenizer is not its base model's" in refused("--lora_modules", str(tmp_path / "other"))
    assert "two adapters would be served as a" in refused("--lora_modules", f"a={first}", f"a={second}")
    assert "give one of them" in refused("--lora", str(first), "--lora_modules", str(second))
    assert "go with one --model" in refused("--model", str(serve_model), "--lora_modules", str(first))
    assert "give one of them" in refused("--lora", str(first), "--allow_runtime_lora")


@pytest.mark.slow
def test_lora_adapters_loaded_and_unloaded_while_serving(tmp_path, serve_model, server):
    """serve.py --allow_runtime_lora (vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter): an adapter loaded
    is listed with its parent and answers as it does loaded alone; one unloaded is gone; the base answers as itself
    throughout; every bad request gets an error object; without the flag the endpoints say how to turn them on."""
    first = random_adapter(serve_model, tmp_path / "first", 1, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    second = random_adapter(serve_model, tmp_path / "second", 2, r=8, alpha=8)
    tokenizer = load_tokenizer(serve_model)
    prompt = tokenizer(render_chat(MESSAGES, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    references = {}  # the first token's logprob of each model, to tell them apart

    def answers_as(url: str, name: str, adapter: Path | None) -> None:
        body = {"model": name, "messages": MESSAGES, "max_tokens": 4, "temperature": 0, "logprobs": True,
                "ignore_eos": True}
        answer = requests.post(f"{url}/v1/chat/completions", json=body).json()
        tokens, _ = greedy_text(serve_model, MESSAGES, 4, adapter)
        expected = model_logprobs(serve_model, prompt, tokens, adapter)
        got = [entry["logprob"] for entry in answer["choices"][0]["logprobs"]["content"]]
        assert got == pytest.approx([float(expected[i, t]) for i, t in enumerate(tokens)], abs=2e-3)
        references.setdefault(adapter, got[0])

    def post(url: str, path: str, body: dict, status: int = 200) -> str:
        response = requests.post(f"{url}/v1/{path}", json=body)
        assert response.status_code == status, response.text
        return response.text if status == 200 else response.json()["error"]["message"]

    def listed(url: str) -> list[tuple[str, str | None]]:
        return [(m["id"], m["parent"]) for m in requests.get(f"{url}/v1/models").json()["data"]]

    base = serve_model.name
    proc, url = start_server(serve_model, "--allow_runtime_lora")
    try:
        assert listed(url) == [(base, None)]
        load = "load_lora_adapter"
        assert post(url, load, {"lora_name": "a", "lora_path": str(first)}) == \
            "Success: LoRA adapter 'a' added successfully."
        assert listed(url) == [(base, None), ("a", base)]
        answers_as(url, "a", first)
        answers_as(url, base, None)
        for name, adapter in ((base, None), ("a", first)):  # embeddings too are the adapter's
            model = LM.from_pretrained(serve_model).eval()
            if adapter is not None:
                load_lora(model, adapter)
            with torch.no_grad():
                hidden = model.model(torch.tensor([prompt]), torch.arange(len(prompt))[None], None, None)[0, -1]
            got = requests.post(f"{url}/v1/embeddings", json={"model": name, "input": prompt}).json()
            assert np.allclose(got["data"][0]["embedding"], (hidden / hidden.norm()).numpy(), atol=1e-5), name
        assert "already served" in post(url, load, {"lora_name": "a", "lora_path": str(second)}, 400)
        assert "already served" in post(url, load, {"lora_name": base, "lora_path": str(second)}, 400)
        assert "is not a LoRA adapter directory" in post(url, load, {"lora_name": "x", "lora_path": str(tmp_path)},
                                                         400)
        assert "'lora_path'" in post(url, load, {"lora_name": "x"}, 400)
        assert "'lora_name'" in post(url, load, {"lora_path": str(first)}, 400)
        (tmp_path / "other").mkdir()
        shutil.copy(FIXTURES / "minimind" / "tokenizer.json", tmp_path / "other")
        shutil.copy(first / "adapter_config.json", tmp_path / "other")
        assert "its tokenizer is not its base model's" in post(
            url, load, {"lora_name": "x", "lora_path": str(tmp_path / "other")}, 400)
        (tmp_path / "broken").mkdir()
        (tmp_path / "broken" / "adapter_config.json").write_text("{not json")
        (tmp_path / "bad_tokenizer").mkdir()
        shutil.copy(first / "adapter_config.json", tmp_path / "bad_tokenizer")
        (tmp_path / "bad_tokenizer" / "tokenizer.json").write_text("{}")
        assert "tokenizer.json: cannot be read" in post(
            url, load, {"lora_name": "x", "lora_path": str(tmp_path / "bad_tokenizer")}, 400)
        assert "adapter_config.json: not JSON" in post(
            url, load, {"lora_name": "x", "lora_path": str(tmp_path / "broken")}, 400)
        assert "is a base model" in post(url, "unload_lora_adapter", {"lora_name": base}, 400)
        assert post(url, load, {"lora_name": "b", "lora_path": str(second)}).startswith("Success")
        answers_as(url, "b", second)
        assert post(url, "unload_lora_adapter", {"lora_name": "a"}) == \
            "Success: LoRA adapter 'a' removed successfully."
        assert listed(url) == [(base, None), ("b", base)]
        response = requests.post(f"{url}/v1/chat/completions", json={"model": "a", "messages": MESSAGES})
        assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
        assert "is not loaded" in post(url, "unload_lora_adapter", {"lora_name": "a"}, 404)
        answers_as(url, "b", second)  # its block moved when a's went: it still answers as itself
        answers_as(url, base, None)
        assert post(url, load, {"lora_name": "a", "lora_path": str(second)}).startswith("Success")  # a name freed
        answers_as(url, "a", second)
        assert requests.get(f"{url}/health").json()["finished"].get("error") is None
        from hypothesis import HealthCheck, given, settings
        from hypothesis import strategies as st

        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(body=st.fixed_dictionaries({}, optional={"lora_name": st.text(max_size=4) | json_junk(),
                                                        "lora_path": st.text(max_size=8) | json_junk()}) | json_junk(),
               endpoint=st.sampled_from(["load_lora_adapter", "unload_lora_adapter"]))
        def junk_is_refused(body, endpoint):
            response = requests.post(f"{url}/v1/{endpoint}", data=json.dumps(body), timeout=60,
                                     headers={"Content-Type": "application/json"})
            assert response.status_code in (200, 400, 404), (body, response.text)
            if response.status_code != 200:
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}

        junk_is_refused()
        assert requests.get(f"{url}/health").json()["status"] == "ok"
    finally:
        stop_server(proc)
    assert len(set(references.values())) == 3  # the three models answer differently
    # without the flag (the module's server): the endpoints are off and say so
    response = requests.post(f"{server}/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(first)},
                             headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 404 and "--allow_runtime_lora" in response.json()["error"]["message"]


# -- the engine and the answer stream, in process ---------------------------------------------------------------------


def test_engines_share_one_thread(chat_checkpoint):
    """start_together (serve.py's several models): one thread steps both engines, each answers as its model does,
    one closed leaves the other serving, and the thread ends with the last."""
    first = LM.from_pretrained(chat_checkpoint["model"]).eval()
    second = LM(first.config).eval()
    torch.manual_seed(3)
    for param in second.parameters():  # large random weights: answers that differ from the first model's
        param.data.normal_(std=0.3)
    engines = start_together([Engine(first), Engine(second)])
    assert engines[0]._thread is engines[1]._thread and engines[0]._thread.is_alive()
    greedy = SamplingParams(max_new_tokens=10, temperature=0)
    prompts = [[1, 5, 9, 33], [1, 100, 7]]
    with torch.no_grad():
        refs = [[model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=[])[0, len(p):]
                 .tolist() for p in prompts] for model in (first, second)]
    assert refs[0] != refs[1]
    sequences = [[engine.submit(p, greedy) for p in prompts] for engine in engines]  # both at once
    assert [[list(seq) for seq in row] for row in sequences] == refs
    engines[0].close()
    time.sleep(0.2)  # time for the thread to end, were it wrongly to end with the first engine
    assert engines[1]._thread.is_alive()
    assert [complete(engines[1], p, greedy).tokens for p in prompts] == refs[1]
    engines[1].close()
    assert not engines[1]._thread.is_alive()


def test_engine_mixes_adapters_in_one_batch(chat_checkpoint, tmp_path):
    """Sequences on different stacked adapters decode in one batch, each as its adapter alone would."""
    directory = Path(chat_checkpoint["model"])
    adapters = {"a": random_adapter(directory, tmp_path / "a", 1, r=4, alpha=8),
                "b": random_adapter(directory, tmp_path / "b", 2, r=2, alpha=4, target_modules=["up_proj"])}
    alone = [LM.from_pretrained(directory).eval()] + [load_lora(LM.from_pretrained(directory), d).eval()
                                                       for d in adapters.values()]
    model = LM.from_pretrained(directory).eval()
    engine = Engine(model, adapters=stack_adapters(model, adapters))
    prompts = [([1, 5, 9, 33, 2, 7], 1), ([1, 100], 0), (list(range(3, 40)), 2), ([1, 5, 9, 33, 2, 7], 2),
               ([1, 300, 301], 1)]
    # queued before the engine starts, so that its first step admits them all into one batch
    sequences = [engine.submit(p, SamplingParams(max_new_tokens=12, temperature=0, logprobs=0), adapter=a)
                 for p, a in prompts]
    with pytest.raises(ValueError, match="no LoRA adapter 3"):
        engine.submit([1, 2], SamplingParams(), adapter=3)
    engine.start()
    try:
        results = [list(seq) for seq in sequences]
    finally:
        engine.close()
    assert engine.max_rows_seen == len(prompts)
    with torch.no_grad():
        refs = [alone[a].generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=[])[0, len(p):]
                .tolist() for p, a in prompts]
    assert results == refs
    # the same prompt, two adapters: two distributions (the tiny model's greedy tokens may still coincide)
    assert max(abs(a - b) for (a, _), (b, _) in zip(sequences[0].logprobs, sequences[3].logprobs)) > 1e-3
    for (prompt, adapter), seq in zip(prompts, sequences):  # and every step's distribution is its adapter's
        with torch.no_grad():
            logits = alone[adapter](torch.tensor([prompt + seq.tokens])).logits[0, len(prompt) - 1:-1]
        expected = logits.float().log_softmax(-1).gather(1, torch.tensor(seq.tokens)[:, None])[:, 0]
        assert [lp for lp, _ in seq.logprobs] == pytest.approx(expected.tolist(), abs=1e-4)




def test_engine_adds_and_removes_adapters_while_running(chat_checkpoint, tmp_path):
    """add_adapter and remove_adapter on a running engine: an adapter added serves as loaded alone; one removed
    takes no new sequence, finishes the ones it has as itself, and is unstacked once they are done."""
    directory = Path(chat_checkpoint["model"])
    paths = {"a": random_adapter(directory, tmp_path / "a", 1, r=4, alpha=8),
             "b": random_adapter(directory, tmp_path / "b", 2, r=2, alpha=4, target_modules=["up_proj"])}
    alone = {name: load_lora(LM.from_pretrained(directory), d).eval() for name, d in paths.items()}
    model = LM.from_pretrained(directory).eval()
    rows = stack_adapters(model, {"a": paths["a"]})
    engine = Engine(model, adapters=rows).start()
    prompt, greedy = [1, 5, 9, 33, 2, 7], SamplingParams(max_new_tokens=100, temperature=0)
    try:
        with torch.no_grad():
            refs = {name: m.generate(torch.tensor([prompt]), max_new_tokens=100, do_sample=False,
                                     eos_token_id=[])[0, len(prompt):].tolist() for name, m in alone.items()}
        b = engine.add_adapter(rows.read("b", paths["b"])).result(timeout=10)
        assert b == 2 and rows.names == {1: "a", 2: "b"}
        running = engine.submit(prompt, replace(greedy, logprobs=0), adapter=1)
        short = replace(greedy, max_new_tokens=10)
        assert complete(engine, prompt, short, adapter=b).tokens == refs["b"][:10]
        assert running.finish_reason is None  # one batch: it has decoded about 10 of its 100 tokens
        engine.remove_adapter(1)  # while its sequence decodes
        with pytest.raises(NoSuchAdapter):
            engine.submit(prompt, greedy, adapter=1)
        assert list(running) == refs["a"]  # finished as itself, every step's distribution a's
        with torch.no_grad():
            logits = alone["a"](torch.tensor([prompt + running.tokens])).logits[0, len(prompt) - 1:-1]
        expected = logits.float().log_softmax(-1).gather(1, torch.tensor(running.tokens)[:, None])[:, 0]
        assert [lp for lp, _ in running.logprobs] == pytest.approx(expected.tolist(), abs=1e-4)
        assert wait_idle(engine)
        deadline = time.time() + 5
        while 1 in rows.adapters and time.time() < deadline:
            time.sleep(0.01)
        assert rows.names == {2: "b"}
        assert complete(engine, prompt, short, adapter=b).tokens == refs["b"][:10]
        with pytest.raises(NoSuchAdapter):
            engine.remove_adapter(1)
        failed = engine.call(lambda: rows.read("c", tmp_path))  # not an adapter: the call's error comes back
        with pytest.raises(FileNotFoundError):
            failed.result(timeout=10)
    finally:
        engine.close()


def test_engine_batches_equal_single_generation(chat_checkpoint):
    model = LM.from_pretrained(chat_checkpoint["model"]).eval()
    engine = Engine(model).start()
    try:
        prompts = [[1, 5, 9, 33, 2, 7], [1, 100], list(range(3, 60)), [1, 300, 301, 302]]
        refs = [model.generate(torch.tensor([p]), max_new_tokens=30, do_sample=False, eos_token_id=[])[0, len(p):]
                .tolist() for p in prompts]
        results = [None] * len(prompts)

        def go(i):
            time.sleep(0.005 * i)
            results[i] = complete(engine, prompts[i], SamplingParams(max_new_tokens=30, temperature=0)).tokens

        threads = [threading.Thread(target=go, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == refs
        assert engine.max_rows_seen > 1
        a = complete(engine, [1, 2, 3], SamplingParams(max_new_tokens=8, temperature=0.8, seed=3, top_k=20))
        b = complete(engine, [1, 2, 3], SamplingParams(max_new_tokens=8, temperature=0.8, seed=3, top_k=20))
        assert a.tokens == b.tokens and a.finish_reason == "length"
        # The engine's own sampler against model/generation.py's: the penalties, and top_k / top_p cut to one token.
        penalties = dict(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2)
        penalised = [complete(engine, p, SamplingParams(max_new_tokens=30, temperature=0, **penalties)).tokens
                     for p in prompts]
        assert penalised == [model.generate(torch.tensor([p]), max_new_tokens=30, do_sample=False, eos_token_id=[],
                                            **penalties)[0, len(p):].tolist() for p in prompts]
        assert penalised != refs
        for cut in (dict(top_k=1), dict(top_p=1e-6), dict(top_p=1e-50)):  # 1e-50 is 0 in float32: the top stays
            hot = complete(engine, prompts[1], SamplingParams(max_new_tokens=30, temperature=5.0, seed=0, **cut))
            assert hot.tokens == refs[1], cut
        cold = complete(engine, prompts[1], SamplingParams(max_new_tokens=30, temperature=1e-50, seed=0))
        assert cold.tokens == refs[1]  # a temperature too small to divide by decodes greedily
        # logit_bias: -100 on greedy's first token leaves the next most likely one; +100 forces a token
        first = model(torch.tensor([prompts[1]])).logits[0, -1].float()
        first[refs[1][0]] -= 100
        banned = complete(engine, prompts[1], SamplingParams(max_new_tokens=3, temperature=0,
                                                             logit_bias={refs[1][0]: -100}))
        assert banned.tokens[0] == int(first.argmax()) != refs[1][0]
        forced = complete(engine, prompts[1], SamplingParams(max_new_tokens=5, temperature=1.0, seed=0,
                                                             logit_bias={7: 100}))
        assert forced.tokens == [7] * 5
        stop = complete(engine, prompts[0], SamplingParams(max_new_tokens=30, temperature=0,
                                                           stop_token_ids=(refs[0][3],)))
        assert stop.tokens == refs[0][:refs[0].index(refs[0][3]) + 1] and stop.finish_reason == "stop"
    finally:
        engine.close()


def test_token_bytes_spell_the_text():
    """logprobs give each token's bytes: a Chinese character or an emoji split over byte tokens comes back whole."""
    tokenizer = load_tokenizer(FIXTURES / "minimind")
    text = "新华社北京一月一日电 12+7=19，好评！<|im_end|> abc 😀"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = [token_bytes(tokenizer, i) for i in ids]
    assert b"".join(pieces).decode() == text and any(len(p) and not p.isascii() for p in pieces)
    records = [(i, -1.0, [(i, -1.0)]) for i in ids]
    assert [bytes(e["bytes"]) for e in chat_logprobs(tokenizer, records)["content"]] == pieces
    completion = completion_logprobs(tokenizer, records, offset=3)
    assert completion["text_offset"][0] == 3 and len(completion["tokens"]) == len(ids)


def test_stop_matcher_holds_back_partial_stops():
    matcher = StopMatcher(["END"])
    out = [matcher.feed(d) for d in ["ab", "cE", "N", "x", "yE", "ND", "more"]]
    assert "".join(out) == "abcENxy" and matcher.stopped


def test_think_split_streaming():
    text = "<think>\n先看评论。\n</think>\n\n好评"
    for size in (1, 2, 3, 7, 100):
        splitter = ThinkSplitter()
        reasoning = content = ""
        for i in range(0, len(text), size):
            r, c = splitter.feed(text[i:i + size])
            reasoning, content = reasoning + r, content + c
        r, c = splitter.flush()
        assert (reasoning + r, content + c) == ("先看评论。", "好评"), size
    assert ThinkSplitter().feed("好评")[1] == "好评"
    splitter = ThinkSplitter(thinking=True)
    assert splitter.feed("\n想")[0] == "想"


def test_answer_stream_tokens(chat_checkpoint):
    tokenizer = load_tokenizer(chat_checkpoint["model"])
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'
    cases = [
        ("<think>\n看看。\n</think>\n\n好评", dict(), ("看看。", "好评", None, "stop")),
        ("先查一下。\n" + call, dict(tools=True), ("", "先查一下。", "get_weather", "tool_calls")),
        ("好评。很好STOP多余", dict(stop=["STOP"]), ("", "好评。很好", None, "stop")),
    ]
    for text, options, (reasoning, content, tool, finish) in cases:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [im_end]
        answer = AnswerStream(tokenizer, stop_token_ids=[im_end], **options)
        deltas = [d for token in ids for d in answer.feed(token)]
        more, reason = answer.finish("stop")
        deltas += more
        assert answer.reasoning == reasoning and answer.content == content and reason == finish, text
        assert "".join(d.get("content", "") for d in deltas) == content
        if tool:
            assert answer.tool_calls[0]["function"]["name"] == tool
            assert json.loads(answer.tool_calls[0]["function"]["arguments"]) == {"city": "北京"}


def test_parse_tool_calls_leaves_bad_json_as_text():
    content, calls = parse_tool_calls("<tool_call>\nnot json\n</tool_call>")
    assert calls == [] and "not json" in content


@pytest.mark.slow
def test_bench_server_reports_rows(serve_model):
    from serving.bench import bench_server

    result = bench_server(serve_model, clients=(1, 3), requests_per_client=1, max_tokens=6, device="cpu")
    assert [row["clients"] for row in result["rows"]] == [1, 3]
    for row in result["rows"]:
        assert row["errors"] == 0 and row["requests"] == row["clients"]
        assert row["tokens_per_s"] > 0 and row["requests_per_s"] > 0
    assert result["rows"][1]["tokens_per_s"] == pytest.approx(18 / result["rows"][1]["seconds"], rel=0.05)
    assert all(row["first_error"] is None for row in result["rows"])


@pytest.mark.slow
def test_bench_server_says_why_the_server_stopped(serve_model, tmp_path, monkeypatch):
    from serving import bench

    stopped = r"(?s)did not start: its process exited 1: .*not a checkpoint directory: no config\.json"
    with pytest.raises(RuntimeError, match=stopped):
        bench.bench_server(tmp_path / "no_model", clients=(1,), device="cpu", timeout=120)

    servers, start, run_clients = [], bench._Server.__init__, bench._run_clients

    def remember(self, *args):
        start(self, *args)
        servers.append(self)

    def server_dies(url, *args):  # the server process goes away in the middle of the benchmark
        servers[-1].proc.kill()
        servers[-1].proc.wait()
        return run_clients(url, *args)

    monkeypatch.setattr(bench._Server, "__init__", remember)
    monkeypatch.setattr(bench, "_run_clients", server_dies)
    with pytest.raises(RuntimeError, match=r"stopped answering \(ConnectionError\); its process exited -9"):
        bench.bench_server(serve_model, clients=(1,), requests_per_client=1, max_tokens=4, device="cpu")


# -- a scripted model behind the real API: reasoning and tool calls as the openai client sees them ----------------


class ScriptedEngine:
    """Stands in for the engine: every sequence 'generates' the given text's tokens, then stops."""

    def __init__(self, tokens: list[int], stop_token: int):
        self.tokens, self.stop_token = tokens, stop_token
        self.active = self.steps = self.max_rows_seen = self.tokens_generated = 0
        self.finished = {}

    last_prompt: list[int] = []  # the prompt of the last sequence submitted

    def submit(self, prompt, params, on_event, adapter=0):
        ScriptedEngine.last_prompt = list(prompt)

        def play():
            for token in self.tokens[:params.max_new_tokens - 1] + [self.stop_token]:
                on_event(token, None)
            on_event(None, "stop")
        threading.Thread(target=play, daemon=True).start()

        class Handle:
            def cancel(self):
                pass
        return Handle()


@pytest.fixture()
def scripted(serve_model):
    """A function starting the API in this process on a model that always writes `text`; yields an openai client."""
    openai = pytest.importorskip("openai")
    import uvicorn

    from serving.api import Server, create_app
    from serving.loading import load

    servers = []

    def start(text: str):
        loaded = load(serve_model, device="cpu")
        tokens = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
        engine = ScriptedEngine(tokens, loaded.tokenizer.convert_tokens_to_ids("<|im_end|>"))
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(Server(loaded, engine, model_id="scripted")),
                                               host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        servers.append(server)
        return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)

    yield start
    for server in servers:
        server.should_exit = True


def test_reasoning_content_through_the_api(scripted):
    client = scripted("<think>\n评论说质量很好。\n</think>\n\n好评")
    answer = client.chat.completions.create(model="scripted", messages=MESSAGES, max_tokens=100)
    message = answer.choices[0].message
    assert message.content == "好评" and message.reasoning_content == "评论说质量很好。"
    assert answer.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model="scripted", messages=MESSAGES, max_tokens=100, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "评论说质量很好。"
    assert "".join(d.content or "" for d in deltas) == "好评"


def test_tool_calls_through_the_api(scripted):
    client = scripted('<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>')
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    answer = client.chat.completions.create(model="scripted", messages=MESSAGES, tools=tools, max_tokens=100)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "北京"}
    chunks = list(client.chat.completions.create(model="scripted", messages=MESSAGES, tools=tools, max_tokens=100,
                                                 stream=True))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(tc.index, tc.function.name) for tc in calls] == [(0, "get_weather")]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # without tools in the request the same text is plain content
    plain = client.chat.completions.create(model="scripted", messages=MESSAGES, max_tokens=100)
    assert plain.choices[0].message.tool_calls is None and "<tool_call>" in plain.choices[0].message.content


def test_responses_api(client, model_id, serve_model):
    """OpenAI's Responses API through the official client: input and instructions answered as the chat they make,
    the usage counted, the stream's deltas adding up to the answer, text.format held, bad requests refused."""
    openai = pytest.importorskip("openai")
    tokens, text = greedy_text(serve_model, MESSAGES, 6)
    tokenizer = load_tokenizer(serve_model)
    prompt = tokenizer(render_chat(MESSAGES, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    stopped = any(t in (tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids(
        "<|endoftext|>")) for t in tokens)
    answer = client.responses.create(model=model_id, instructions=MESSAGES[0]["content"], input=MESSAGES[1]["content"],
                                     max_output_tokens=6, temperature=0)
    assert answer.output_text == text and answer.model == model_id and answer.object == "response"
    assert answer.status == ("completed" if stopped else "incomplete")
    assert answer.incomplete_details is None if stopped else answer.incomplete_details.reason == "max_output_tokens"
    assert answer.usage.input_tokens == len(prompt) and answer.usage.output_tokens == len(tokens)
    assert [item.type for item in answer.output] == ["message"]
    # the same conversation as input items, a developer message and text parts
    items = [{"role": "developer", "content": MESSAGES[0]["content"]},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": MESSAGES[1]["content"]}]}]
    assert client.responses.create(model=model_id, input=items, max_output_tokens=6,
                                   temperature=0).output_text == text
    events = list(client.responses.create(model=model_id, input=items, max_output_tokens=6, temperature=0,
                                          stream=True))
    kinds = [event.type for event in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-1] == ("response.completed" if stopped else "response.incomplete")
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == text
    assert events[-1].response.output_text == text and events[-1].response.usage.output_tokens == len(tokens)
    shaped = client.responses.create(model=model_id, input="质量很好", temperature=1.0, max_output_tokens=200,
                                     text={"format": {"type": "json_schema", "name": "verdict", "schema": VERDICT}})
    assert fits_verdict(shaped.output_text)
    # the next turn from the stored conversation: the earlier input and answer, not the earlier instructions
    follow = client.responses.create(model=model_id, previous_response_id=answer.id, input="再说一遍",
                                     max_output_tokens=3, temperature=0)
    turns = [MESSAGES[1], {"role": "assistant", "content": text}, {"role": "user", "content": "再说一遍"}]
    assert follow.usage.input_tokens == len(tokenizer(render_chat(turns, add_generation_prompt=True),
                                                      add_special_tokens=False)["input_ids"])
    assert follow.previous_response_id == answer.id and client.responses.retrieve(answer.id).output_text == text
    client.responses.delete(answer.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(answer.id)
    with pytest.raises(openai.BadRequestError, match="not found"):
        client.responses.create(model=model_id, previous_response_id=answer.id, input="再说一遍")
    unkept = client.responses.create(model=model_id, input="你好", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unkept.id)
    for bad in [{"conversation": "conv_1"}, {"input": [{"role": "user", "content": [
            {"type": "input_image", "image_url": "http://x/y.png"}]}]}, {"tools": [{"type": "web_search"}]},
            {"input": None}, {"input": [{"type": "function_call_output", "output": "晴"}]},
            {"text": {"format": {"type": "xml"}}}]:
        with pytest.raises(openai.BadRequestError) as caught:
            client.responses.create(**{"model": model_id, "input": "你好", **bad})
        assert caught.value.body["code"] in ("unsupported_parameter", "invalid_content", "invalid_value",
                                             "missing_required_parameter", "invalid_type")


def test_responses_reasoning_and_function_calls(scripted, serve_model):
    """A think model's reasoning and a tool call as Responses output items, streamed or not, and the call's output
    sent back as input items rendered into the next prompt."""
    client = scripted('<think>\n要查天气。\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": '
                      '{"city": "北京"}}\n</tool_call>')
    tools = [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]
    answer = client.responses.create(model="scripted", input="北京天气如何？", tools=tools, max_output_tokens=100)
    assert [item.type for item in answer.output] == ["reasoning", "function_call"]
    assert answer.output[0].content[0].text == "要查天气。"
    call = answer.output[1]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "北京"}
    assert 0 < answer.usage.output_tokens_details.reasoning_tokens < answer.usage.output_tokens
    events = list(client.responses.create(model="scripted", input="北京天气如何？", tools=tools, max_output_tokens=100,
                                          stream=True))
    kinds = [event.type for event in events]
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "要查天气。"
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.function_call_arguments.done")
    assert [item.type for item in events[-1].response.output] == ["reasoning", "function_call"]
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [item.type for item in done] == ["reasoning", "function_call"] and done[1].name == "get_weather"
    # the next turn: the call's output after the stored conversation, or the whole conversation as input items
    for follow in [{"previous_response_id": answer.id, "input": [
                       {"type": "function_call_output", "call_id": call.call_id, "output": "晴，25度"}]},
                   {"input": [{"role": "user", "content": "北京天气如何？"},
                              {"type": "function_call", "call_id": call.call_id, "name": call.name,
                               "arguments": call.arguments},
                              {"type": "function_call_output", "call_id": call.call_id, "output": "晴，25度"}]}]:
        client.responses.create(model="scripted", tools=tools, **follow)
        rendered = load_tokenizer(serve_model).decode(ScriptedEngine.last_prompt)
        assert rendered.index("北京天气如何") < rendered.rindex('"get_weather"') < rendered.index("晴，25度")


def json_junk():
    """A hypothesis strategy: any JSON value, small."""
    from hypothesis import strategies as st

    return st.recursive(st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=False)
                        | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)


@pytest.mark.slow
def test_random_requests_never_break_the_server(server, model_id):
    """Bodies mixing valid fields with junk of every JSON type: always 200 or an OpenAI error with 400/404."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    junk = json_junk()
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool"]) | junk},
                                    optional={"content": st.text(max_size=20) | junk,
                                              "tool_calls": junk, "reasoning_content": junk})
    body = st.fixed_dictionaries(
        {"max_tokens": st.integers(-2, 3) | junk.filter(lambda v: v is not None),  # never the whole context
         "max_output_tokens": st.integers(-2, 3) | junk.filter(lambda v: v is not None)},
        optional={"model": st.just(model_id) | junk, "messages": st.lists(message, max_size=3) | junk,
                  "temperature": st.floats(-1, 3) | junk, "top_p": junk, "top_k": junk, "n": st.integers(0, 3) | junk,
                  "stop": st.text(max_size=3) | junk, "seed": junk, "stream": st.booleans() | junk,
                  "stream_options": junk, "tools": junk, "frequency_penalty": junk, "chat_template_kwargs": junk,
                  "prompt": st.text(max_size=10) | junk, "ignore_eos": junk,
                  "input": st.text(max_size=10) | st.lists(message, max_size=2) | junk, "instructions": junk,
                  "text": junk, "reasoning": junk, "previous_response_id": junk})

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(body=body, endpoint=st.sampled_from(["chat/completions", "completions", "responses"]))
    def check(body, endpoint):
        response = requests.post(f"{server}/v1/{endpoint}", data=json.dumps(body),  # Infinity too
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
                                 timeout=60)
        assert response.status_code in (200, 400, 404), (body, response.text)
        if response.status_code != 200:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    check()
    assert health(server)["status"] == "ok"
