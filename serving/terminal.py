"""The terminal chat behind chat.py: the conversation kept within the context window, the commands, and the
answer printed as it streams (the think block apart from the answer). Reads any text stream, so it runs the same
on a terminal and on a pipe."""

import sys
from dataclasses import dataclass, field, replace
from typing import TextIO

from transformers import PreTrainedTokenizerFast

from dataset.chat import render_chat
from serving.chat_format import EMPTY_THINK, AnswerStream
from serving.engine import Engine, SamplingParams

HELP = """commands:
  /reset          forget the conversation (the system prompt stays)
  /system TEXT    set the system prompt (empty: none)
  /think on|off   let a reasoning model think first (shown apart), or answer directly
  /help           this list
  /quit           leave (also Ctrl-D)"""


@dataclass
class Conversation:
    """The turns so far, rendered into a prompt that fits the context window with room for the answer."""

    tokenizer: PreTrainedTokenizerFast
    context_length: int
    system: str = ""
    think: bool = True
    turns: list[dict] = field(default_factory=list)

    def messages(self, turns: list[dict]) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + turns

    def encode(self, turns: list[dict]) -> list[int]:
        text = render_chat(self.messages(turns), add_generation_prompt=True) + ("" if self.think else EMPTY_THINK)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt(self, user: str, answer_room: int) -> tuple[list[int], int]:
        """Token ids for the history plus `user`'s new turn, and how many old turns were dropped to leave
        `answer_room` tokens for the answer (oldest first, a user turn with its answer)."""
        turns = self.turns + [{"role": "user", "content": user}]
        dropped = 0
        ids = self.encode(turns)
        while len(ids) + answer_room > self.context_length and len(turns) > 1:
            cut = 2 if len(turns) > 2 and turns[1]["role"] == "assistant" else 1
            turns, dropped = turns[cut:], dropped + cut
            ids = self.encode(turns)
        self.turns = turns[:-1]
        return ids, dropped


class Printer:
    """Prints an answer's deltas: reasoning under a "[think]" label (dim on a terminal), then the answer."""

    def __init__(self, out: TextIO, color: bool):
        self.out, self.color = out, color
        self.section = ""

    def write(self, deltas: list[dict]) -> None:
        for delta in deltas:
            for key in ("reasoning_content", "content"):
                text = delta.get(key)
                if not text:
                    continue
                if self.section != key:
                    if key == "reasoning_content":
                        self.out.write(self.dim("[think] "))
                    elif self.section:
                        self.out.write(self.dim("\n[/think]") + "\n")
                    self.section = key
                self.out.write(self.dim(text) if key == "reasoning_content" else text)
        self.out.flush()

    def dim(self, text: str) -> str:
        return f"\033[2m{text}\033[0m" if self.color else text


def answer(engine: Engine, tokenizer: PreTrainedTokenizerFast, prompt: list[int], params: SamplingParams,
           printer: Printer, split_think: bool) -> tuple[AnswerStream, str]:
    """Generate and print one answer; Ctrl-C stops it. (the answer, its finish reason)"""
    stream = AnswerStream(tokenizer, stop_token_ids=params.stop_token_ids, split_think=split_think)
    seq = engine.submit(prompt, params)
    reason = "stop"
    try:
        for token in seq:
            printer.write(stream.feed(token))
        reason = seq.finish_reason or "stop"
    except KeyboardInterrupt:
        seq.cancel()
        reason = "cancelled"
    deltas, finish = stream.finish("stop" if reason == "cancelled" else reason)
    printer.write(deltas)
    if reason == "cancelled":
        printer.out.write(printer.dim(" [stopped]"))
    elif finish == "length":
        printer.out.write(printer.dim(" [max_new_tokens reached]"))
    printer.out.write("\n")
    printer.out.flush()
    return stream, reason


def read_line(prompt: str, stdin: TextIO, out: TextIO) -> str | None:
    """One line of input (None at the end of input); the prompt is shown only on a terminal."""
    if stdin is sys.stdin and stdin.isatty():
        out.write(prompt)  # input()'s own prompt would go to stderr
        out.flush()
        try:
            return input()
        except EOFError:
            return None
    line = stdin.readline()
    return None if not line else line.rstrip("\n")


def run(engine: Engine, tokenizer: PreTrainedTokenizerFast, is_chat: bool, context_length: int,
        params: SamplingParams, system: str = "", stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    """The read-answer loop until /quit or the end of input."""
    color = out.isatty()
    conversation = Conversation(tokenizer, context_length, system)
    kind = "chat model" if is_chat else "base model: each line is continued as raw text"
    out.write(f"danlu chat ({kind}, context {context_length} tokens). /help for commands, Ctrl-D to leave.\n")
    out.flush()
    while True:
        try:
            line = read_line("你> " if is_chat else "text> ", stdin, out)
        except KeyboardInterrupt:
            out.write("\n")
            return 0
        if line is None or line.strip() in ("/quit", "/exit"):
            return 0
        if not line.strip():
            continue
        command, _, rest = line.strip().partition(" ")
        if command == "/help":
            out.write(HELP + "\n")
        elif command == "/reset":
            conversation.turns = []
            out.write("(conversation cleared)\n")
        elif command == "/system":
            conversation.system = rest.strip()
            out.write(f"(system prompt {'set' if conversation.system else 'cleared'})\n")
        elif command == "/think":
            if rest.strip() not in ("on", "off"):
                out.write("usage: /think on|off\n")
            else:
                conversation.think = rest.strip() == "on"
                out.write(f"(thinking {rest.strip()})\n")
        elif command.startswith("/") and command[1:].isalpha():
            out.write(f"unknown command {command}; /help lists them\n")
        elif not is_chat:
            prompt = tokenizer(line, add_special_tokens=False)["input_ids"][-(context_length - 1):]
            budget = min(params.max_new_tokens, context_length - len(prompt))
            out.write(line)
            answer(engine, tokenizer, prompt, replace(params, max_new_tokens=budget), Printer(out, color), False)
        else:
            room = min(params.max_new_tokens, context_length // 2)
            prompt, dropped = conversation.prompt(line, room)
            if dropped:
                out.write(f"(context window full: dropped the {dropped} oldest turn{'s' * (dropped > 1)})\n")
            budget = min(params.max_new_tokens, context_length - len(prompt))
            if budget < 1:
                out.write(f"(that message is too long: {len(prompt)} tokens, the context holds "
                          f"{context_length}; not sent)\n")
                continue
            out.write("模型> " if color else "")
            stream, reason = answer(engine, tokenizer, prompt, replace(params, max_new_tokens=budget),
                                    Printer(out, color), True)
            conversation.turns += [{"role": "user", "content": line},
                                   {"role": "assistant", "content": stream.content}]
        out.flush()
