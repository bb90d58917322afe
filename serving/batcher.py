"""Batching and turns on one model, as plain Python (asyncio + threads): no Ray needed to test.

Batching happens in two steps. A collector (Serve's `@serve.batch` in the deployment) gathers
concurrent requests and hands them to `Batcher.add`, which queues them and returns at once with
one future per request. A single runner task scores everything queued so far, up to
`max_batch_size` items, in one call on the model thread. Requests that arrive while the model is
busy therefore join the next call instead of queueing as many small batches behind it, and a lone
request starts at once: batching costs nothing at concurrency 1 and fills batches under load.
The collector never holds its batch slot while the model runs.

`ModelTurns` shares one model between scoring and generation: scoring has priority, and a
generation gives the model up between two denoising steps whenever a scoring batch is waiting,
so a long generation delays a classification by at most one step.
"""

import asyncio
import logging
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager

log = logging.getLogger("ray.serve")  # Serve's logger in a replica; never request payloads


class Batcher:
    """Queue items; one runner scores up to `max_batch_size` of them per `score(items)` call,
    run on `executor`. `score` returns one result (or Exception) per item, in order."""

    def __init__(
        self, score: Callable[[list], list], max_batch_size: int, executor: Executor
    ) -> None:
        self.score, self.max_batch_size, self.executor = score, max_batch_size, executor
        self.pending: deque[tuple[object, asyncio.Future]] = deque()  # queued, not yet scored
        self.wake: asyncio.Event | None = None
        self.runner: asyncio.Task | None = None
        self.batch_sizes: Counter = Counter()  # items per score call

    def add(self, items: list) -> list[asyncio.Future]:
        """Queue items (from the running event loop): a future per item, resolved once scored."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        self.pending.extend(zip(items, futures, strict=True))
        if self.wake is None:
            self.wake = asyncio.Event()
        self.wake.set()
        if self.runner is None or self.runner.done():
            self.runner = loop.create_task(self._run())
        return futures

    def _take(self) -> list[tuple[object, asyncio.Future]]:
        take = []
        while self.pending and len(take) < self.max_batch_size:
            item, fut = self.pending.popleft()
            if not fut.done():  # a cancelled request (client gone) is dropped here
                take.append((item, fut))
        if not self.pending:
            self.wake.clear()
        return take

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.wake.wait()
            take = self._take()
            if not take:
                continue
            self.batch_sizes[len(take)] += 1
            try:
                results = await loop.run_in_executor(
                    self.executor, self.score, [i for i, _ in take]
                )
            except Exception as e:  # a bug: fail these requests (500), keep serving the others
                log.exception("scoring a batch failed")
                results = [e] * len(take)
            for (_, fut), r in zip(take, results, strict=True):
                if fut.done():
                    continue
                if isinstance(r, Exception):
                    fut.set_exception(r)
                else:
                    fut.set_result(r)


class ModelTurns:
    """Whose turn it is on the model. Scoring waits only for the step in progress; generation
    waits while any scoring is running or waiting (threads: the model runs off the event loop)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy = False
        self._scoring_waiting = 0

    @contextmanager
    def scoring(self) -> Iterator[None]:
        with self._cond:
            self._scoring_waiting += 1
            while self._busy:
                self._cond.wait()
            self._scoring_waiting -= 1
            self._busy = True
        try:
            yield
        finally:
            self._release()

    @contextmanager
    def generation(self) -> Iterator[None]:
        self._acquire_after_scoring()
        try:
            yield
        finally:
            self._release()

    def steps(self, steps: Iterable) -> Iterator:
        """Generation's step loop (inside `generation()`): between two steps, scoring goes first."""
        for step in steps:
            yield step
            with self._cond:
                if not self._scoring_waiting:
                    continue
                self._busy = False
                self._cond.notify_all()
            self._acquire_after_scoring()

    def _acquire_after_scoring(self) -> None:
        with self._cond:
            while self._busy or self._scoring_waiting:
                self._cond.wait()
            self._busy = True

    def _release(self) -> None:
        with self._cond:
            self._busy = False
            self._cond.notify_all()
