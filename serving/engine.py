"""The continuous-batching engine: one background thread owns the model and advances every active sequence by
one token per step; a request that arrives while others decode is prefilled and joins the running batch.

The batch shares one KV cache whose rows are right-aligned: every row's tokens end at the last column, a row
that joined with a shorter history has padding (masked out) on its left. Joining copies the cache once (a row
whose prompt is longer than the batch's history pads every other row on the left); a finished row is dropped
and the columns no row needs any more are trimmed away, so the cache is never longer than the longest live
sequence. Each row has its own position ids, sampling parameters, random generator, stop tokens and budget,
and its own LoRA adapter where the model carries several unmerged (model/lora.py's AdapterRows), which may be
added and removed between two steps.
"""

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from itertools import count

import torch

from model import LM, KVCache
from model.generation import apply_penalties, sample_next_token
from model.lora import AdapterRows, StackedAdapter
from serving.structured import Grammar

log = logging.getLogger("danlu.engine")

Logprob = tuple[float, list[tuple[int, float]]]  # a token's log-probability, and the top alternatives [(token, lp)]


def logprob_records(logprobs: torch.Tensor, tokens: list[int], top: int) -> list[Logprob]:
    """Each row of log-probabilities (rows, vocab) as the record of its token: its log-probability and the `top`
    most likely tokens with theirs."""
    best = logprobs.topk(top) if top else None
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logprobs.device)[:, None])[:, 0].tolist()
    return [(lp, list(zip(best.indices[i].tolist(), best.values[i].tolist())) if top else [])
            for i, lp in enumerate(chosen)]


