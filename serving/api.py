"""The OpenAI-compatible HTTP API on FastAPI: /v1/models, /v1/chat/completions, /v1/responses, /v1/completions
(streaming or not), /health, the web chat page at /, vLLM's tokenizer endpoints and (with serve.py
--allow_runtime_lora) its /v1/load_lora_adapter and /v1/unload_lora_adapter.

Every request is checked by hand so that anything wrong gets OpenAI's error object
`{"error": {"message", "type", "param", "code"}}` with 400, 401 or 404, never a 500. Generation runs on the
engine's thread; the event loop only waits on an asyncio queue fed from there, so it never blocks.
"""

import asyncio
import base64
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from itertools import count
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dataset.chat import IM_END, render_chat
from dataset.formats import has_lone_surrogate
from serving.chat_format import EMPTY_THINK, TOOL_CLOSE, TOOL_OPEN, AnswerStream, chat_logprobs, completion_logprobs
from serving.engine import Engine, NoSuchAdapter, SamplingParams, start_together
from serving.loading import Loaded, LoadError, attach_adapters, is_chat_model, load, read_adapter_for
from serving.metrics import ModelStats, SequenceClock
from serving.metrics import render as render_metrics
from serving.structured import Grammar, SchemaError, TokenTrie, answer_grammar

PAGE = Path(__file__).parent / "static" / "index.html"
ROLES = {"system", "developer", "user", "assistant", "tool"}
MAX_EMBEDDING_INPUTS = 256  # texts one /v1/embeddings request may hold (OpenAI takes 2,048)
MAX_GRAMMARS = 16  # compiled response formats and forced tool calls kept for the requests that repeat them


class APIError(Exception):
    """An OpenAI error response."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


# -- reading a request ------------------------------------------------------------------------------------------------

_TYPES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
          dict: "an object"}


def _get(body: dict, name: str, kind: type | tuple, default: Any = None, low: float | None = None,
         high: float | None = None) -> Any:
    """body[name] checked for type and range; `default` when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok and float in kinds and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value) if abs(value) < 2**1023 else math.inf  # a 400 below, not an OverflowError
    if isinstance(value, float) and not math.isfinite(value):
        ok = False
    if not ok:
        raise APIError(400, f"'{name}' must be {' or '.join(_TYPES[k] for k in kinds)}, got {json.dumps(value)}",
                       name, "invalid_type")
    if low is not None and value < low or high is not None and value > high:
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise APIError(400, f"'{name}' must be {bounds}, got {value}", name, "invalid_value")
    return value


