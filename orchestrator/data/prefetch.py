"""Micro-batches built ahead of the training loop, in a background thread.

A sample of the whole-run index is a handful of random reads (the blend, the
sample index, the document order, the shard's index, its tokens): cheap once
the pages are cached, a few milliseconds each when they come from a shared
filesystem. The positions a rank will read are known in advance, so one
daemon thread builds the next ``depth`` micro-batches while the step runs;
the loop then takes finished ones. The thread calls the same function the
loop would, so the batches are the same; a jump (a resume, a rollback, the
validation set starting over) drops what was built ahead and starts again
from the new position.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Prefetcher(Generic[T]):
    """``get(p)`` returns ``build(p)``, having built ``p + 1 .. p + depth`` ahead."""

    def __init__(self, build: Callable[[int], T], *, depth: int) -> None:
        self.build = build
        self.depth = depth
        self._cond = threading.Condition()
        self._todo: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
        self._done: dict[int, T | BaseException] = {}
        self._scheduled: set[int] = set()
        self._generation = 0
        self._cursor: int | None = None
        self._thread: threading.Thread | None = None

    def get(self, position: int) -> T:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="data-prefetch", daemon=True)
                self._thread.start()
            if position != self._cursor:  # a jump: what was built ahead is of no use
                self._generation += 1
                self._done.clear()
                self._scheduled.clear()
            for p in range(position, position + self.depth + 1):
                if p not in self._scheduled:
                    self._scheduled.add(p)
                    self._todo.put((self._generation, p))
            while position not in self._done:
                self._cond.wait()
            result = self._done.pop(position)
            self._scheduled.discard(position)
            self._cursor = position + 1
        if isinstance(result, BaseException):
            raise result
        return result

    def _run(self) -> None:
        while True:
            generation, position = self._todo.get()
            if generation != self._generation:
                continue  # scheduled before a jump
            try:
                result: T | BaseException = self.build(position)
            except BaseException as e:  # handed to the loop, which raises it
                result = e
            with self._cond:
                if generation == self._generation:
                    self._done[position] = result
                    self._cond.notify_all()
