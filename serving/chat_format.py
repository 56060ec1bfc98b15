"""What the model writes, turned into what a client wants: text decoded token by token, stop strings cut out
(also when they span tokens), the `<think>` block apart from the answer, and `<tool_call>` blocks parsed.

Each piece works on a stream of text deltas, so the server and the terminal chat share it for streaming and
non-streaming answers alike.
"""

import json
import re
import uuid
from itertools import accumulate

from transformers import PreTrainedTokenizerFast

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
# The generation prompt that skips reasoning (as Qwen3's enable_thinking=False): an empty think block.
EMPTY_THINK = f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n"


class IncrementalDecoder:
    """Token ids in, text deltas out. A character split over several byte tokens comes out whole, once its
    last byte arrived (until then the decoded tail ends in U+FFFD and is held back)."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, skip_special_tokens: bool = False):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.tokens: list[int] = []
        self.start = 0  # tokens before this are decoded and sent for good

    def feed(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens[self.start:], skip_special_tokens=self.skip,
                                     clean_up_tokenization_spaces=False)
        if text.endswith("\ufffd"):
            return ""
        self.start = len(self.tokens)
        return text

    def flush(self) -> str:
        """Whatever is left at the end (an incomplete character comes out as U+FFFD)."""
        text = self.tokenizer.decode(self.tokens[self.start:], skip_special_tokens=self.skip,
                                     clean_up_tokenization_spaces=False)
        self.start = len(self.tokens)
        return text


def _held_prefix(text: str, markers: list[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a marker (it may become one)."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:n]):
                best = n
                break
    return best


class StopMatcher:
    """Cuts the text at the first stop string. `feed` returns the text safe to show now; text that might be the
    start of a stop string is held back until the next delta settles it."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        if self.stopped:
            return ""
        text = self.pending + delta
        hits = [(text.find(s), s) for s in self.stops if s in text]
        if hits:
            self.stopped, self.pending = True, ""
            return text[:min(hits)[0]]
        keep = _held_prefix(text, self.stops)
        self.pending = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return "" if self.stopped else text


class ThinkSplitter:
    """Splits the answer into reasoning (inside a leading `<think>…</think>`) and content, delta by delta.

    `thinking=True` means the prompt already opened the think block (the model's text starts inside it).
    The newlines around the block, as the chat template writes them, are not part of either side.
    """

    def __init__(self, thinking: bool = False):
        self.state = "think" if thinking else "start"  # start -> think -> content, or start -> content
        self.buffer = ""
        self.strip_next = thinking  # leading whitespace to drop at the start of the next side

    def feed(self, delta: str) -> tuple[str, str]:
        self.buffer += delta
        reasoning = content = ""
        while True:
            if self.state == "start":
                stripped = self.buffer.lstrip()
                if stripped.startswith(THINK_OPEN):
                    self.buffer = stripped[len(THINK_OPEN):]
                    self.state, self.strip_next = "think", True
                    continue
                if THINK_OPEN.startswith(stripped) and len(self.buffer) < 16:  # maybe the block is coming: wait
                    return reasoning, content
                self.state = "content"
                continue
            if self.strip_next:
                self.buffer = self.buffer.lstrip()
                if not self.buffer:
                    return reasoning, content
                self.strip_next = False
            if self.state == "think":
                end = self.buffer.find(THINK_CLOSE)
                if end >= 0:
                    reasoning += self.buffer[:end].rstrip()
                    self.buffer = self.buffer[end + len(THINK_CLOSE):]
                    self.state, self.strip_next = "content", True
                    continue
                keep = _held_prefix(self.buffer, [THINK_CLOSE])
                # trailing whitespace may be the newline before </think>: hold it too
                body = self.buffer[:len(self.buffer) - keep]
                tail_ws = len(body) - len(body.rstrip())
                cut = len(body) - tail_ws
                reasoning += self.buffer[:cut]
                self.buffer = self.buffer[cut:]
                return reasoning, content
            content += self.buffer
            self.buffer = ""
            return reasoning, content

    def flush(self) -> tuple[str, str]:
        """The end of the answer: whatever was held back (an unclosed think block counts as reasoning)."""
        text, self.buffer = self.buffer, ""
        if self.state == "think":
            return text.rstrip(), ""
        return "", "" if self.strip_next else text


