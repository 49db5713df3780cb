"""Work over the coordinates of long vectors, a chunk at a time, on as many threads as
torch uses on the CPU: each chunk's work is independent (it reads and writes only its own
coordinates), so chunks run side by side and their results come back in chunk order, the
same whatever the threads' timing. Each thread runs torch's operations on one thread of its
own (a chunk is too small to split again: nested thread teams only wait on each other)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from functools import cache
from typing import TypeVar

import torch

__all__ = ["chunk_length", "over_chunks"]

T = TypeVar("T")


@cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(
        threads, thread_name_prefix="wash-chunks", initializer=torch.set_num_threads, initargs=(1,)
    )


def over_chunks(work: Callable[[slice], T], total: int, size: int) -> list[T]:
    """``work(coordinates)`` for every chunk ``coordinates`` of ``range(total)`` of ``size``
    (the last one shorter), in chunk order, spread over ``torch.get_num_threads()`` threads
    (one: here, in order). An exception from a chunk is raised once every chunk ran; the
    first chunk's that raised wins."""
    chunks = [slice(start, min(start + size, total)) for start in range(0, total, size)]
    threads = min(torch.get_num_threads(), len(chunks))
    if threads <= 1:
        return [work(chunk) for chunk in chunks]
    running = [_pool(threads).submit(work, chunk) for chunk in chunks]
    wait(running)
    return [done.result() for done in running]


def chunk_length(rows: int, *, coordinates: int, values: int) -> int:
    """How many coordinates a chunk of ``rows`` rows (one per member) spans: at most
    ``coordinates``, and at most ``values`` values in all, so that a chunk's memory does not
    grow with the rows (at least one coordinate)."""
    return max(1, min(coordinates, values // max(1, rows)))