def _content_text(content: Any, where: str, kinds: tuple[str, ...] = ("text",)) -> str:
    """A message's content: a string, or content parts of the given types (a chat's "text"; the Responses API's
    "input_text" and "output_text"), joined."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in kinds or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else None
                raise APIError(400, f"{where}.content[{j}]: only text parts are supported"
                               + (f", not {kind}" if isinstance(kind, str) and kind not in kinds else ""),
                               f"{where}.content", "invalid_content")
            parts.append(part["text"])
        return "".join(parts)
    raise APIError(400, f"{where}.content must be a string or an array of text parts", f"{where}.content",
                   "invalid_type")


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if messages is None:
        raise APIError(400, "'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty array of messages", "messages", "invalid_type")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise APIError(400, f"{where} must be an object", where, "invalid_type")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise APIError(400, f"{where}.role must be one of {', '.join(sorted(ROLES))}, got {json.dumps(role)}",
                           f"{where}.role", "invalid_value")
        if message.get("content") is None and not (role == "assistant" and message.get("tool_calls")):
            raise APIError(400, f"{where}.content is required (an assistant's may be null with tool_calls)",
                           f"{where}.content", "missing_required_parameter")
        if role == "tool" and not isinstance(message.get("tool_call_id"), str):
            raise APIError(400, f"{where}.tool_call_id is required: the id of the call this message answers",
                           f"{where}.tool_call_id", "missing_required_parameter")
        if role != "assistant" and message.get("tool_calls") is not None:
            raise APIError(400, f"{where}.tool_calls: only assistant messages make tool calls", f"{where}.tool_calls",
                           "invalid_value")
        clean = {"role": "system" if role == "developer" else role,
                 "content": _content_text(message.get("content"), where)}
        if role == "assistant":
            reasoning = _get(message, "reasoning_content", str)
            if reasoning is not None:
                clean["reasoning_content"] = reasoning
            calls = message.get("tool_calls")
            if calls is not None:
                if not isinstance(calls, list) or not all(
                        isinstance(c, dict) and isinstance(c.get("function"), dict)
                        and isinstance(c["function"].get("name"), str)
                        and isinstance(c["function"].get("arguments"), str | dict) for c in calls):
                    raise APIError(400, f"{where}.tool_calls must be an array of {{function: {{name, arguments}}}}",
                                   f"{where}.tool_calls", "invalid_type")
                clean["tool_calls"] = calls
        out.append(clean)
    return out


def _tools(body: dict) -> tuple[list[dict] | None, list[dict] | None]:
    """The request's tools, checked (None without tools or with tool_choice "none"), and the functions the answer
    must call one of: all of them with tool_choice "required", the named one with {"type": "function",
    "function": {"name"}}, None with "auto" (the model decides)."""
    tools = _get(body, "tools", list)
    for i, tool in enumerate(tools or []):
        if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict) \
                or not isinstance(tool["function"].get("name"), str):
            raise APIError(400, f"tools[{i}] must be {{type: function, function: {{name, ...}}}}", f"tools[{i}]",
                           "invalid_type")
        if not isinstance(tool["function"].get("parameters", {}), dict):
            raise APIError(400, f"tools[{i}].function.parameters must be a JSON schema (an object)",
                           f"tools[{i}].function.parameters", "invalid_type")
    choice = body.get("tool_choice")
    if choice in (None, "none", "auto"):
        return (tools if tools and choice != "none" else None), None
    functions = [tool["function"] for tool in tools or []]
    if choice == "required":
        forced = functions
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        forced = [f for f in functions if f["name"] == choice["function"].get("name")]
        if not forced:
            raise APIError(400, f"'tool_choice' names {json.dumps(choice['function'].get('name'))}, which is not "
                           "one of the request's tools", "tool_choice", "invalid_value")
    else:
        raise APIError(400, "'tool_choice' must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", "
                       f"\"function\": {{\"name\": ...}}}}, got {json.dumps(choice)}", "tool_choice", "invalid_value")
    if not forced:
        raise APIError(400, "'tool_choice' \"required\" needs 'tools'", "tool_choice", "invalid_value")
    return tools, forced


def _structured(body: dict) -> tuple[str, str, Any] | None:
    """What the answer must be, and the parameter that asked: (param, "json", a JSON schema) from OpenAI's
    response_format ({"type": "object"} for json_object) or vLLM's structured_outputs.json, (param, "choice",
    texts) from structured_outputs.choice, the answer being exactly one of them, or (param, "regex", a pattern the
    whole answer matches) from structured_outputs.regex, or (param, "grammar", GBNF text whose root the whole answer
    is) from structured_outputs.grammar. vLLM's older names guided_json, guided_choice, guided_regex and
    guided_grammar are read too, and llama.cpp's `grammar`. None for free text."""
    asked = [name for name in ("response_format", "structured_outputs", "guided_json", "guided_choice",
                               "guided_regex", "guided_grammar", "grammar")
             if body.get(name) is not None and body.get(name) != {"type": "text"}]
    if len(asked) > 1:
        raise APIError(400, f"'{asked[0]}' and '{asked[1]}' each say what the answer must be: send one",
                       asked[1], "invalid_value")
    if not asked:
        return None
    param, value = asked[0], body[asked[0]]
    if param == "response_format":
        kind = value.get("type") if isinstance(value, dict) else None
        if kind == "json_object":
            return param, "json", {"type": "object"}
        if kind != "json_schema":
            raise APIError(400, "'response_format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                           f"{{\"type\": \"json_schema\", ...}}, got {json.dumps(value)[:200]}", param,
                           "invalid_value")
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise APIError(400, "'response_format' json_schema must be {\"name\": ..., \"schema\": {...}}", param,
                           "invalid_value")
        return param, "json", spec.get("schema", {})
    if param == "structured_outputs":
        if not isinstance(value, dict) or len(value) != 1 or \
                next(iter(value)) not in ("json", "choice", "regex", "grammar"):
            raise APIError(400, "'structured_outputs' must be {\"json\": schema}, {\"choice\": [texts]}, "
                           "{\"regex\": pattern} or {\"grammar\": GBNF text}", param, "unsupported_parameter")
        kind, value = next(iter(value.items()))
    else:
        kind = param.removeprefix("guided_")
    if kind == "json" and isinstance(value, str):  # vLLM takes the schema as JSON text too
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise APIError(400, f"'{param}': the schema is not valid JSON: {exc}", param, "invalid_schema") from exc
    if kind == "choice" and (not isinstance(value, list) or not value
                             or not all(isinstance(v, str) and v for v in value)):
        raise APIError(400, f"'{param}' choices must be a non-empty array of non-empty strings", param,
                       "invalid_value")
    if kind == "regex" and (not isinstance(value, str) or not value):
        raise APIError(400, f"'{param}' must be a regular expression (a non-empty string)", param, "invalid_value")
    if kind == "grammar" and (not isinstance(value, str) or not value.strip()):
        raise APIError(400, f"'{param}' must be a GBNF grammar (a non-empty string)", param, "invalid_value")
    return param, kind, value


def _logit_bias(body: dict, vocab: int) -> dict[int, float]:
    """logit_bias, checked: token ids (strings, as JSON keys are) to a bias from -100 (bans the token) to 100
    (forces it), added to the token's logit before sampling, as OpenAI's API does."""
    out = {}
    for key, value in _get(body, "logit_bias", dict, {}).items():
        if not re.fullmatch(r"[0-9]{1,9}", key) or int(key) >= vocab:
            raise APIError(400, f"'logit_bias' keys must be token ids below {vocab}, this model's vocabulary, got "
                           f"{json.dumps(key)}", "logit_bias", "invalid_value")
        out[int(key)] = _get({"logit_bias": value}, "logit_bias", float, None, -100, 100)
    return out


MAX_PROMPTS = 64  # prompts in one /v1/completions request


def _token_ids(server: "Server", value: Any, param: str = "prompt") -> list[int]:
    """A prompt given as token ids, checked against the tokenizer."""
    if isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                       and 0 <= t < len(server.loaded.tokenizer) for t in value):
        return list(value)
    raise APIError(400, f"'{param}' must be a string, an array of token ids, or an array of either (several)",
                   param, "invalid_type")


async def _texts(server: "Server", body: dict, param: str, most: int) -> tuple[list, list[list[int]]]:
    """body[param] as OpenAI reads a completion's prompt or an embedding's input: one text (a string, or token
    ids) or several (strings, or lists of ids); (the values, their token ids)."""
    value = body.get(param)
    if value is None:
        raise APIError(400, f"'{param}' is required", param, "missing_required_parameter")
    several = isinstance(value, list) and bool(value) and all(isinstance(v, str) or isinstance(v, list)
                                                              for v in value)
    values = value if several else [value]
    if len(values) > most:
        raise APIError(400, f"at most {most} {param}s in one request, got {len(values)}", param, "invalid_value")
    ids = [await asyncio.to_thread(server.tokenize, v) if isinstance(v, str) else _token_ids(server, v, param)
           for v in values]
    if not all(ids):
        raise APIError(400, f"'{param}' is empty", param, "invalid_value")
    return values, ids


MAX_STOPS = 16  # OpenAI takes 4; lm-evaluation-harness passes its tasks' `until` lists on uncut, vLLM takes any


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOPS:
        raise APIError(400, f"'stop' must be a string or an array of at most {MAX_STOPS} strings", "stop",
                       "invalid_type")
    if "" in stops:  # it would match before the first token: every answer empty
        raise APIError(400, "'stop' strings must not be empty", "stop", "invalid_value")
    return stops


class Server:
    """The state the routes share: the loaded model, its engine, and the options."""

    def __init__(self, loaded: Loaded, engine: Engine, api_key: str | None = None, model_id: str | None = None,
                 adapter: int = 0, parent: str | None = None):
        self.loaded, self.engine, self.api_key = loaded, engine, api_key
        self.model_id = model_id or loaded.name
        self.adapter, self.parent = adapter, parent  # a LoRA adapter served next to its base: its engine index
        self.stats = ModelStats()  # what GET /metrics reports for this model
        self.created = int(time.time())
        defaults = loaded.model.generation_config
        self.default_temperature = float(defaults.temperature or 1.0) if defaults.do_sample else 0.0
        self.default_top_p = float(defaults.top_p or 1.0)
        self._trie: TokenTrie | None = None  # the vocabulary as bytes, built for the first structured answer
        self._grammars: dict[str, Grammar] = {}

    def sampling(self, body: dict, prompt_tokens: int, prompt_param: str = "messages") -> tuple[SamplingParams, int]:
        """The request's sampling parameters, and n."""
        room = self.loaded.context_length - prompt_tokens
        if room <= 0:
            raise APIError(400, f"This model's maximum context length is {self.loaded.context_length} tokens; "
                           f"the prompt has {prompt_tokens}", prompt_param, "context_length_exceeded")
        echo = prompt_param == "prompt" and _get(body, "echo", bool, False)  # a completion that repeats its prompt
        max_tokens = _get(body, "max_completion_tokens", int, None, 1)
        max_tokens = _get(body, "max_tokens", int, max_tokens, 0 if echo else 1)  # 0: score the prompt, write nothing
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"This model's maximum context length is {self.loaded.context_length} tokens: "
                           f"the prompt ({prompt_tokens}) plus max_tokens ({max_tokens}) exceed it",
                           "max_tokens", "context_length_exceeded")
        params = SamplingParams(
            max_new_tokens=room if max_tokens is None else max_tokens,
            temperature=_get(body, "temperature", float, self.default_temperature, 0, 2),
            top_p=_get(body, "top_p", float, self.default_top_p, 0, 1),
            top_k=_get(body, "top_k", int, 0, -1),
            repetition_penalty=_get(body, "repetition_penalty", float, 1.0, 0.01, 10),
            frequency_penalty=_get(body, "frequency_penalty", float, 0.0, -2, 2),
            presence_penalty=_get(body, "presence_penalty", float, 0.0, -2, 2),
            seed=_get(body, "seed", int, None, -2**63, 2**64 - 1),
            stop_token_ids=() if _get(body, "ignore_eos", bool, False) else tuple(self.loaded.stop_token_ids),
            logit_bias=_logit_bias(body, self.loaded.model.config.vocab_size),
        )
        if params.top_p == 0:
            params.temperature = 0.0
        if prompt_param == "messages":  # chat: "logprobs": true, and "top_logprobs": 0-20 alternatives
            top = _get(body, "top_logprobs", int, None, 0, 20)
            if _get(body, "logprobs", bool, False):
                params.logprobs = top or 0
            elif top is not None:
                raise APIError(400, "'top_logprobs' needs \"logprobs\": true", "top_logprobs", "invalid_value")
        else:  # completions: "logprobs": 0-5 alternatives; with echo, the prompt's tokens' too
            params.logprobs = _get(body, "logprobs", int, None, 0, 5)
            params.prompt_logprobs = params.logprobs if echo else None
        for name in ("suffix",) + (() if prompt_param == "messages" else ("top_logprobs",)):
            if body.get(name) not in (None, False, 0, "", {}):
                raise APIError(400, f"'{name}' is not supported by this server", name, "unsupported_parameter")
        if body.get("best_of") not in (None, 1):
            raise APIError(400, "'best_of' other than 1 is not supported by this server (n is)", "best_of",
                           "unsupported_parameter")
        _get(body, "user", str)  # metadata: checked, not used
        _get(body, "parallel_tool_calls", bool)
        if body.get("stream_options") is not None and not _get(body, "stream", bool, False):
            raise APIError(400, "'stream_options' is only allowed with \"stream\": true", "stream_options",
                           "invalid_value")
        structured = _structured(body)
        if structured is not None:
            param, kind, value = structured
            params.grammar = self.grammar(param, kind, value)
        n = _get(body, "n", int, 1, 1, 16)
        return params, n

    def grammar(self, param: str, kind: str, value: Any) -> Grammar:
        """`structured.answer_grammar(kind, value)`, a bad schema as a 400 naming `param`. Compiled grammars are
        kept: each caches the tokens its states allow, which a client that sends the same schema or tools again
        reuses."""
        key = json.dumps([param, kind, value], sort_keys=True)
        if key in self._grammars:
            self._grammars[key] = self._grammars.pop(key)  # most recently used last
            return self._grammars[key]
        if self._trie is None:
            self._trie = TokenTrie.from_tokenizer(self.loaded.tokenizer)
        try:
            grammar = answer_grammar(kind, value, self._trie, TOOL_OPEN, TOOL_CLOSE,
                                     "json_schema.schema" if param == "response_format" else "schema")
        except SchemaError as exc:
            raise APIError(400, f"'{param}': {exc}", param, "invalid_schema") from exc
        except RecursionError as exc:
            raise APIError(400, f"'{param}': the schema is nested too deeply", param, "invalid_schema") from exc
        self._grammars[key] = grammar
        while len(self._grammars) > MAX_GRAMMARS:
            self._grammars.pop(next(iter(self._grammars)))
        return grammar

    def tokenize(self, text: str) -> list[int]:
        return self.loaded.tokenizer(text, add_special_tokens=False)["input_ids"]


