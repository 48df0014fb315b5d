"""The upstream capacity gate: a global ceiling, fair turns between batches, AIMD on push back."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from batch_api.upstreams.capacity import (
    DECREASE,
    INITIAL_LIMIT,
    PROBE,
    CapacityGate,
    RateLimit,
    answer_tokens,
    estimate_tokens,
)

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def full_gate(limit: int, clock: Clock | None = None) -> CapacityGate:
    """A gate past slow start, at its full `limit`."""
    gate = CapacityGate("up", limit, clock=clock or Clock())
    gate.limit = float(limit)
    return gate


async def _hold(gate: CapacityGate, batch_id: str, order: list[str], release: asyncio.Event) -> None:
    admitted = await gate.acquire(batch_id)
    order.append(batch_id)
    await release.wait()
    gate.release(admitted, 200)


def test_slow_start_begins_low_and_never_passes_the_configured_ceiling() -> None:
    assert CapacityGate("up", 1000).limit == INITIAL_LIMIT
    assert CapacityGate("up", 3).limit == 3
    gate = CapacityGate("up", 10, clock=Clock())
    for _ in range(50):
        gate.in_flight += 1
        gate.release(gate.clock(), 200)
    assert gate.limit == 10
    with pytest.raises(ValueError, match="at least 1"):
        CapacityGate("up", 0)


def test_slow_start_adds_one_per_answer_until_the_first_push_back() -> None:
    clock = Clock()
    gate = CapacityGate("up", 100, clock=clock)
    gate.in_flight = 1
    gate.release(clock(), 200)
    assert gate.limit == INITIAL_LIMIT + 1  # slow start: +1 per answer, so doubling per round trip
    gate.in_flight = 9
    gate.release(clock(), 429)
    assert gate.limit == pytest.approx(9 * DECREASE)  # cut from what was in flight
    cut = gate.limit
    gate.in_flight = 1
    clock.now += 1
    gate.release(clock(), 200)
    assert gate.limit == pytest.approx(cut + PROBE / cut)  # 8.1 is within one of 9: probing slowly


def test_one_burst_of_push_back_cuts_once() -> None:
    clock = Clock()
    gate = full_gate(40, clock)
    before = clock()
    clock.now += 1
    gate.in_flight = 3
    gate.release(before, 429)
    gate.release(before, 503)  # admitted before the cut: the same congestion
    assert gate.limit == pytest.approx(3 * DECREASE)
    assert gate.throttled == 2
    clock.now += 1
    gate.in_flight = 2
    gate.release(clock(), 429)  # admitted after the cut: cuts again
    assert gate.limit == pytest.approx(max(1.0, min(3 * DECREASE, 2) * DECREASE))


def test_the_limit_never_drops_below_one_and_server_errors_do_not_grow_it() -> None:
    clock = Clock()
    gate = full_gate(4, clock)
    for _ in range(30):
        clock.now += 1
        gate.in_flight = 1
        gate.release(clock(), 429)
    assert gate.limit == 1.0
    gate.in_flight = 2
    gate.release(clock(), 500)
    gate.release(clock(), None)  # no answer at all
    assert gate.limit == 1.0 and gate.in_flight == 0


def test_answered_attempts_add_their_latency_and_unanswered_ones_do_not() -> None:
    clock = Clock()
    gate = full_gate(4, clock)
    gate.in_flight = 4
    admitted = clock()
    clock.now += 0.25
    gate.release(admitted, 200)
    clock.now += 0.5
    gate.release(admitted, 429)  # a push back is an answer too
    gate.release(admitted, None)  # no answer (a timeout): no latency to report
    stats = gate.stats()
    assert (stats.answered, stats.answer_seconds) == (2, pytest.approx(0.25 + 0.75))
    assert stats.in_flight == 1


def test_never_more_than_the_limit_in_flight_and_every_slot_comes_back() -> None:
    gate = full_gate(3)
    peak = 0
    lock = threading.Lock()

    async def one(batch_id: str) -> None:
        nonlocal peak
        admitted = await gate.acquire(batch_id)
        with lock:
            peak = max(peak, gate.in_flight)
        await asyncio.sleep(0.001)
        gate.release(admitted, 200)

    async def many(batch_id: str) -> None:
        await asyncio.gather(*(one(batch_id) for _ in range(60)))

    threads = [threading.Thread(target=asyncio.run, args=(many(f"batch_{i}"),)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert peak == 3
    stats = gate.stats()
    assert (stats.in_flight, stats.waiting, stats.waiting_batches, stats.admitted) == (0, 0, 0, 180)


def test_a_waiter_on_another_threads_loop_is_woken_by_a_release_from_this_thread() -> None:
    gate = full_gate(1)
    admitted = asyncio.run(gate.acquire("a"))  # the one slot, taken
    woken: list[float] = []
    thread = threading.Thread(target=lambda: woken.append(asyncio.run(gate.acquire("b"))), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while gate.stats().waiting == 0 and time.monotonic() < deadline:
        time.sleep(0.001)  # until the other loop waits (and sleeps in its selector)
    assert gate.stats().waiting == 1

    gate.release(admitted, 200)  # no loop runs here: the other loop must be woken from outside

    thread.join(10)
    assert not thread.is_alive() and len(woken) == 1
    assert gate.stats().in_flight == 1


def test_batches_take_turns_so_a_small_one_is_not_stuck_behind_a_big_one() -> None:
    async def scenario() -> list[str]:
        gate = full_gate(2)
        order: list[str] = []
        release = asyncio.Event()
        tasks = [asyncio.create_task(_hold(gate, "big", order, release)) for _ in range(20)]
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(_hold(gate, "small", order, release)) for _ in range(2)]
        await asyncio.sleep(0)
        assert order == ["big", "big"]  # the first two took the slots
        release.set()
        await asyncio.gather(*tasks)
        return order

    order = asyncio.run(scenario())
    # after the first two, turns alternate while both wait: the small batch is done within 4 grants
    assert order[2:6] == ["big", "small", "big", "small"]
    assert order.count("big") == 20 and order.count("small") == 2


def test_a_cancelled_waiter_leaves_the_queue_and_leaks_no_slot() -> None:
    async def scenario() -> Any:
        gate = full_gate(1)
        first = await gate.acquire("a")
        waiter = asyncio.create_task(gate.acquire("b"))
        await asyncio.sleep(0)
        assert gate.stats().waiting == 1
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert gate.stats().waiting == 0 and gate.stats().waiting_batches == 0
        gate.release(first, 200)
        again = await asyncio.wait_for(gate.acquire("c"), 1)
        gate.release(again, 200)
        return gate.stats()

    stats = asyncio.run(scenario())
    assert stats.in_flight == 0


def test_a_waiter_cancelled_after_its_grant_gives_the_slot_back() -> None:
    async def scenario() -> Any:
        gate = full_gate(1)
        first = await gate.acquire("a")
        waiter = asyncio.create_task(gate.acquire("b"))
        await asyncio.sleep(0)
        gate.release(first, 200)  # hands the slot to b; b has not run yet
        assert gate.in_flight == 1
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        return gate.stats()

    assert asyncio.run(scenario()).in_flight == 0


def test_retry_after_holds_new_attempts_back() -> None:
    clock = Clock()
    gate = full_gate(5, clock)
    slept: list[float] = []

    async def scenario() -> None:
        admitted = await gate.acquire("a")
        gate.release(admitted, 429, {"retry-after": "7"})
        real_sleep = asyncio.sleep

        async def fake_sleep(seconds: float) -> None:
            slept.append(seconds)
            await real_sleep(0)

        asyncio.sleep = fake_sleep  # type: ignore[assignment]
        try:
            second = await gate.acquire("a")
        finally:
            asyncio.sleep = real_sleep  # type: ignore[assignment]
        gate.release(second, 200)

    asyncio.run(scenario())
    assert slept == [7.0]
    clock.now += 8
    assert asyncio.run(_no_wait(gate)) == 0


async def _no_wait(gate: CapacityGate) -> int:
    admitted = await gate.acquire("a")
    gate.release(admitted, 200)
    return gate.in_flight


def test_near_the_level_pushed_back_last_the_limit_grows_slowly() -> None:
    clock = Clock()
    gate = full_gate(100, clock)
    gate.in_flight = 20
    gate.release(clock(), 429)  # pushed back with 20 in flight: the limit drops to 18
    assert gate.limit == pytest.approx(20 * DECREASE)
    clock.now += 1
    gate.in_flight = 1
    gate.release(clock(), 200)  # 18 < 20 - 1: a full step
    assert gate.limit == pytest.approx(18 + 1 / 18)
    gate.limit = 19.0  # within one of 20: probing
    gate.in_flight = 1
    gate.release(clock(), 200)
    assert gate.limit == pytest.approx(19 + PROBE / 19)


# ---------------------------------------------------------------- per-minute rates


def test_a_rate_lets_a_second_worth_through_then_paces() -> None:
    clock = Clock()
    rate = RateLimit(60, clock)  # one a second
    assert [rate.reserve(1) for _ in range(2)] == [0.0, 1.0]  # the first second's worth at once
    assert rate.reserve(1) == pytest.approx(2.0)
    clock.now += 10  # idle time does not bank more than the burst
    assert rate.reserve(1) == 0.0 and rate.reserve(1) == pytest.approx(1.0)
    rate.adjust(-2)  # two fewer used than reserved
    assert rate.reserve(1) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        RateLimit(0)


def test_a_share_of_the_rates_paces_this_process_to_its_part(tmp_path: Any) -> None:
    """On AWS a worker holding a quarter of an upstream's slots may use a quarter of its rates."""
    clock = Clock()
    gate = CapacityGate("up", 64, clock=clock, requests_per_minute=120, tokens_per_minute=6000)
    gate.share_rates(0.25)  # 30 requests (one per 2 s) and 1,500 tokens a minute
    assert gate._requests is not None and gate._tokens is not None
    # one every 2 s (a second's burst is half a request): 1 s, 3 s, 5 s from now
    assert [gate._requests.reserve(1) for _ in range(3)] == [pytest.approx(t) for t in (1.0, 3.0, 5.0)]
    assert gate._tokens.interval == pytest.approx(60 / 1500)
    gate.share_rates(1.0)
    assert gate._requests.interval == pytest.approx(0.5)
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="share"):
            gate.share_rates(bad)
    CapacityGate("plain", 4).share_rates(0.5)  # no rates: nothing to share


