"""The server's counters in Prometheus' text format (GET /metrics), under vLLM's metric names, so that a dashboard
or alert written for a vLLM server reads a danlu one: requests running and waiting, prompt and generated tokens,
finished requests by reason, and the time to the first token and to the last as histograms, per model."""

import time
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field

# seconds; vLLM's buckets for time to first token (its end-to-end ones go further, to 7,680 s)
BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
           80.0, 160.0, 640.0, 2560.0)


@dataclass
class Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))  # the last: above every bucket
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds

    def lines(self, name: str, labels: str) -> list[str]:
        out, seen = [], 0
        for bound, n in zip((*map(str, BUCKETS), "+Inf"), self.counts):
            seen += n
            out.append(f'{name}_bucket{{{labels},le="{bound}"}} {seen}')
        return out + [f"{name}_sum{{{labels}}} {self.total}", f"{name}_count{{{labels}}} {seen}"]


@dataclass
class ModelStats:
    """What one served model (a LoRA adapter counts as its own) has done since the server started."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: Counter = field(default_factory=Counter)  # requests' sequences by finish reason: stop, length, abort
    first_token: Histogram = field(default_factory=Histogram)
    whole: Histogram = field(default_factory=Histogram)


class SequenceClock:
    """Times one sequence for its model's stats: `token()` on each token, `done(reason, tokens)` at its end."""

    def __init__(self, stats: ModelStats, prompt_tokens: int):
        self.stats, self.start, self.first = stats, time.monotonic(), True
        stats.prompt_tokens += prompt_tokens

    def token(self) -> None:
        if self.first:
            self.first = False
            self.stats.first_token.observe(time.monotonic() - self.start)

    def done(self, reason: str, tokens: int) -> None:
        self.stats.whole.observe(time.monotonic() - self.start)
        self.stats.generation_tokens += tokens
        self.stats.finished[reason] += 1


def render(models: list[tuple[str, ModelStats, int, int]]) -> str:
    """(model name, its stats, requests running and waiting on its engine) as Prometheus' text format."""
    def label(name: str) -> str:
        return 'model_name="' + name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'

    families = [
        ("vllm:num_requests_running", "gauge", "Requests decoding now.", lambda m: [f"{{{label(m[0])}}} {m[2]}"]),
        ("vllm:num_requests_waiting", "gauge", "Requests waiting to join the batch.",
         lambda m: [f"{{{label(m[0])}}} {m[3]}"]),
        ("vllm:prompt_tokens_total", "counter", "Prompt tokens prefilled.",
         lambda m: [f"{{{label(m[0])}}} {m[1].prompt_tokens}"]),
        ("vllm:generation_tokens_total", "counter", "Tokens generated.",
         lambda m: [f"{{{label(m[0])}}} {m[1].generation_tokens}"]),
        ("vllm:request_success_total", "counter", "Sequences finished, by reason.",
         lambda m: [f'{{{label(m[0])},finished_reason="{reason}"}} {m[1].finished[reason]}'
                    for reason in ("stop", "length", "abort")]),
    ]
    out = []
    for name, kind, text, rows in families:
        out += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        out += [name + row for model in models for row in rows(model)]
    for name, attribute, text in (("vllm:time_to_first_token_seconds", "first_token", "Time to the first token."),
                                  ("vllm:e2e_request_latency_seconds", "whole", "Time to the last token.")):
        out += [f"# HELP {name} {text}", f"# TYPE {name} histogram"]
        for model_name, stats, _, _ in models:
            out += getattr(stats, attribute).lines(name, label(model_name))
    return "\n".join(out) + "\n"