def _error_event(exc: APIError) -> str:
    """An error after the stream began (the status line is sent already): an error event, as OpenAI sends."""
    return "data: " + json.dumps({"error": {"message": exc.message, "type": exc.kind, "param": exc.param,
                                            "code": exc.code}}) + "\n\n"


def _chunk(kind: str, rid: str, created: int, model: str, choices: list[dict], usage: Any = ...) -> str:
    body: dict[str, Any] = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices}
    if usage is not ...:
        body["usage"] = usage
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _run(server: Server, request: Request, prompts: list[list[int]], params: SamplingParams, n: int,
               answers: list[AnswerStream], sequences: list) -> AsyncIterator[tuple[int, list[dict], str | None]]:
    """Submit n sequences for each prompt (appended to `sequences`; choice i * n + j is prompt i's j-th) and yield
    (choice, deltas, finish_reason or None) as tokens arrive; every sequence is cancelled when the consumer stops
    early (the client went away, or a stop string was found)."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def listener(index: int):
        def on_event(token: int | None, reason: str | None) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (index, token, reason))
        return on_event

    clocks = []  # each sequence's timing, for GET /metrics
    for i in range(len(prompts) * n):
        seed = None if params.seed is None else (params.seed + i % n) % 2**64  # torch takes seeds below 2**64
        try:
            sequences.append(server.engine.submit(prompts[i // n], SamplingParams(**{**params.__dict__, "seed": seed}),
                                                  listener(i), server.adapter))
        except NoSuchAdapter as exc:  # unloaded while this request was read
            raise APIError(404, f"The model `{server.model_id}` does not exist any more: it was unloaded", "model",
                           "model_not_found") from exc
        clocks.append(SequenceClock(server.stats, len(prompts[i // n])))
    open_choices = set(range(len(sequences)))
    checked = time.monotonic()
    try:
        while open_choices:
            if time.monotonic() - checked > 0.25:  # a client that went away stops its generation
                if await request.is_disconnected():
                    return
                checked = time.monotonic()
            try:
                index, token, reason = await asyncio.wait_for(events.get(), timeout=0.25)
            except TimeoutError:
                continue
            if index not in open_choices:
                continue
            answer = answers[index]
            if reason is None:
                clocks[index].token()
                record = None if params.logprobs is None else sequences[index].logprobs[answer.completion_tokens]
                deltas = answer.feed(token, record)
                if answer.stopped:
                    sequences[index].cancel()
                    more, finish = answer.finish("stop")
                    open_choices.discard(index)
                    clocks[index].done("stop", answer.completion_tokens)
                    yield index, deltas + more, finish
                elif deltas:
                    yield index, deltas, None
            else:
                if reason == "error":
                    raise APIError(500, "generation failed on the server; see its log", None, "engine_error",
                                   "server_error")
                deltas, finish = answer.finish(reason)
                open_choices.discard(index)
                clocks[index].done("length" if finish == "length" else "stop", answer.completion_tokens)
                yield index, deltas, finish
    finally:
        for seq in sequences:
            seq.cancel()
        for index in open_choices:  # the client went away, or the engine failed
            clocks[index].done("abort", answers[index].completion_tokens)


def _embed(server: Server, inputs: list[list[int]]) -> list[np.ndarray]:
    """Each input's embedding (run on the engine's thread, between two of its steps): the decoder's final hidden
    state at the input's last token, L2-normalised, with the server's LoRA adapter where it has one."""
    engine, out = server.engine, []
    if engine.adapters is not None:  # every pass below is one row of this server's adapter
        engine.adapters.select([server.adapter], engine.device, engine.dtype)
    with torch.no_grad():
        for ids in inputs:
            x = torch.tensor([ids], device=engine.device)
            hidden = server.loaded.model.model(x, torch.arange(len(ids), device=engine.device)[None], None, None)
            out.append(F.normalize(hidden[0, -1].float(), dim=0).cpu().numpy())
    return out


class Reply:
    """One request's answers (n to each of its prompts: one for a chat, one or more for a completion) as the engine
    makes them, collected or streamed, and what every response to it names: its id, its time and its token usage.
    `kind`, `chunk_kind`: the response's and a stream chunk's "object"."""

    def __init__(self, server: Server, request: Request, body: dict, prompts: list[list[int]],
                 params: SamplingParams, n: int, kind: str, chunk_kind: str, id_prefix: str, **answer_options: bool):
        stop = _stop(body)
        self.stream = _get(body, "stream", bool, False)
        self.include_usage = bool((_get(body, "stream_options", dict, {}) or {}).get("include_usage"))
        self.choices = len(prompts) * n
        self.answers = [AnswerStream(server.loaded.tokenizer, stop, params.stop_token_ids, **answer_options)
                        for _ in range(self.choices)]
        self.server, self.request, self.prompts, self.params, self.n = server, request, prompts, params, n
        self.kind, self.chunk_kind = kind, chunk_kind
        self.id, self.created = f"{id_prefix}-{uuid.uuid4().hex}", int(time.time())
        self.sequences: list = []  # the engine's, one per choice
        self.echo = ""  # a chat's echo: the last message, the assistant's, which the answer repeats first
        # per choice: the logprobs already streamed, their text's length, and whether the echoed prompt's are out
        self.sent, self.offset, self.echoed = [0] * self.choices, [0] * self.choices, [False] * self.choices

    def events(self) -> AsyncIterator[tuple[int, list[dict], str | None]]:
        return _run(self.server, self.request, self.prompts, self.params, self.n, self.answers, self.sequences)

    async def finish_reasons(self) -> dict[int, str]:
        """Generate every answer to its end (no stream); the reason each one finished."""
        finish: dict[int, str] = {}
        async for index, _, reason in self.events():
            if reason:
                finish[index] = reason
        return {i: finish.get(i, "stop") for i in range(self.choices)}

    def logprobs(self, index: int, stream: bool = False) -> dict | None:
        """A choice's logprobs (None unless asked for); streaming, those of the tokens since its last chunk. With
        echo the prompt's tokens come first, the first of them without a logprob (nothing comes before it)."""
        if self.params.logprobs is None:
            return None
        records = self.answers[index].logprobs
        start, self.sent[index] = (self.sent[index], len(records)) if stream else (0, len(records))
        records, tokenizer = records[start:], self.server.loaded.tokenizer
        if self.kind == "chat.completion":
            return chat_logprobs(tokenizer, records)
        if self.params.prompt_logprobs is not None and not self.echoed[index]:
            self.echoed[index] = True
            scored = self.sequences[index].prompt_logprobs
            prompt = self.prompts[index // self.n]
            records = [(prompt[0], None, None), *((t, *r) for t, r in zip(prompt[1:], scored)), *records]
        out = completion_logprobs(tokenizer, records, self.offset[index])
        self.offset[index] += sum(len(t) for t in out["tokens"])
        return out

    def usage(self) -> dict:
        completion = sum(a.completion_tokens for a in self.answers)
        prompt = sum(len(p) for p in self.prompts)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def response(self, choices: list[dict]) -> dict:
        return {"id": self.id, "object": self.kind, "created": self.created, "model": self.server.model_id,
                "choices": choices, "usage": self.usage()}

    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        """A stream chunk; with stream_options.include_usage every chunk has "usage" (null but in the last)."""
        return _chunk(self.chunk_kind, self.id, self.created, self.server.model_id, choices,
                      **({"usage": usage} if self.include_usage else {}))

    def streaming(self, chunks: Callable[[], AsyncIterator[str]]) -> StreamingResponse:
        """Server-sent events: the chunks, an error event if generation fails midway, the usage chunk when asked
        for, and [DONE]."""
        async def events() -> AsyncIterator[str]:
            try:
                async for text in chunks():
                    yield text
            except APIError as exc:  # headers are gone: report in the stream, as OpenAI does
                yield _error_event(exc)
            if self.include_usage:
                yield self.chunk([], self.usage())
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# -- OpenAI's Responses API, answered as a chat ---------------------------------------------------------------------

MAX_STORED_RESPONSES = 1024  # responses kept in memory for previous_response_id and GET, the oldest dropped first
_RESPONSES_REFUSED = {  # parameters that need what this server does not keep or run
    "conversation": "this server keeps no conversation objects: pass 'previous_response_id', or the whole "
                    "conversation as 'input'",
    "background": "responses are answered while the request waits",
    "prompt": "this server keeps no stored prompts",
}
_CHAT_EXTRAS = ("seed", "top_k", "repetition_penalty", "frequency_penalty", "presence_penalty", "logit_bias",
                "ignore_eos", "structured_outputs", "guided_json", "guided_choice", "guided_regex", "guided_grammar",
                "chat_template_kwargs", "parallel_tool_calls", "stream")  # vLLM's extras, taken as the chat takes them


RESPONSE_PARTS = ("input_text", "output_text", "text")  # the text parts of a Responses API message


def _responses_input(body: dict) -> list[dict]:
    """`input` (a string, or message, function_call and function_call_output items) as chat messages; reasoning
    items of earlier turns are left out, as the chat template leaves out earlier reasoning."""
    messages: list[dict] = []
    value = body.get("input")
    if value is None:
        raise APIError(400, "'input' is required", "input", "missing_required_parameter")
    if isinstance(value, str):
        return messages + [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise APIError(400, "'input' must be a string or a non-empty array of items", "input", "invalid_type")
    for i, item in enumerate(value):
        where = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            if item.get("role") not in ("user", "system", "developer", "assistant"):
                raise APIError(400, f"{where}.role must be user, system, developer or assistant", f"{where}.role",
                               "invalid_value")
            if item.get("content") is None:
                raise APIError(400, f"{where}.content is required", f"{where}.content", "missing_required_parameter")
            messages.append({"role": item["role"], "content": _content_text(item["content"], where, RESPONSE_PARTS)})
        elif kind == "function_call":
            if not all(isinstance(item.get(key), str) for key in ("call_id", "name", "arguments")):
                raise APIError(400, f"{where}: a function_call needs call_id, name and arguments (strings)", where,
                               "invalid_type")
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls") is not None:
                messages[-1]["tool_calls"].append(call)  # calls made in one turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise APIError(400, f"{where}.call_id is required: the id of the call this output answers",
                               f"{where}.call_id", "missing_required_parameter")
            messages.append({"role": "tool", "tool_call_id": item["call_id"],
                             "content": _content_text(item.get("output"), where, RESPONSE_PARTS)})
        elif kind != "reasoning":
            raise APIError(400, f"{where}: items of type {json.dumps(kind)} are not supported (text messages, "
                           "function_call and function_call_output are)", where, "invalid_value")
    return messages


def _responses_to_chat(body: dict, history: list[dict]) -> tuple[dict, list[dict]]:
    """A Responses API request as the chat completion that answers it, and the conversation so far without the
    instructions (`history`, the previous response's, then this input), which a response that follows this one
    goes on from: as OpenAI has it, instructions are not carried over."""
    for name, why in _RESPONSES_REFUSED.items():
        if body.get(name) not in (None, False, ""):
            raise APIError(400, f"'{name}' is not supported: {why}", name, "unsupported_parameter")
    turn = history + _responses_input(body)
    instructions = _get(body, "instructions", str)
    chat = {"model": body.get("model"),
            "messages": ([{"role": "system", "content": instructions}] if instructions else []) + turn}
    chat.update({key: body[key] for key in ("temperature", "top_p", *_CHAT_EXTRAS) if key in body})
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    tools = _get(body, "tools", list)
    if tools:
        chat["tools"] = []
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("name"), str):
                kind = tool.get("type") if isinstance(tool, dict) else None
                raise APIError(400, f"tools[{i}]: only function tools ({{type: function, name, parameters}}) are "
                               f"supported" + (f", not {kind}" if isinstance(kind, str) and kind != "function"
                                               else ""), f"tools[{i}]", "invalid_value")
            chat["tools"].append({"type": "function", "function": {
                key: tool[key] for key in ("name", "description", "parameters") if key in tool}})
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise APIError(400, "'tool_choice' must be none, auto, required or {type: function, name}", "tool_choice",
                           "invalid_value")
        choice = {"type": "function", "function": {"name": choice["name"]}}
    if choice is not None:
        chat["tool_choice"] = choice
    form = _get(_get(body, "text", dict, {}), "format", dict)
    if form is not None and form.get("type") != "text":
        if form.get("type") == "json_object":
            chat["response_format"] = {"type": "json_object"}
        elif form.get("type") == "json_schema":
            chat["response_format"] = {"type": "json_schema", "json_schema": {
                "name": form.get("name"), "schema": form.get("schema", {})}}
        else:
            raise APIError(400, "'text.format' must be {type: text}, {type: json_object} or {type: json_schema, "
                           "name, schema}", "text.format", "invalid_value")
    if _get(_get(body, "reasoning", dict, {}), "effort", str) == "none":  # no think block: as enable_thinking false
        chat["chat_template_kwargs"] = {**chat.get("chat_template_kwargs", {}), "enable_thinking": False}
    return chat, turn


