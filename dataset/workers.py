"""Worker processes for the tokenizing steps (dataset/bins.py, dataset/prepared.py): a file's chunks go out to a
pool, results come back in input order with a bounded number in flight, and the pool shuts down cleanly however
the caller stops, Ctrl-C included.

Why not multiprocessing.Pool with `terminate()`: a terminal's Ctrl-C signals the whole process group, so the
workers busy with a chunk died with a traceback each, and the parent's `terminate()` hung in 2 tries of 26 here
(a 124 MB chat file, Ctrl-C a few seconds in) instead of stopping. Here the workers ignore SIGINT and finish the
chunk in hand, the parent alone stops, chunks not yet started are cancelled, and the pool is joined, not killed; a
worker that dies anyway (out of memory, kill -9) raises BrokenProcessPool in the parent instead of hanging.
"""

import os
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager


def _start_worker(initializer: Callable, *initargs) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; see the module docstring
    initializer(*initargs)


def _in_order(pool: ProcessPoolExecutor, fn: Callable, chunks: Iterable, window: int) -> Iterator:
    # Pool.map / imap would read the whole input into the pool's queue whenever the workers fall behind; a file
    # of many GB must not be, so at most `window` chunks are in flight.
    pending = deque()
    for chunk in chunks:
        pending.append(pool.submit(fn, chunk))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


@contextmanager
def ordered_results(fn: Callable, chunks: Iterable, num_workers: int, initializer: Callable,
                    initargs: tuple) -> Iterator[Iterator]:
    """An iterator of fn(chunk) for each chunk, in input order, computed in `num_workers` processes (0: min(4, CPUs))
    that each ran initializer(*initargs) first (at most 2 * num_workers + 2 chunks in flight); with one worker, in
    this process. Leaving the block, however it is left, cancels what has not started and joins the workers."""
    num_workers = num_workers or min(4, os.cpu_count() or 1)
    if num_workers <= 1:
        initializer(*initargs)
        yield map(fn, chunks)
        return
    pool = ProcessPoolExecutor(num_workers, initializer=_start_worker, initargs=(initializer, *initargs))
    try:
        yield _in_order(pool, fn, chunks, window=2 * num_workers + 2)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