@dataclass
class SamplingParams:
    """How one sequence is decoded. temperature 0 is greedy; penalties as transformers (repetition, over the
    prompt and the output) and OpenAI (frequency and presence, over the output) define them."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit (OpenAI's logit_bias)
    logprobs: int | None = None  # record each new token's log-probability and this many alternatives (None: off)
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (a completion's echo)
    grammar: Grammar | None = None  # what the answer must fit (a JSON schema, a tool call): other tokens are masked


Event = tuple[int | None, str | None]  # (token, None) for each new token, then (None, finish_reason)


class Sequence:
    """One request in the engine. Iterate it for its events, or pass `on_event` to `Engine.submit`.

    finish_reason: "stop" (a stop token, which is the last token), "length" (max_new_tokens or the context
    window), "cancelled" (`cancel()`), "error" (the engine failed on this batch; the server lives on).
    """

    _ids = count()

    def __init__(self, prompt: list[int], params: SamplingParams, on_event: Callable[[int | None, str | None], None]
                 | None, adapter: int = 0):
        self.id = next(self._ids)
        self.prompt, self.params = list(prompt), params
        self.adapter = adapter  # the LoRA adapter this sequence is decoded with (its id in AdapterRows; 0: none)
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.cancelled = False
        self._events: queue.Queue[Event] | None = None
        if on_event is None:
            self._events = queue.Queue()
            on_event = lambda token, reason: self._events.put((token, reason))  # noqa: E731
        self._on_event = on_event
        self.generator: torch.Generator | None = None
        # decoding state, owned by the engine thread
        self.kv_len = 0
        self.next_token = 0
        self.counts: torch.Tensor | None = None  # output token counts (vocab,)
        self.seen: torch.Tensor | None = None  # prompt or output token present (vocab,)
        self.bias: torch.Tensor | None = None  # logit_bias as a (vocab,) row
        # with params.logprobs, per new token: its log-probability and the top alternatives, from the model's own
        # distribution (before logit_bias, penalties and temperature, as vLLM reports them)
        self.logprobs: list[Logprob] = []
        self.prompt_logprobs: list[Logprob] = []  # prompt[1:]'s, with params.prompt_logprobs
        self.grammar_state = params.grammar.start if params.grammar else None  # the answer so far, in its grammar

    def cancel(self) -> None:
        """Stop generating: the engine drops the sequence at its next step (thread-safe)."""
        self.cancelled = True

    def __iter__(self) -> Iterator[int]:
        """The new tokens as they come; afterwards `finish_reason` is set."""
        assert self._events is not None, "iterate a sequence submitted without on_event"
        while True:
            token, reason = self._events.get()
            if reason is not None:
                return
            yield token


class NoSuchAdapter(ValueError):
    """A sequence submitted with a LoRA adapter the engine does not have (any more)."""


class Engine:
    """`Engine(model).start()`; `submit(prompt_ids, params)` from any thread; `close()` at the end. `adapters`: the
    AdapterRows of a model with LoRA adapters stacked unmerged, which `submit(..., adapter=i)` picks from, and
    which `add_adapter` / `remove_adapter` change while the engine runs."""

    def __init__(self, model: LM, max_batch: int = 32, max_context: int | None = None,
                 adapters: AdapterRows | None = None):
        self.model, self.config, self.adapters = model, model.config, adapters
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.max_batch = max_batch
        self.max_context = max_context or int(self.config.max_position_embeddings)
        self.vocab = model.get_output_embeddings().weight.shape[0]
        self._queue: queue.Queue[Sequence] = queue.Queue()
        self._active: list[Sequence] = []
        self._cache: KVCache | None = None
        self._mask: torch.Tensor | None = None  # (rows, columns) 1 = a real position of that row
        self._thread: threading.Thread | None = None
        self._peers: list[Engine] = [self]  # the engines that share this one's thread (start_together)
        self._wake = threading.Event()  # set by submit: the thread has something to do
        self._closing = False
        self._calls: queue.Queue[tuple[Callable, Future]] = queue.Queue()  # run on the engine thread between steps
        self._retiring: set[int] = set()  # adapters removed, whose last sequences are still running or queued
        self._adapter_lock = threading.Lock()  # between submit's check and the sweep that drops retired adapters
        self.steps = 0  # decode steps taken (for tests and benchmarks)
        self.max_rows_seen = 0  # the largest batch decoded in one step
        self.finished: Counter[str] = Counter()  # sequences by finish reason
        self.tokens_generated = 0

    # -- public ---------------------------------------------------------------------------------------------------

    def start(self) -> "Engine":
        start_together([self])
        return self

    def close(self) -> None:
        """Stop this engine; the thread ends (and is waited for) once every engine it runs is closed."""
        self._closing = True
        self._wake.set()
        if self._thread is not None and all(peer._closing for peer in self._peers):
            self._thread.join(timeout=10)
        while not self._calls.empty():
            self._calls.get_nowait()[1].set_exception(RuntimeError("the engine is closed"))

    def submit(self, prompt: list[int], params: SamplingParams,
               on_event: Callable[[int | None, str | None], None] | None = None, adapter: int = 0) -> Sequence:
        """Queue a sequence; its events are passed to `on_event` on the engine thread (keep it quick), or, without
        one, are read by iterating the returned Sequence. `adapter`: 1, 2, ... decode with that stacked LoRA
        adapter, 0 with the model alone."""
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) >= self.max_context:
            raise ValueError(f"prompt of {len(prompt)} tokens leaves no room in the context of {self.max_context}")
        seq = Sequence(prompt, params, on_event, adapter)
        with self._adapter_lock:  # an adapter being removed takes no new sequence
            if adapter and (self.adapters is None or adapter not in self.adapters.adapters
                            or adapter in self._retiring):
                raise NoSuchAdapter(f"no LoRA adapter {adapter} in this engine")
            self._queue.put(seq)
        self._wake.set()
        return seq

    def call(self, fn: Callable) -> Future:
        """Run fn() on the engine thread between two steps; its Future holds what it returns or raises."""
        future = Future()
        self._calls.put((fn, future))
        self._wake.set()
        return future

    def add_adapter(self, adapter: StackedAdapter) -> Future:
        """Stack a LoRA adapter (AdapterRows.read) between two steps; the Future holds its id, for submit."""
        return self.call(lambda: self.adapters.add(adapter))

    def remove_adapter(self, adapter_id: int) -> None:
        """Take no more sequences for an adapter; it is unstacked once the ones running or queued are done."""
        with self._adapter_lock:
            if self.adapters is None or adapter_id not in self.adapters.adapters:
                raise NoSuchAdapter(f"no LoRA adapter {adapter_id} in this engine")
            self._retiring.add(adapter_id)
        self._wake.set()

    @property
    def active(self) -> int:
        return len(self._active)

    def load(self) -> tuple[Counter, Counter]:
        """The sequences decoding and those waiting, counted by adapter id (0: the model alone)."""
        with self._queue.mutex:
            waiting = Counter(seq.adapter for seq in self._queue.queue)
        return Counter(seq.adapter for seq in list(self._active)), waiting

    # -- the engine thread ----------------------------------------------------------------------------------------

    def _step(self) -> bool:
        """Prefill the waiting sequences into the batch and decode one token for it; False when there was nothing
        to do."""
        busy = self._run_calls()
        try:
            self._drop_retired_adapters()
            admitted = self._admit() or busy
            self._drop_finished()
            if not self._active:
                return admitted
            self._decode_step()
            self._drop_finished()
        except Exception:  # a failed step must not kill the server: fail the batch, keep serving
            log.exception("engine step failed; finishing the %d active sequences with 'error'", len(self._active))
            for seq in self._active:
                self._finish(seq, "error")
            self._active, self._cache, self._mask = [], None, None
        return True

    def _run_calls(self) -> bool:
        ran = False
        while not self._calls.empty():
            fn, future = self._calls.get_nowait()
            ran = True
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except Exception as exc:
                    future.set_exception(exc)
        return ran

    def _drop_retired_adapters(self) -> None:
        """Unstack the removed adapters that no running or queued sequence uses any more."""
        if not self._retiring:
            return
        with self._adapter_lock, self._queue.mutex:
            in_use = {seq.adapter for seq in self._active} | {seq.adapter for seq in self._queue.queue}
            for adapter_id in self._retiring - in_use:
                self.adapters.remove(adapter_id)
                self._retiring.discard(adapter_id)

    def _admit(self) -> bool:
        """Prefill waiting sequences and join them to the batch; False when none was waiting."""
        admitted = False
        while len(self._active) < self.max_batch:
            try:
                seq = self._queue.get_nowait()
            except queue.Empty:
                break
            admitted = True
            if seq.cancelled:
                self._finish(seq, "cancelled")
                continue
            try:
                self._prefill(seq)
            except Exception:
                log.exception("prefill failed")
                self._finish(seq, "error")
        return admitted

    def _prefill(self, seq: Sequence) -> None:
        length = len(seq.prompt)
        cache = KVCache(self.config, 1, length, self.device, self.dtype)
        ids = torch.tensor([seq.prompt], device=self.device)
        top = seq.params.prompt_logprobs
        self._select_adapters([seq])
        logits = self.model(ids, past_key_values=cache, logits_to_keep=0 if top is not None else 1).logits
        if top is not None:  # how likely the model found each prompt token after the ones before it
            seq.prompt_logprobs = logprob_records(logits[0, :-1].float().log_softmax(-1), seq.prompt[1:], top)
        logits = logits[:, -1]
        seq.kv_len = length
        seq.counts = torch.zeros(self.vocab, device=self.device)
        seq.seen = torch.zeros(self.vocab, dtype=torch.bool, device=self.device)
        seq.seen[ids[0]] = True
        seq.bias = torch.zeros(self.vocab, device=self.device)
        for token, bias in seq.params.logit_bias.items():
            seq.bias[token] = bias
        if seq.params.max_new_tokens <= 0:  # the prompt's logprobs were all it asked for
            self._finish(seq, "length")
            return
        if seq.params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(seq.params.seed)
        token = self._sample(logits, [seq])[0]
        if not self._emit(seq, token):
            self._join(seq, cache)

    def _join(self, seq: Sequence, cache: KVCache) -> None:
        """Put a prefilled sequence's keys and values into the batch cache, right-aligned."""
        length = cache.seq_len
        if not self._active:
            self._cache, self._mask = cache, torch.ones(1, length, dtype=torch.long, device=self.device)
            self._active = [seq]
            return
        old, rows, width = self._cache, len(self._active), self._cache.seq_len
        new_width = max(width, length)
        merged = KVCache(self.config, rows + 1, new_width + 64, self.device, self.dtype)
        for new, (a, b) in ((merged.keys, (old.keys, cache.keys)), (merged.values, (old.values, cache.values))):
            new[:, :rows, :, new_width - width:new_width] = a[:, :, :, :width]
            new[:, rows, :, new_width - length:new_width] = b[:, 0, :, :length]
        merged.seq_len = new_width
        mask = torch.zeros(rows + 1, new_width, dtype=torch.long, device=self.device)
        mask[:rows, new_width - width:] = self._mask
        mask[rows, new_width - length:] = 1
        self._cache, self._mask = merged, mask
        self._active.append(seq)

    def _decode_step(self) -> None:
        rows = self._active
        tokens = torch.tensor([[s.next_token] for s in rows], device=self.device)
        positions = torch.tensor([[s.kv_len] for s in rows], device=self.device)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)
        self._select_adapters(rows)
        logits = self.model(tokens, attention_mask=self._mask, position_ids=positions,
                            past_key_values=self._cache).logits[:, -1]
        self.steps += 1
        self.max_rows_seen = max(self.max_rows_seen, len(rows))
        for seq, token in zip(rows, self._sample(logits, rows)):
            seq.kv_len += 1
            self._emit(seq, token)

    def _select_adapters(self, rows: list[Sequence]) -> None:
        """Point the model's stacked adapters at the next forward pass's rows (none: every row is the base)."""
        if self.adapters is not None:
            self.adapters.select([seq.adapter for seq in rows], self.device, self.dtype)

    def _emit(self, seq: Sequence, token: int) -> bool:
        """Hand a new token to its sequence; True when the sequence is finished."""
        seq.tokens.append(token)
        self.tokens_generated += 1
        seq.next_token = token
        seq.counts[token] += 1
        seq.seen[token] = True
        self._notify(seq, token, None)
        grammar = seq.params.grammar
        if grammar is not None and token not in seq.params.stop_token_ids:
            seq.grammar_state = grammar.advance(seq.grammar_state, grammar.trie.bytes_of(token))
            if seq.grammar_state is None:  # only when no token fitted: the vocabulary cannot spell what must come
                log.error("sequence %d: no token of the vocabulary fits its grammar", seq.id)
                self._finish(seq, "error")
            elif grammar.done(seq.grammar_state) and \
                    not grammar.allowed(seq.grammar_state, self.vocab, self.device).any():
                self._finish(seq, "stop")  # whole, and nothing may follow: the stop token would be the only choice
        if token in seq.params.stop_token_ids:
            self._finish(seq, "stop")
        elif len(seq.tokens) >= seq.params.max_new_tokens or seq.kv_len + 1 >= self.max_context:
            self._finish(seq, "length")
        return seq.finish_reason is not None

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.finish_reason is None:
            seq.finish_reason = reason
            self.finished[reason] += 1
            self._notify(seq, None, reason)

    @staticmethod
    def _notify(seq: Sequence, token: int | None, reason: str | None) -> None:
        """Call the sequence's listener; one that fails (its client is gone) cancels that sequence only."""
        try:
            seq._on_event(token, reason)
        except Exception:
            log.exception("event listener of sequence %d failed; cancelling it", seq.id)
            seq.cancelled = True

    def _drop_finished(self) -> None:
        """Remove finished and cancelled rows from the batch, and the cache columns no live row needs."""
        for seq in self._active:
            if seq.cancelled:
                self._finish(seq, "cancelled")
        keep = [i for i, s in enumerate(self._active) if s.finish_reason is None]
        if len(keep) == len(self._active):
            return
        self._active = [self._active[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        index = torch.tensor(keep, device=self.device)
        first = int(self._mask.shape[1] - max(s.kv_len for s in self._active))
        cache = self._cache
        cache.keys = cache.keys.index_select(1, index)[:, :, :, first:]
        cache.values = cache.values.index_select(1, index)[:, :, :, first:]
        cache.seq_len -= first
        self._mask = self._mask.index_select(0, index)[:, first:]

    def _sample(self, logits: torch.Tensor, rows: list[Sequence]) -> list[int]:
        """One token per row from logits (rows, vocab), each row with its own parameters."""
        params = [s.params for s in rows]
        logits = logits.float()
        raw = logits.log_softmax(-1) if any(p.logprobs is not None for p in params) else None
        if any(p.logit_bias for p in params):  # added to the model's logits, as OpenAI does, before anything else
            logits = logits + torch.stack([s.bias for s in rows])
        logits = apply_penalties(logits, torch.stack([s.seen for s in rows]),
                                 torch.stack([s.counts for s in rows]), [p.repetition_penalty for p in params],
                                 [p.frequency_penalty for p in params], [p.presence_penalty for p in params])
        for row, seq in enumerate(rows):
            if seq.params.grammar is not None:
                logits[row] = logits[row].masked_fill(~self._fitting(seq), float("-inf"))
        tokens = sample_next_token(logits, do_sample=True, temperature=[p.temperature for p in params],
                                   top_k=[p.top_k for p in params], top_p=[p.top_p for p in params],
                                   generator=[s.generator for s in rows]).tolist()
        for row, (seq, token) in enumerate(zip(rows, tokens)):
            if seq.params.logprobs is not None:
                seq.logprobs += logprob_records(raw[row:row + 1], [token], seq.params.logprobs)
        return tokens

    def _fitting(self, seq: Sequence) -> torch.Tensor:
        """The tokens that keep a sequence's answer inside its grammar, its stop tokens once the answer is whole;
        all of them where none fits (the token drawn then fails the grammar and the sequence ends in an error)."""
        grammar, state = seq.params.grammar, seq.grammar_state
        mask = grammar.allowed(state, self.vocab, self.device)
        if grammar.done(state) and seq.params.stop_token_ids:
            mask = mask.clone()
            mask[list(seq.params.stop_token_ids)] = True
        return mask if mask.any() else torch.ones_like(mask)


def start_together(engines: list[Engine]) -> list[Engine]:
    """Start engines (the models of one server) on one thread that steps each in turn. On a CPU, two threads each
    running a model slow each other down, even taking turns: every thread that runs torch's parallel loops has a
    team of OpenMP workers of its own, and the teams contend for the cores (an engine decoded 0.6-0.7x as fast
    once a second engine's thread had run, measured on 2 cores)."""
    wake = threading.Event()
    thread = threading.Thread(target=_run_engines, args=(engines, wake), name="danlu-engine", daemon=True)
    for engine in engines:
        engine._peers, engine._wake, engine._thread = engines, wake, thread
    thread.start()
    return engines


def _run_engines(engines: list[Engine], wake: threading.Event) -> None:
    """The engine thread: a step of each open engine in turn, and a wait for a request while all are idle."""
    with torch.no_grad():
        while not all(engine._closing for engine in engines):
            wake.clear()  # before looking at the queues: a request that comes after sets it again
            busy = False
            for engine in engines:
                if not engine._closing:
                    busy = engine._step() or busy
            if not busy:
                wake.wait(0.05)


def wait_idle(engine: Engine, timeout: float = 10.0) -> bool:
    """True once the engine has no active or queued sequence (tests and benchmarks)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not engine.active and engine._queue.empty():
            return True
        time.sleep(0.01)
    return False


@dataclass
class Completion:
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    prompt_tokens: int = 0


def complete(engine: Engine, prompt: list[int], params: SamplingParams, adapter: int = 0) -> Completion:
    """Submit and wait: the whole completion (blocking; not for the event loop)."""
    seq = engine.submit(prompt, params, adapter=adapter)
    tokens = list(seq)
    return Completion(tokens, seq.finish_reason or "error", len(prompt))
