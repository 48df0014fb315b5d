"""Upstream capacity shared by workers (`ports.CapacityLeases`): the memory adapter and the DynamoDB
one under moto hold to one contract: never more than the limit, fair shares, dead workers' slots back."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from batch_api.adapters.aws.leases import DynamoCapacityLeases
from batch_api.adapters.memory import MemoryCapacityLeases
from batch_api.ports import Grant
from batch_api.upstreams.leases import LEASE_SECONDS, WAITING_SECONDS
from tests.contract.aws_backend import start_account

pytestmark = pytest.mark.contract


class Clock:
    def __init__(self) -> None:
        self.now = 1_750_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "aws"])
def clock_and_leases(request: pytest.FixtureRequest) -> Iterator[tuple[Clock, Any]]:
    clock = Clock()
    if request.param == "memory":
        yield clock, MemoryCapacityLeases(clock)
        return
    with ExitStack() as stack:
        account = start_account(stack)
        yield clock, DynamoCapacityLeases(account.table(), clock)


def held(leases: Any, upstream: str, clock: Clock) -> int:
    if isinstance(leases, MemoryCapacityLeases):
        return leases.held(upstream)
    _version, live, _waiting = leases._read(upstream, clock())
    return sum(lease.slots for lease in live)


def test_grants_never_pass_the_limit(clock_and_leases: tuple[Clock, Any]) -> None:
    clock, leases = clock_and_leases
    assert leases.acquire("up", "w1", "batch_a", 16, 20).slots == 16
    assert leases.acquire("up", "w2", "batch_a", 16, 20).slots == 4
    assert leases.acquire("up", "w3", "batch_a", 16, 20).slots == 0  # full
    assert held(leases, "up", clock) == 20
    assert leases.acquire("other", "w4", "batch_a", 16, 20).slots == 16  # upstreams are separate


def test_a_second_batch_gets_its_share_and_the_first_no_more(clock_and_leases: tuple[Clock, Any]) -> None:
    _clock, leases = clock_and_leases
    assert leases.acquire("up", "w1", "big", 8, 16).slots == 8
    assert leases.acquire("up", "w2", "big", 8, 16).slots == 8  # alone: the whole limit
    assert leases.acquire("up", "w3", "small", 8, 16).slots == 0  # nothing free: small waits ...
    leases.release("up", "w1")
    assert leases.acquire("up", "w4", "big", 8, 16).slots == 0  # ... so big, over its half, gets none of it
    assert leases.acquire("up", "w3", "small", 8, 16).slots == 8  # and small gets its half


def test_a_grant_says_what_the_upstream_holds_and_how_many_batches_wait(
    clock_and_leases: tuple[Clock, Any],
) -> None:
    clock, leases = clock_and_leases
    assert leases.acquire("up", "w1", "big", 6, 10) == Grant(6, 6, 0)
    assert leases.acquire("up", "w2", "big", 6, 10) == Grant(4, 10, 0)
    assert leases.acquire("up", "w3", "small", 6, 10) == Grant(0, 10, 1)  # the queue: small
    assert leases.acquire("up", "w4", "third", 6, 10) == Grant(0, 10, 2)  # small and third
    assert leases.acquire("up", "w4", "third", 6, 10) == Grant(0, 10, 2)  # asking again: still two
    leases.release("up", "w1")
    assert leases.acquire("up", "w3", "small", 6, 10) == Grant(4, 8, 1)  # a third of 10; third waits on
    clock.now += WAITING_SECONDS + 1  # third stopped asking
    assert leases.acquire("other", "w5", "x", 3, 10) == Grant(3, 3, 0)  # upstreams are separate


def test_a_dead_workers_slots_come_back_after_the_lease_expires(clock_and_leases: tuple[Clock, Any]) -> None:
    clock, leases = clock_and_leases
    assert leases.acquire("up", "dead", "batch_a", 10, 10).slots == 10
    assert leases.acquire("up", "w2", "batch_b", 10, 10).slots == 0
    clock.now += LEASE_SECONDS - 1
    leases.renew("up", "nobody")  # renewing an unknown holder is harmless
    assert leases.acquire("up", "w2", "batch_b", 10, 10).slots == 0
    clock.now += 2  # the dead worker never renewed
    assert leases.acquire("up", "w2", "batch_b", 10, 10).slots == 10


def test_renewing_keeps_a_lease_and_releasing_frees_it(clock_and_leases: tuple[Clock, Any]) -> None:
    clock, leases = clock_and_leases
    assert leases.acquire("up", "w1", "batch_a", 10, 10).slots == 10
    clock.now += LEASE_SECONDS - 1
    leases.renew("up", "w1")
    clock.now += LEASE_SECONDS - 1
    assert leases.acquire("up", "w2", "batch_a", 10, 10).slots == 0  # still held
    leases.release("up", "w1")
    leases.release("up", "w1")  # twice is harmless
    assert leases.acquire("up", "w2", "batch_a", 10, 10).slots == 10


def test_a_waiting_batch_stops_counting_after_a_while(clock_and_leases: tuple[Clock, Any]) -> None:
    clock, leases = clock_and_leases
    assert leases.acquire("up", "w1", "big", 10, 10).slots == 10
    assert leases.acquire("up", "w2", "small", 10, 10).slots == 0  # small waits
    leases.release("up", "w1")
    assert leases.acquire("up", "w3", "big", 10, 10).slots == 5  # half: small still counts
    leases.release("up", "w3")
    clock.now += WAITING_SECONDS + 1
    assert leases.acquire("up", "w4", "big", 10, 10).slots == 10  # small gave up asking: all of it


def test_racing_workers_never_hold_more_than_the_limit(clock_and_leases: tuple[Clock, Any]) -> None:
    clock, leases = clock_and_leases
    granted: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        try:
            slots = leases.acquire("up", f"w{i}", f"batch_{i % 3}", 4, 10).slots
        except BaseException as exc:  # a crashed worker must fail the test, not vanish
            with lock:
                errors.append(exc)
            raise
        with lock:
            granted.append(slots)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(granted) == 12
    assert sum(granted) == held(leases, "up", clock) <= 10
    assert sum(granted) >= 9  # shares of 4 each (ceil(10 / 3)): up to the limit, less rounding