def _answer_message(reply: "Reply") -> dict:
    """The answer as the assistant message a later turn's chat holds."""
    answer = reply.answers[0]
    if answer.tool_calls:
        return {"role": "assistant", "content": answer.content or None, "tool_calls": answer.tool_calls}
    return {"role": "assistant", "content": answer.content}


def _hex(reply: "Reply") -> str:
    """The random part of a reply's id, which a Response and its items are named by (resp_..., msg_..., rs_...)."""
    return reply.id.rpartition("-")[2]


def _item_id(reply: "Reply", kind: str) -> str:
    return ("rs_" if kind == "reasoning" else "msg_") + _hex(reply)


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _item(reply: "Reply", kind: str, text: str | None, status: str) -> dict:
    """The answer's reasoning or message output item, as the Response and its stream's events both give it; its
    content empty while it is in progress (text None)."""
    if kind == "reasoning":
        return {"type": "reasoning", "id": _item_id(reply, kind), "summary": [], "status": status,
                "content": [] if text is None else [{"type": "reasoning_text", "text": text}]}
    return {"type": "message", "id": _item_id(reply, kind), "role": "assistant", "status": status,
            "content": [] if text is None else [_text_part(text)]}


def _response_output(reply: "Reply", finish: str | None) -> list[dict]:
    """The answer as Responses output items: its reasoning, its message, its function calls."""
    answer, items = reply.answers[0], []
    if answer.reasoning:
        items.append(_item(reply, "reasoning", answer.reasoning, "completed"))
    if answer.content or not answer.tool_calls:
        items.append(_item(reply, "message", answer.content, "incomplete" if finish == "length" else "completed"))
    for call in answer.tool_calls:
        items.append({"type": "function_call", "id": f"fc_{call['id']}", "call_id": call["id"],
                      "name": call["function"]["name"], "arguments": call["function"]["arguments"],
                      "status": "completed"})
    return items


