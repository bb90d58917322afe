"""The batcher and the model turns as plain Python: asyncio and threads, no Ray."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from serving.batcher import Batcher, ModelTurns


class SlowModel:
    """score(items) takes `seconds`, records each call's items, and fails on the item 'boom'."""

    def __init__(self, seconds: float):
        self.seconds, self.calls = seconds, []

    def __call__(self, items: list) -> list:
        self.calls.append(list(items))
        time.sleep(self.seconds)
        if "boom" in items:
            raise RuntimeError("a bug in the scorer")
        return [f"scored {x}" for x in items]


def run(coro):
    return asyncio.run(coro)


def test_lone_request_starts_at_once_and_arrivals_join_the_next_call():
    model = SlowModel(0.2)

    async def main():
        b = Batcher(model, max_batch_size=3, executor=ThreadPoolExecutor(1))
        t0 = time.perf_counter()
        first = b.add(["a"])
        await asyncio.sleep(0.05)  # the model is busy with "a" now
        later = [b.add([x]) for x in "bcdef"]  # arrive one by one while it computes
        results = await asyncio.gather(*first, *(f for fs in later for f in fs))
        return results, time.perf_counter() - t0, b.batch_sizes

    results, wall, sizes = run(main())
    assert results == [f"scored {x}" for x in "abcdef"]
    # "a" alone, then the five that waited in calls of at most max_batch_size: 3 calls, not 6
    assert model.calls == [["a"], ["b", "c", "d"], ["e", "f"]]
    assert dict(sizes) == {1: 1, 3: 1, 2: 1}
    assert wall < 6 * 0.2


def test_cancelled_requests_are_dropped_and_a_failing_call_fails_only_its_items():
    model = SlowModel(0.1)

    async def main():
        b = Batcher(model, max_batch_size=8, executor=ThreadPoolExecutor(1))
        busy = b.add(["a"])
        await asyncio.sleep(0.02)
        gone = b.add(["gone"])
        gone[0].cancel()  # the client went away before its batch was taken
        bad = b.add(["boom", "x"])
        with pytest.raises(RuntimeError, match="a bug"):
            await bad[0]
        with pytest.raises(RuntimeError):
            await bad[1]
        after = b.add(["y"])  # the runner keeps serving
        return await busy[0], await after[0]

    assert run(main()) == ("scored a", "scored y")
    assert ["gone"] not in model.calls and all("gone" not in c for c in model.calls)
    assert ["boom", "x"] in model.calls


def test_scoring_waits_for_one_generation_step_not_the_whole_generation():
    turns = ModelTurns()
    holders, overlap, log = [0], [], []
    lock = threading.Lock()

    def hold(who: str, seconds: float) -> None:
        with lock:
            holders[0] += 1
            overlap.append(holders[0])
        log.append(who)
        time.sleep(seconds)
        with lock:
            holders[0] -= 1

    def generation() -> None:
        with turns.generation():
            for _ in turns.steps(range(20)):
                hold("step", 0.05)  # 20 steps: 1 s in all

    gen = threading.Thread(target=generation)
    gen.start()
    time.sleep(0.2)  # a few steps in
    t0 = time.perf_counter()
    with turns.scoring():
        waited = time.perf_counter() - t0
        hold("score", 0.1)
    gen.join()
    assert waited < 0.4, waited  # about the step in progress (0.05 s), not the rest (0.8 s)
    assert max(overlap) == 1  # never two on the model at once
    assert log.count("step") == 20 and 2 <= log.index("score") < 19


def test_generation_waits_while_scoring_runs_or_waits():
    turns = ModelTurns()
    order = []

    def score(name: str, seconds: float) -> None:
        with turns.scoring():
            order.append(name)
            time.sleep(seconds)

    first = threading.Thread(target=score, args=("score-1", 0.2))
    first.start()
    time.sleep(0.05)
    second = threading.Thread(target=score, args=("score-2", 0.05))

    def generation() -> None:
        with turns.generation():
            order.append("gen")

    gen = threading.Thread(target=generation)
    second.start()
    time.sleep(0.02)
    gen.start()
    for t in (first, second, gen):
        t.join(5)
    assert order == ["score-1", "score-2", "gen"]