_TOOL_CALL = re.compile(re.escape(TOOL_OPEN) + r"\s*(.*?)\s*" + re.escape(TOOL_CLOSE), re.DOTALL)


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """(content without the tool-call blocks, OpenAI `tool_calls`). A block whose JSON does not parse into
    {"name", "arguments"} is left in the content as the model wrote it."""
    calls, kept, last = [], [], 0
    for match in _TOOL_CALL.finditer(text):
        try:
            call = json.loads(match.group(1))
            name, arguments = call["name"], call.get("arguments", {})
            if not isinstance(name, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            continue
        kept.append(text[last:match.start()])
        last = match.end()
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": name, "arguments": arguments if isinstance(arguments, str)
                                   else json.dumps(arguments, ensure_ascii=False)}})
    kept.append(text[last:])
    return ("".join(kept).strip() if calls else text), calls


class AnswerStream:
    """One answer, token by token: decoded, cut at the first stop string, split into reasoning and content, tool
    calls held back and parsed at the end. `feed` returns the deltas to send now ({"content": ...} or
    {"reasoning_content": ...}); `finish` returns the last ones and the OpenAI finish_reason.

    stop_token_ids are left out of the text (the engine stops on them); `split_think` sends a leading think
    block as reasoning_content (`thinking`: the prompt already opened it); `tools`: parse `<tool_call>` blocks.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerFast, stop: list[str] | None = None,
                 stop_token_ids: list[int] | tuple[int, ...] = (), split_think: bool = True, thinking: bool = False,
                 tools: bool = False):
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop = StopMatcher(stop or [])
        self.think = ThinkSplitter(thinking) if split_think else None
        self.stop_token_ids = set(stop_token_ids)
        self.tools = tools
        self.tool_text = ""  # content from the first <tool_call> on, held until the end
        self.tool_pending = ""  # a tail of content that may be the start of <tool_call>
        self.content = self.reasoning = ""
        self.tool_calls: list[dict] = []
        self.completion_tokens = 0
        self.reasoning_tokens = 0  # those decoded inside the think block, its tags included
        self.logprobs: list[tuple[int, float, list[tuple[int, float]]]] = []  # (token, logprob, top alternatives)

    @property
    def stopped(self) -> bool:
        """A stop string was found: the caller should cancel the sequence."""
        return self.stop.stopped

    def feed(self, token: int, logprob: tuple[float, list[tuple[int, float]]] | None = None) -> list[dict]:
        """The deltas a new token makes; `logprob` (the engine's record of it) is kept for the answer's logprobs, a
        stop token's too (it is not in the text, but it was generated: a client that asked for one token and reads
        its logprob, as lm-evaluation-harness does, finds it)."""
        self.completion_tokens += 1
        if self.stop.stopped:
            return []
        if logprob is not None:
            self.logprobs.append((token, *logprob))
        if token in self.stop_token_ids:
            return []
        before = self.think.state if self.think else "content"
        deltas = self._text(self.stop.feed(self.decoder.feed(token)))
        if "think" in (before, self.think.state if self.think else "content"):
            self.reasoning_tokens += 1
        return deltas

    def finish(self, reason: str) -> tuple[list[dict], str]:
        deltas = self._text(self.stop.feed(self.decoder.flush()) + self.stop.flush(), final=True)
        if self.tools and self.tool_text:
            content, calls = parse_tool_calls(self.tool_text)
            if calls:
                self.tool_calls = calls
                if content:
                    deltas.append({"content": content})
                    self.content += content
                deltas.append({"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]})
                return deltas, "tool_calls"
            deltas.append({"content": self.tool_text})
            self.content += self.tool_text
        return deltas, "stop" if self.stop.stopped or reason == "stop" else "length"

    def _text(self, text: str, final: bool = False) -> list[dict]:
        reasoning, content = self.think.feed(text) if self.think else ("", text)
        if final and self.think:
            more_reasoning, more_content = self.think.flush()
            reasoning, content = reasoning + more_reasoning, content + more_content
        if self.tools:
            content = self._hold_tool_calls(content, final)
        deltas = []
        if reasoning:
            self.reasoning += reasoning
            deltas.append({"reasoning_content": reasoning})
        if content:
            self.content += content
            deltas.append({"content": content})
        return deltas

    def _hold_tool_calls(self, content: str, final: bool) -> str:
        """Content before the first `<tool_call>` goes out; from there on it waits for `finish`."""
        if self.tool_text:
            self.tool_text += content
            return ""
        text = self.tool_pending + content
        start = text.find(TOOL_OPEN)
        if start >= 0:
            self.tool_text, self.tool_pending = text[start:], ""
            return text[:start].rstrip()
        keep = 0 if final else _held_prefix(text, [TOOL_OPEN])
        if not final:  # whitespace before a tool call is not content: hold it until something else follows
            keep += len(text[:len(text) - keep]) - len(text[:len(text) - keep].rstrip())
        self.tool_pending = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]


# -- log-probabilities, as OpenAI's two endpoints spell them --------------------------------------------------------


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (tokenizers' ByteLevel, which danlu's and MiniMind's tokenizers use) read
    backwards: every byte is written as a printable character, the printable ones as themselves."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    shifted = iter(range(256, 512))
    return {chr(b) if b in printable else chr(next(shifted)): b for b in range(256)}


BYTE_DECODER = _byte_decoder()


def token_bytes(tokenizer: PreTrainedTokenizerFast, token: int) -> bytes:
    """The bytes a token stands for (a Chinese character's 3 bytes may be split over tokens); a special token's
    are its name's."""
    piece = tokenizer.convert_ids_to_tokens(token)
    if all(c in BYTE_DECODER for c in piece) and token not in tokenizer.all_special_ids:
        return bytes(BYTE_DECODER[c] for c in piece)
    return piece.encode()


def _token_text(tokenizer: PreTrainedTokenizerFast, token: int) -> str:
    """A token as text; a piece of a character shows as U+FFFD."""
    return token_bytes(tokenizer, token).decode("utf-8", errors="replace")


def _token_logprob(tokenizer: PreTrainedTokenizerFast, token: int, logprob: float) -> dict:
    raw = token_bytes(tokenizer, token)
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}


def chat_logprobs(tokenizer: PreTrainedTokenizerFast, records: list) -> dict:
    """A chat choice's `logprobs`: {"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}."""
    return {"content": [{**_token_logprob(tokenizer, token, logprob),
                         "top_logprobs": [_token_logprob(tokenizer, t, lp) for t, lp in top]}
                        for token, logprob, top in records]}


def completion_logprobs(tokenizer: PreTrainedTokenizerFast, records: list, offset: int = 0) -> dict:
    """A completion choice's `logprobs`: parallel lists of tokens, their logprobs, the top alternatives as
    {token: logprob}, and each token's character offset in the text (from `offset`). A record (token, None, None)
    is a token with no logprob: an echoed prompt's first."""
    tokens = [_token_text(tokenizer, token) for token, _, _ in records]
    offsets = list(accumulate((len(t) for t in tokens[:-1]), initial=offset)) if tokens else []
    return {"tokens": tokens, "token_logprobs": [logprob for _, logprob, _ in records],
            "top_logprobs": [None if top is None else {_token_text(tokenizer, t): lp for t, lp in top}
                             for _, _, top in records], "text_offset": offsets}