def _response(reply: "Reply", body: dict, finish: str | None) -> dict:
    """The Response object; `finish` None while it is in progress."""
    answer, prompt = reply.answers[0], len(reply.prompts[0])
    status = "in_progress" if finish is None else "incomplete" if finish == "length" else "completed"
    return {"id": f"resp_{_hex(reply)}", "object": "response", "created_at": reply.created, "status": status,
            "model": reply.server.model_id, "output": [] if finish is None else _response_output(reply, finish),
            "error": None, "incomplete_details": {"reason": "max_output_tokens"} if finish == "length" else None,
            "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "temperature": reply.params.temperature, "top_p": reply.params.top_p,
            "tools": body.get("tools") or [], "tool_choice": body.get("tool_choice", "auto"),
            "parallel_tool_calls": body.get("parallel_tool_calls", True), "text": body.get("text", {
                "format": {"type": "text"}}), "metadata": body.get("metadata") or {},
            "store": body.get("store") is not False, "previous_response_id": body.get("previous_response_id"),
            "usage": None if finish is None else {
                "input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": answer.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": answer.reasoning_tokens},
                "total_tokens": prompt + answer.completion_tokens}}


class _ResponseEvents:
    """A Responses stream's events for one answer. An output item opens with its first delta (the reasoning, then
    the message) and closes when the next opens or the answer ends; function calls come whole at the end, then
    response.completed (response.incomplete when max_output_tokens cut it) with the Response object."""

    def __init__(self, reply: "Reply", body: dict):
        self.reply, self.body = reply, body
        self.numbers = count()
        self.kinds: list[str] = []  # the output items opened so far, in order
        self.open: str | None = None  # the one open now: "reasoning" or "message"
        self.texts = {"reasoning": "", "message": ""}
        self.final: dict | None = None  # the Response, once the answer is done

    def event(self, kind: str, **fields) -> str:
        data = json.dumps({"type": kind, "sequence_number": next(self.numbers), **fields}, ensure_ascii=False)
        return f"event: {kind}\ndata: {data}\n\n"

    def start(self) -> list[str]:
        in_progress = _response(self.reply, self.body, None)
        return [self.event("response.created", response=in_progress),
                self.event("response.in_progress", response=in_progress)]

    def _where(self) -> dict:
        return {"item_id": _item_id(self.reply, self.open), "output_index": len(self.kinds) - 1, "content_index": 0}

    def _open(self, kind: str) -> list[str]:
        out = self._close()
        self.open = kind
        self.kinds.append(kind)
        where = self._where()
        out.append(self.event("response.output_item.added", output_index=where["output_index"],
                              item=_item(self.reply, kind, None, "in_progress")))
        if kind == "message":
            out.append(self.event("response.content_part.added", **where, part=_text_part("")))
        return out

    def _close(self, finish: str = "stop") -> list[str]:
        if self.open is None:
            return []
        where, text = self._where(), self.texts[self.open]
        if self.open == "reasoning":
            item = _item(self.reply, "reasoning", text, "completed")
            out = [self.event("response.reasoning_text.done", **where, text=text)]
        else:
            item = _item(self.reply, "message", text, "incomplete" if finish == "length" else "completed")
            out = [self.event("response.output_text.done", **where, text=text, logprobs=[]),
                   self.event("response.content_part.done", **where, part=_text_part(text))]
        self.open = None
        return out + [self.event("response.output_item.done", output_index=where["output_index"], item=item)]

    def delta(self, delta: dict) -> list[str]:
        """The events of one of the chat's deltas ({"reasoning_content"} or {"content"}; tool calls wait)."""
        out = []
        for kind, key, name in (("reasoning", "reasoning_content", "response.reasoning_text.delta"),
                                ("message", "content", "response.output_text.delta")):
            if key in delta:
                if self.open != kind:
                    out += self._open(kind)
                self.texts[kind] += delta[key]
                out.append(self.event(name, **self._where(), delta=delta[key],
                                      **({"logprobs": []} if kind == "message" else {})))
        return out

    def end(self, finish: str) -> list[str]:
        final = _response(self.reply, self.body, finish)
        out = self._close(finish)
        if any(item["type"] == "message" for item in final["output"]) and "message" not in self.kinds:
            out += self._open("message") + self._close(finish)  # an empty answer is an empty message
        for item in final["output"]:
            if item["type"] == "function_call":
                index = len(self.kinds)
                self.kinds.append("function_call")
                where = {"item_id": item["id"], "output_index": index}
                out += [self.event("response.output_item.added", output_index=index,
                                   item={**item, "arguments": "", "status": "in_progress"}),
                        self.event("response.function_call_arguments.delta", **where, delta=item["arguments"]),
                        self.event("response.function_call_arguments.done", **where, arguments=item["arguments"]),
                        self.event("response.output_item.done", output_index=index, item=item)]
        self.final = final
        kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
        return out + [self.event(kind, response=final)]


