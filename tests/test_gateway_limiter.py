"""The gateway's adaptive concurrency limiter (AIMD): its bounds, one decrease per congestion
event, real concurrency under threads and coroutines, pauses after a throttle, one limiter per
endpoint."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time

from agents.ratelimit import AdaptiveLimiter, limiter_for


# ── the limiter ────────────────────────────────────────────────────────────────────────────
def test_limiter_aimd_stays_within_bounds():
    lim = AdaptiveLimiter(initial=4, minimum=2, maximum=6, increase=1.0, decrease=0.5)
    for _ in range(5):
        lim.on_throttle()
    assert lim.limit == 2  # never below minimum
    for _ in range(3):
        lim.on_success()
    assert 3 <= lim.limit < 4  # +1/limit per success: about +1 per window
    for _ in range(200):
        lim.on_success()
    assert lim.limit == 6  # never above maximum
    limits = [limit for _, limit in lim.history]
    assert min(limits) == 2 and max(limits) == 6 and limits[-1] == 6


def test_one_congestion_event_decreases_once():
    lim = AdaptiveLimiter(initial=16)
    inside, go = threading.Barrier(4), threading.Event()

    def worker():
        with lim.slot():
            inside.wait()
            go.wait()
        lim.on_throttle()  # all four were in flight before the first decrease

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    go.set()
    for t in threads:
        t.join()
    assert lim.limit == 8
    with lim.slot():
        pass
    lim.on_throttle()  # a call started after the decrease: a new event
    assert lim.limit == 4


def test_limiter_bounds_real_concurrency():
    lim = AdaptiveLimiter(initial=3, maximum=3)
    active, peak, lock = [0], [0], threading.Lock()

    def worker():
        with lim.slot():
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            time.sleep(0.01)
            with lock:
                active[0] -= 1
        lim.on_success()

    threads = [threading.Thread(target=worker) for _ in range(15)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 3 and lim.in_flight == 0


def test_throttle_pauses_new_slots():
    lim = AdaptiveLimiter(initial=4)
    lim.on_throttle(retry_after=0.1)
    started = time.monotonic()
    with lim.slot():
        waited = time.monotonic() - started
    assert 0.08 <= waited < 1.0 and lim.limit == 2


def test_limiter_for_is_shared_per_endpoint():
    a = limiter_for("http://shared.test/v1", initial=5, maximum=10)
    assert limiter_for("http://shared.test/v1") is a and a.limit == 5
    assert limiter_for("http://other.test/v1") is not a
    assert AdaptiveLimiter(initial=8, maximum=4).limit == 4  # initial clamped


def test_async_slots_share_the_bound_with_threads_without_blocking_the_loop():
    lim = AdaptiveLimiter(initial=3, maximum=3)
    active, peak, lock, ticks = [0], [0], threading.Lock(), []

    def hold(seconds: float) -> None:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(seconds)
        with lock:
            active[0] -= 1

    def thread_worker():
        with lim.slot():
            hold(0.01)

    async def coroutine_worker():
        async with lim.aslot():
            hold(0.001)
            await asyncio.sleep(0.01)

    async def ticker():  # runs all along: waiting for a slot never blocks the loop
        for _ in range(10):
            ticks.append(time.monotonic())
            await asyncio.sleep(0.005)

    async def main():
        await asyncio.gather(ticker(), *(coroutine_worker() for _ in range(20)))

    threads = [threading.Thread(target=thread_worker) for _ in range(6)]
    for t in threads:
        t.start()
    asyncio.run(main())
    for t in threads:
        t.join()
    assert peak[0] <= 3 and lim.in_flight == 0
    assert len(ticks) == 10 and max(b - a for a, b in itertools.pairwise(ticks)) < 0.1


def test_async_throttle_pauses_slots_and_one_event_decreases_once():
    lim = AdaptiveLimiter(initial=16)

    async def worker(inside: asyncio.Barrier):
        async with lim.aslot():
            await inside.wait()
        lim.on_throttle()  # all four tasks were in flight before the first decrease

    async def main():
        inside = asyncio.Barrier(4)
        await asyncio.gather(*(worker(inside) for _ in range(4)))
        assert lim.limit == 8
        lim.on_throttle(retry_after=0.1)  # not from a slot of this task: a new event
        started = time.monotonic()
        async with lim.aslot():
            return time.monotonic() - started

    waited = asyncio.run(main())
    assert 0.08 <= waited < 1.0 and lim.limit == 4 and lim.in_flight == 0