def test_a_client_made_with_a_rate_share_sets_its_upstreams_gate(tmp_path: Any) -> None:
    from batch_api.config import Settings
    from batch_api.upstreams.routing import UpstreamPool, UpstreamSpec

    spec = UpstreamSpec(name="m", kind="mock", requests_per_minute=600, max_in_flight=10)
    pool = UpstreamPool([spec], Settings())
    pool(model="x", batch_id="b", rate_share=0.3)
    rate = pool.gates["m"]._requests
    assert rate is not None and rate.share == 0.3
    pool(model="x", batch_id="b")
    assert rate.share == 1.0


def test_tokens_are_estimated_from_the_request_and_read_from_the_answer() -> None:
    body = b'{"model": "m", "messages": [], "max_tokens": 100}'
    assert estimate_tokens(body) == len(body) // 4 + 100
    assert estimate_tokens(b'{"max_completion_tokens": 7}') == 28 // 4 + 7
    assert estimate_tokens(b'{"max_tokens": true}') == 20 // 4
    assert estimate_tokens(b"not json") == 2
    assert answer_tokens({"usage": {"total_tokens": 42, "prompt_tokens": 1}}) == 42
    assert answer_tokens({"usage": {"input_tokens": 3, "output_tokens": 4}}) == 7
    assert answer_tokens({"usage": "n/a"}) == 0 and answer_tokens(None) == 0


def test_the_gate_paces_requests_and_tokens_per_minute() -> None:
    clock = Clock()
    waits: list[float] = []
    gate = CapacityGate("up", 10, clock=clock, requests_per_minute=600, tokens_per_minute=600)
    assert gate.counts_tokens and not CapacityGate("up", 10).counts_tokens

    async def scenario() -> None:
        await gate.pace(5)  # 10 requests/s and 10 tokens/s, a burst of one second's worth of each
        await gate.pace(5)
        await gate.pace(5)  # 15 tokens: half a second past the burst
        gate.used_tokens(5, 1)  # that request used 1, not 5: 4 tokens come back
        await gate.pace(5)  # tokens at 2.0 s - 0.4 s corrected - 1 s burst

    async def fake_sleep(seconds: float) -> None:
        waits.append(round(seconds, 3))

    original = asyncio.sleep
    asyncio.sleep = fake_sleep  # type: ignore[assignment]
    try:
        asyncio.run(scenario())
    finally:
        asyncio.sleep = original  # type: ignore[assignment]
    assert waits == [0.5, 0.6]  # without the correction the last would wait 1.0
