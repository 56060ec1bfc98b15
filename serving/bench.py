"""Requests/s and tokens/s of the OpenAI-compatible server under 1, 4, 16, ... concurrent clients.

`bench_server(model_dir)` starts a server process on 127.0.0.1 (a free port), lets each client send its
requests one after another (streaming chat completions of exactly `max_tokens` tokens: `ignore_eos`), and
reports per client count the request rate, the generated tokens per second, latency and time to first token.
A server that stops answering is an error naming whether its process exited, with the end of its stderr.
"""

import collections
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Server:
    """A server process on a free port; its stderr is read as it comes (the last lines kept), so that a full pipe
    never blocks it and a crash can say why."""

    def __init__(self, model_dir: str | Path, lora_dir: str | Path | None, device: str):
        port = _free_port()
        code = (f"from serving.api import serve; serve({str(model_dir)!r}, {str(lora_dir) if lora_dir else None!r}, "
                f"port={port}, device={device!r}, max_batch=64)")
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{port}"
        self.stderr: collections.deque[str] = collections.deque(maxlen=50)
        self.reader = threading.Thread(target=self.stderr.extend, args=(self.proc.stderr,), daemon=True)
        self.reader.start()

    def state(self) -> str:
        """Whether the process runs, and the end of what it wrote to stderr."""
        if self.proc.poll() is None:
            return f"its process is still running; its stderr ends: {''.join(self.stderr)[-2000:]}"
        self.reader.join(timeout=5)
        return f"its process exited {self.proc.returncode}: {''.join(self.stderr)[-2000:]}"

    def wait_ready(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server did not start: {self.state()}")
            try:
                if requests.get(f"{self.url}/health", timeout=1).ok:
                    return
            except requests.RequestException:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not start in {timeout:g} s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _one_request(url: str, model: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(latency, time to first token, completion tokens) of one streaming chat completion."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.8, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, tokens = None, 0
    with requests.post(f"{url}/v1/chat/completions", json=body, stream=True, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines(decode_unicode=True):
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content") is not None \
                    and chunk["choices"][0]["delta"].get("role") is None:
                first = time.perf_counter() - start
    latency = time.perf_counter() - start
    return latency, first if first is not None else latency, tokens


def _run_clients(url: str, model: str, clients: int, requests_per_client: int, max_tokens: int,
                 prompt: str) -> dict:
    results: list[tuple[float, float, int]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        for i in range(requests_per_client):
            try:
                result = _one_request(url, model, f"{prompt}（{index}-{i}）", max_tokens)
            except Exception as exc:  # reported, not raised: one failed request should not hide the others
                with lock:
                    errors.append(repr(exc))
                continue
            with lock:
                results.append(result)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies, firsts, tokens = zip(*results) if results else ((), (), ())
    return {"clients": clients, "requests": len(results), "errors": len(errors),
            "first_error": errors[0] if errors else None, "seconds": round(wall, 3),
            "requests_per_s": round(len(results) / wall, 2), "tokens_per_s": round(sum(tokens) / wall, 1),
            "mean_latency_s": round(statistics.mean(latencies), 3) if latencies else None,
            "mean_ttft_s": round(statistics.mean(firsts), 3) if firsts else None}


def bench_server(model_dir: str | Path, clients: tuple[int, ...] = (1, 4, 16), requests_per_client: int = 4,
                 max_tokens: int = 64, prompt: str = "这条评论是好评还是差评？质量很好，物流很快。",
                 lora_dir: str | Path | None = None, device: str = "auto", timeout: float = 300) -> dict:
    """Start a server on `model_dir` and measure it under each number of concurrent clients.

    Returns {"model", "max_tokens", "requests_per_client", "rows": [{clients, requests, errors, seconds,
    first_error, requests_per_s, tokens_per_s, mean_latency_s, mean_ttft_s}, ...], "max_batch_seen"}.
    """
    server = _Server(model_dir, lora_dir, device)
    server.wait_ready(timeout)
    url = server.url
    try:
        model = requests.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        _one_request(url, model, prompt, 4)  # warm-up
        rows = [_run_clients(url, model, n, requests_per_client, max_tokens, prompt) for n in clients]
        health = requests.get(f"{url}/health", timeout=10).json()
    except requests.RequestException as err:
        raise RuntimeError(f"the server at {url} stopped answering ({err.__class__.__name__}); {server.state()}") \
            from err
    finally:
        server.stop()
    return {"model": str(model_dir), "max_tokens": max_tokens, "requests_per_client": requests_per_client,
            "rows": rows, "max_batch_seen": health["max_batch_seen"]}