def create_app(servers: Server | list[Server], allow_runtime_lora: bool = False, chat: bool | None = None) -> FastAPI:
    """The app over one model's server, or several (serve.py --model a --model b): a request picks its model by
    "model"; what names none (the page's first choice, /health, the tokenizer endpoints) gets the first. With
    `allow_runtime_lora` (one model, whose engine has AdapterRows) /v1/load_lora_adapter and
    /v1/unload_lora_adapter add and remove its LoRA adapters; `chat` decides whether they are chat models (None:
    each adapter's args.json)."""
    servers = [servers] if isinstance(servers, Server) else list(servers)
    by_id = {s.model_id: s for s in servers}
    if len(by_id) < len(servers):
        raise LoadError(f"two models would be served under one name ({', '.join(s.model_id for s in servers)}): "
                        "name them as NAME=DIR")
    server = servers[0]
    if allow_runtime_lora and (len({id(s.engine) for s in servers}) > 1 or server.engine.adapters is None):
        raise LoadError("LoRA adapters are loaded at run time into one model, whose engine stacks adapters")
    app = FastAPI(title="danlu", docs_url=None, redoc_url=None, openapi_url=None)

    def pick(body: dict, required: bool = True) -> Server:
        """The server of the request's "model"."""
        model = body.get("model")
        if model is None and not required:
            return server
        if model is None:
            raise APIError(400, "'model' is required", "model", "missing_required_parameter")
        if not isinstance(model, str):
            raise APIError(400, "'model' must be a string", "model", "invalid_type")
        if model not in by_id:
            raise APIError(404, f"The model `{model}` does not exist; this server serves "
                           + ", ".join(f"`{name}`" for name in by_id), "model", "model_not_found")
        return by_id[model]

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:  # a bug: logged, answered, server lives on
        logging.getLogger("danlu.api").error("request failed", exc_info=exc)
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", None, "internal_error",
                        "server_error").response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return APIError(400, str(exc), None, "invalid_request").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), None, code).response()

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if server.api_key and request.url.path.startswith("/v1/"):
            header = request.headers.get("authorization", "")
            if header != f"Bearer {server.api_key}":
                return APIError(401, "Incorrect API key provided" if header else
                                "Missing API key: send 'Authorization: Bearer KEY'", None, "invalid_api_key").response()
        return await call_next(request)

    async def read_body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except RecursionError as exc:
            raise APIError(400, "The request body is nested too deeply", None, "invalid_json") from exc
        except (ValueError, UnicodeDecodeError) as exc:
            raise APIError(400, f"The request body is not valid JSON: {exc}", None, "invalid_json") from exc
        if has_lone_surrogate(body):  # a "\\ud800" escape without its pair: no tokenizer or UTF-8 reply holds it
            raise APIError(400, "The request body holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text",
                           None, "invalid_json")
        if not isinstance(body, dict):
            raise APIError(400, "The request body must be a JSON object", None, "invalid_json")
        return body

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict:
        engine = server.engine
        return {"status": "ok", "model": server.model_id, "active": engine.active, "decode_steps": engine.steps,
                "max_batch_seen": engine.max_rows_seen, "tokens_generated": engine.tokens_generated,
                "finished": dict(engine.finished), "models": list(by_id)}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        """Prometheus' text format, vLLM's metric names (serving/metrics.py), one series per model."""
        loads = {id(s.engine): s.engine.load() for s in servers}
        return PlainTextResponse(render_metrics([(s.model_id, s.stats, loads[id(s.engine)][0][s.adapter],
                                                  loads[id(s.engine)][1][s.adapter]) for s in servers]),
                                 media_type="text/plain; version=0.0.4")

    def model_card(s: Server) -> dict:
        return {"id": s.model_id, "object": "model", "created": s.created, "owned_by": "danlu",
                "max_model_len": s.loaded.context_length, "chat": s.loaded.is_chat, "parent": s.parent}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card(s) for s in servers]}

    @app.get("/v1/models/{model:path}")
    async def one_model(model: str) -> dict:  # client.models.retrieve
        return model_card(pick({"model": model}))

    # vLLM's tokenizer endpoints (outside /v1, as there): lm-evaluation-harness's local-completions finds them and
    # uses the server's tokenizer instead of needing a copy of it
    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        tokenizer = server.loaded.tokenizer
        return {"tokenizer_class": type(tokenizer).__name__, "eos_token": tokenizer.eos_token,
                "bos_token": tokenizer.bos_token, "pad_token": tokenizer.pad_token,
                "chat_template": tokenizer.chat_template, "vocab_size": len(tokenizer),
                "model_max_length": server.loaded.context_length}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        """{"prompt": text} or {"messages": [...]} (rendered with the chat template) -> {"tokens", "count",
        "max_model_len"}."""
        body = await read_body(request)
        served = pick(body, required=False)
        if body.get("messages") is not None:
            text = render_chat(_messages(body), _tools(body)[0],
                               add_generation_prompt=_get(body, "add_generation_prompt", bool, True))
        else:
            text = _get(body, "prompt", str)
            if text is None:
                raise APIError(400, "'prompt' or 'messages' is required", "prompt", "missing_required_parameter")
        add_special = _get(body, "add_special_tokens", bool, False)
        tokens = (await asyncio.to_thread(served.loaded.tokenizer, text, add_special_tokens=add_special))["input_ids"]
        return {"tokens": tokens, "count": len(tokens), "max_model_len": served.loaded.context_length}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        body = await read_body(request)
        served = pick(body, required=False)
        if body.get("tokens") is None:
            raise APIError(400, "'tokens' is required", "tokens", "missing_required_parameter")
        try:
            tokens = _token_ids(served, body["tokens"])
        except APIError as exc:
            raise APIError(400, "'tokens' must be an array of this tokenizer's token ids", "tokens",
                           "invalid_type") from exc
        return {"prompt": served.loaded.tokenizer.decode(tokens)}

    # vLLM's runtime LoRA endpoints (its VLLM_ALLOW_RUNTIME_LORA_UPDATING; here serve.py --allow_runtime_lora):
    # load an adapter of the base model under a new name, or unload one; requests name it as their "model"
    loading: set[str] = set()  # names whose adapter is being read

    def runtime_lora(body: dict) -> str:
        if not allow_runtime_lora:
            raise APIError(404, "Loading LoRA adapters at run time is off: start serve.py with "
                           "--allow_runtime_lora", None, "not_found")
        name = body.get("lora_name")
        if name is None:
            raise APIError(400, "'lora_name' is required", "lora_name", "missing_required_parameter")
        if not isinstance(name, str) or not name.strip():
            raise APIError(400, "'lora_name' must be a non-empty string", "lora_name", "invalid_type")
        return name

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> PlainTextResponse:
        body = await read_body(request)
        name = runtime_lora(body)
        path = body.get("lora_path")
        if not isinstance(path, str) or not path:
            raise APIError(400, "'lora_path' must be the adapter's directory on the server", "lora_path",
                           "missing_required_parameter" if path is None else "invalid_type")
        if name in by_id or name in loading:
            raise APIError(400, f"The model `{name}` is already served: unload it first, or pick another name",
                           "lora_name", "invalid_value")
        base = server  # the one model served (serve.py allows runtime adapters with one --model)
        loading.add(name)
        try:
            adapter = await asyncio.to_thread(read_adapter_for, base.loaded, base.engine.adapters, name, path)
            adapter_id = await asyncio.wrap_future(base.engine.add_adapter(adapter))
        except LoadError as exc:
            raise APIError(400, str(exc), "lora_path", "invalid_value") from exc
        finally:
            loading.discard(name)
        is_chat = is_chat_model(Path(path)) if chat is None else chat
        added = Server(replace(base.loaded, name=name, is_chat=is_chat), base.engine, base.api_key, name, adapter_id,
                       base.model_id)
        servers.append(added)
        by_id[name] = added
        logging.getLogger("danlu.api").info("LoRA adapter %s loaded from %s", name, path)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> PlainTextResponse:
        body = await read_body(request)
        name = runtime_lora(body)
        if name not in by_id:
            raise APIError(404, f"The LoRA adapter `{name}` is not loaded", "lora_name", "model_not_found")
        removed = by_id[name]
        if removed.parent is None:
            raise APIError(400, f"`{name}` is a base model, not a LoRA adapter", "lora_name", "invalid_value")
        del by_id[name]
        servers.remove(removed)
        removed.engine.remove_adapter(removed.adapter)  # its requests under way finish with it
        logging.getLogger("danlu.api").info("LoRA adapter %s unloaded", name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    async def chat_reply(request: Request, body: dict) -> Reply:
        """A chat request, checked, rendered and tokenized, as the Reply that will answer it."""
        served = pick(body)
        messages = _messages(body)
        tools, forced = _tools(body)
        template_options = _get(body, "chat_template_kwargs", dict, {})
        # an answer held to a schema or a tool call starts with it: the prompt closes an empty think block
        asked = _structured(body)
        thinking = template_options.get("enable_thinking", True) is not False and forced is None and asked is None
        # vLLM's continue_final_message: the last message, the assistant's, is left open and the answer goes on
        # from it (a prefill); add_generation_prompt false: no assistant turn opened (a raw continuation)
        continued = _get(body, "continue_final_message", bool, False)
        opened = _get(body, "add_generation_prompt", bool, not continued)
        if continued and (opened or messages[-1]["role"] != "assistant"):
            raise APIError(400, "'continue_final_message' goes on from a last message of the assistant, with "
                           "'add_generation_prompt' false", "continue_final_message", "invalid_value")
        if continued:
            text = render_chat(messages, tools).removesuffix(IM_END + "\n")
        else:
            text = render_chat(messages, tools, add_generation_prompt=opened) + ("" if thinking or not opened
                                                                                  else EMPTY_THINK)
        prompt = await asyncio.to_thread(served.tokenize, text)  # a long prompt must not stall the loop
        params, n = served.sampling(body, len(prompt))
        if forced is not None:
            if asked is not None:
                param = asked[0]
                raise APIError(400, f"'{param}' and a 'tool_choice' that forces a call exclude each other: the "
                               "answer is either what the first asks for or a tool call", param, "invalid_value")
            params.grammar = served.grammar("tool_choice", "call", forced)
        elif tools and params.grammar is None:  # the model decides whether to call; a call it opens fits
            kind = "text_or_call" if _get(body, "parallel_tool_calls", bool, True) else "text_or_one_call"
            params.grammar = served.grammar("tools", kind, [tool["function"] for tool in tools])
        reply = Reply(served, request, body, [prompt], params, n, "chat.completion", "chat.completion.chunk",
                      "chatcmpl", tools=bool(tools))
        # echo: the answer repeats the last message first, when it is the assistant's (vLLM's chat echo)
        reply.echo = messages[-1]["content"] if _get(body, "echo", bool, False) and \
            messages[-1]["role"] == "assistant" else ""
        return reply

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        reply = await chat_reply(request, await read_body(request))
        n = reply.n
        if not reply.stream:
            finish = await reply.finish_reasons()
            choices = []
            for i, answer in enumerate(reply.answers):
                message: dict[str, Any] = {"role": "assistant", "content": reply.echo + answer.content}
                if answer.reasoning:
                    message["reasoning_content"] = answer.reasoning
                if answer.tool_calls:
                    message["tool_calls"] = answer.tool_calls
                    message["content"] = answer.content or None
                choices.append({"index": i, "message": message, "logprobs": reply.logprobs(i),
                                "finish_reason": finish[i]})
            return reply.response(choices)

        async def chunks() -> AsyncIterator[str]:
            for i in range(n):
                yield reply.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None}])
                if reply.echo:
                    yield reply.chunk([{"index": i, "delta": {"content": reply.echo}, "logprobs": None,
                                        "finish_reason": None}])
            async for index, deltas, reason in reply.events():
                for delta in deltas:  # a token's logprobs go with the first chunk its text reaches
                    yield reply.chunk([{"index": index, "delta": delta, "logprobs": reply.logprobs(index, True),
                                        "finish_reason": None}])
                if reason:
                    yield reply.chunk([{"index": index, "delta": {}, "logprobs": reply.logprobs(index, True),
                                        "finish_reason": reason}])

        return reply.streaming(chunks)

    stored: dict[str, tuple[dict, list[dict]]] = {}  # response id -> (the Response, the conversation after it)

    def stored_response(response_id: str, param: str | None = None) -> tuple[dict, list[dict]]:
        if response_id not in stored:
            raise APIError(404 if param is None else 400, f"Response with id '{response_id}' not found: this server "
                           f"keeps the last {MAX_STORED_RESPONSES} in memory, since it started", param,
                           "previous_response_not_found" if param else "not_found")
        stored[response_id] = stored.pop(response_id)  # the most recently used last
        return stored[response_id]

    def store(body: dict, response: dict, reply: Reply, turn: list[dict]) -> None:
        if body.get("store") is not False:
            stored[response["id"]] = (response, turn + [_answer_message(reply)])
            while len(stored) > MAX_STORED_RESPONSES:
                stored.pop(next(iter(stored)))

    @app.post("/v1/responses")
    async def responses(request: Request):
        """OpenAI's Responses API (client.responses.create), answered as the chat it amounts to; a response
        follows its previous_response_id's conversation, and is kept for the next unless store is false."""
        body = await read_body(request)
        previous = _get(body, "previous_response_id", str)
        history = stored_response(previous, "previous_response_id")[1] if previous else []
        chat, turn = _responses_to_chat(body, history)
        reply = await chat_reply(request, chat)
        if not reply.stream:
            response = _response(reply, body, (await reply.finish_reasons())[0])
            store(body, response, reply, turn)
            return response
        stream = _ResponseEvents(reply, body)

        async def events() -> AsyncIterator[str]:
            for text in stream.start():
                yield text
            finish = "stop"
            try:
                async for _, deltas, reason in reply.events():
                    finish = reason or finish
                    for delta in deltas:
                        for text in stream.delta(delta):
                            yield text
            except APIError as exc:  # the status line is gone: an error event, as OpenAI sends
                yield stream.event("error", code=exc.code, message=exc.message, param=exc.param)
                return
            for text in stream.end(finish):
                yield text
            store(body, stream.final, reply, turn)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str) -> dict:
        return stored_response(response_id)[0]

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str) -> dict:
        stored_response(response_id)
        del stored[response_id]
        return {"id": response_id, "object": "response", "deleted": True}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> dict:
        """OpenAI's embeddings (client.embeddings.create): each input's last hidden state (after the final norm) at
        its last token, L2-normalised, as vLLM pools a decoder model; "float" lists or "base64" little-endian
        float32, which the openai client asks for by default."""
        body = await read_body(request)
        served = pick(body)
        _, inputs = await _texts(served, body, "input", MAX_EMBEDDING_INPUTS)
        if max(map(len, inputs)) > served.loaded.context_length:
            raise APIError(400, f"an input is longer than this model's context of {served.loaded.context_length} "
                           "tokens", "input", "context_length_exceeded")
        form = _get(body, "encoding_format", str, "float")
        if form not in ("float", "base64"):
            raise APIError(400, "'encoding_format' must be float or base64", "encoding_format", "invalid_value")
        width = served.loaded.model.config.hidden_size
        if _get(body, "dimensions", int, width) != width:
            raise APIError(400, f"'dimensions': this model's embeddings have {width}", "dimensions", "invalid_value")
        _get(body, "user", str)
        vectors = await asyncio.wrap_future(served.engine.call(lambda: _embed(served, inputs)))
        return {"object": "list", "model": served.model_id, "data": [
            {"object": "embedding", "index": i, "embedding": vector.tolist() if form == "float"
             else base64.b64encode(vector.astype("<f4").tobytes()).decode()} for i, vector in enumerate(vectors)],
            "usage": {"prompt_tokens": sum(map(len, inputs)), "total_tokens": sum(map(len, inputs))}}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        served = pick(body)
        # n answers to each prompt, choice i * n + j answering prompt i, as OpenAI numbers them
        values, prompts = await _texts(served, body, "prompt", MAX_PROMPTS)
        params, n = served.sampling(body, max(len(p) for p in prompts), "prompt")
        if "max_tokens" not in body and "max_completion_tokens" not in body:
            params.max_new_tokens = min(params.max_new_tokens, 16)  # OpenAI's default for completions
        reply = Reply(served, request, body, prompts, params, n, "text_completion", "text_completion", "cmpl",
                      split_think=False)
        # echo: the answer repeats its prompt before the completion (the prompt as sent, or its ids decoded)
        echo = [v if isinstance(v, str) else served.loaded.tokenizer.decode(p) for v, p in zip(values, prompts)] \
            if _get(body, "echo", bool, False) else [""] * len(prompts)
        if not reply.stream:
            finish = await reply.finish_reasons()
            return reply.response([{"index": i, "text": echo[i // n] + a.content, "logprobs": reply.logprobs(i),
                                    "finish_reason": finish[i]} for i, a in enumerate(reply.answers)])

        async def chunks() -> AsyncIterator[str]:
            unechoed = set(range(reply.choices))
            async for index, deltas, reason in reply.events():
                text = "".join(d.get("content", "") for d in deltas)
                if index in unechoed:
                    unechoed.discard(index)
                    text = echo[index // n] + text
                if text or reason:
                    yield reply.chunk([{"index": index, "text": text, "logprobs": reply.logprobs(index, True),
                                        "finish_reason": reason}])

        return reply.streaming(chunks)

    return app


def _named(spec: str) -> tuple[str, str]:
    """NAME=DIR as (NAME, DIR); a bare DIR, or an existing path with '=' in it, as ("", DIR)."""
    return spec.rpartition("=")[::2] if "=" in spec and not Path(spec).exists() else ("", spec)


def serve(model_dirs: str | list[str], lora_dir: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, served_model_name: str | None = None, device: str = "auto",
          max_batch: int = 32, chat: bool | None = None, lora_modules: list[str] | None = None,
          allow_runtime_lora: bool = False) -> None:
    """Load the models, start an engine for each (all on one thread), and serve until interrupted (what serve.py
    runs). A model is a directory or NAME=DIRECTORY; `lora_dir` and `served_model_name` are for a single model, and
    so are `lora_modules`: adapters (NAME=DIRECTORY) served unmerged next to it, each request picking one by name,
    and `allow_runtime_lora`: adapters loaded and unloaded while serving (/v1/load_lora_adapter)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    model_dirs = [model_dirs] if isinstance(model_dirs, str) else model_dirs
    if len(model_dirs) > 1 and (lora_dir or served_model_name or lora_modules or allow_runtime_lora):
        raise LoadError("--lora, --lora_modules, --allow_runtime_lora and --served_model_name go with one --model; "
                        "name each of several as NAME=DIR")
    if lora_dir and (lora_modules or allow_runtime_lora):
        raise LoadError("--lora merges one adapter into the model, --lora_modules and --allow_runtime_lora serve "
                        "adapters next to it: give one of them")
    adapters = {}
    for adapter, directory in map(_named, lora_modules or []):
        adapter = adapter or Path(directory).resolve().name
        if adapter in adapters:
            raise LoadError(f"two adapters would be served as {adapter}: name them as NAME=DIR")
        adapters[adapter] = Path(directory)
    servers, engines = [], []
    try:
        for spec in model_dirs:
            name, path = _named(spec)
            loaded = load(path, lora_dir, device, chat)
            rows = attach_adapters(loaded, adapters) if adapters or allow_runtime_lora else None
            engine = Engine(loaded.model, max_batch=max_batch, max_context=loaded.context_length, adapters=rows)
            engines.append(engine)
            servers.append(Server(loaded, engine, api_key, served_model_name or name or None))
            base = servers[-1].model_id
            for index, (adapter, directory) in enumerate(adapters.items(), start=1):
                is_chat = is_chat_model(directory) if chat is None else chat
                servers.append(Server(replace(loaded, name=adapter, is_chat=is_chat), engine, api_key, adapter,
                                      index, base))
        start_together(engines)  # one thread runs every model
        app = create_app(servers, allow_runtime_lora, chat)
        for server in servers:
            kind = "chat" if server.loaded.is_chat else "base"
            of = f"LoRA adapter of {server.parent}, " if server.parent else ""
            print(f"serving {server.model_id} ({of}{kind} model, context {server.loaded.context_length}) on "
                  f"http://{host}:{port}/  (OpenAI API at http://{host}:{port}/v1)", flush=True)
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        for engine in engines:
            engine.close()
