"""Event loops kept across chunks (`upstreams.loops`): the next chunk's client reuses the connections
of the last one, a fresh loop's client keeps nothing, and the local runner closes what it kept."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from batch_api.upstreams import loops
from batch_api.upstreams.openai_http import OpenAIHttpUpstream
from batch_api.workflow.runner_local import LocalWorkflow
from tests.support.fake_upstream import FakeUpstreamServer
from tests.unit.builders import PROJECT, add_batch, get_batch, jsonl, make_deps, request
from tests.unit.fakes_upstream import FakeUpstream

pytestmark = pytest.mark.unit

BODY = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'


async def one_chunk(base_url: str, sessions: list[Any]) -> None:
    """What a chunk does with its client: two requests at once on two connections, then close it."""
    client = OpenAIHttpUpstream(base_url, max_connections=2, max_retries=0)
    answers = await asyncio.gather(*(client.send("/v1/chat/completions", BODY) for _ in range(2)))
    assert [a.status_code for a in answers] == [200, 200]
    sessions.append(client._session)
    await client.aclose()


def test_on_a_kept_loop_the_next_chunk_reuses_the_connections_of_the_last() -> None:
    sessions: list[Any] = []
    with FakeUpstreamServer() as fake:
        runner = loops.keep_loop()
        loop = runner.get_loop()
        try:
            assert loops.keep_loop() is runner  # one per thread
            loops.run(one_chunk(fake.base_url, sessions))
            loops.run(one_chunk(fake.base_url, sessions))
            first, second = sessions
            assert first is second and not first.closed  # the chunk's close left it to the loop
            ports = [r.peer_port for r in fake.requests]
            assert len(ports) == 4 and len(set(ports)) == 2  # the second chunk opened no connection
        finally:
            loops.close_loop(runner)
    assert first.closed and loop.is_closed()
    assert loop not in loops._sessions
    assert loops.keep_loop() is not runner  # the thread keeps none after the close: a new one
    loops.close_loop(loops.keep_loop())


def test_on_a_fresh_loop_each_chunk_opens_and_closes_its_own_connections() -> None:
    sessions: list[Any] = []
    with FakeUpstreamServer() as fake:
        loops.run(one_chunk(fake.base_url, sessions))
        loops.run(one_chunk(fake.base_url, sessions))
        ports = [r.peer_port for r in fake.requests]
    first, second = sessions
    assert first is not second and first.closed and second.closed
    assert len(set(ports)) == 4


def test_the_local_runner_runs_every_chunk_on_one_kept_loop_and_closes_it_when_idle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kept: list[asyncio.AbstractEventLoop] = []
    real_keep = loops.keep_loop

    def recording_keep() -> asyncio.Runner:
        runner = real_keep()
        kept.append(runner.get_loop())
        return runner

    monkeypatch.setattr(loops, "keep_loop", recording_keep)
    from batch_api.workflow import process

    real_process = process.process_chunk_async
    entered: set[str] = set()
    both_running = threading.Event()

    async def together(event: Any, step_deps: Any, **options: Any) -> Any:
        """Chunks wait until both batches are processing, so the two run at the same time."""
        entered.add(event.batch_id)
        if len(entered) == 2:
            both_running.set()
        await asyncio.to_thread(both_running.wait, 10)
        return await real_process(event, step_deps, **options)

    monkeypatch.setattr(process, "process_chunk_async", together)
    used: set[int] = set()
    upstream = FakeUpstream(on_call=lambda _n, _body: used.add(id(asyncio.get_running_loop())))
    deps = make_deps(upstream, chunk_max_lines=1, chunk_concurrency=2)
    add_batch(deps, jsonl([request(f"r{i}") for i in range(6)]))
    add_batch(deps, jsonl([request(f"s{i}") for i in range(6)]), batch_id="batch_other", file_id="file-other")
    workflow = LocalWorkflow(step_backoff_seconds=0)
    workflow.bind(deps)
    deps.workflow = workflow

    workflow.start(PROJECT, "batch_test")
    workflow.start(PROJECT, "batch_other")
    assert workflow.wait_idle(30)

    assert get_batch(deps).status == get_batch(deps, "batch_other").status == "completed"
    assert len(upstream.calls) == 12
    assert both_running.is_set()
    assert used == {id(kept[0])}  # twelve chunks of two batches at once, on one kept loop
    deadline = time.monotonic() + 10  # the last batch's release ends the loop on its own thread
    while not all(loop.is_closed() for loop in kept) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(loop.is_closed() for loop in kept)
    assert all(loop not in loops._sessions for loop in kept)
    assert not [t for t in threading.enumerate() if t.name == "chunks"]  # and its thread with it

    add_batch(deps, jsonl([request("t")]), batch_id="batch_third", file_id="file-third")
    workflow.start(PROJECT, "batch_third")
    assert workflow.wait_idle(30)
    assert get_batch(deps, "batch_third").status == "completed"
    assert len(kept) >= 2 and kept[-1] is not kept[0]  # busy again: a new loop


def test_chunks_running_together_share_the_session_with_a_connection_for_each_request() -> None:
    from dataclasses import replace

    from batch_api.upstreams import make_upstream_factory

    with FakeUpstreamServer(latency_seconds=0.2) as fake:
        deps = make_deps(chunk_max_lines=4, chunk_concurrency=2, requests_per_chunk=4)
        settings = deps.settings.model_copy(update={"upstream_url": fake.base_url, "upstream": "http"})
        deps = replace(deps, settings=settings, upstream_factory=make_upstream_factory(settings))
        add_batch(deps, jsonl([request(f"r{i}") for i in range(8)]))
        workflow = LocalWorkflow(step_backoff_seconds=0)
        workflow.bind(deps)
        deps.workflow = workflow

        workflow.start(PROJECT, "batch_test")
        assert workflow.wait_idle(30)

        assert get_batch(deps).status == "completed"
        ports = [r.peer_port for r in fake.requests]
    # two chunks of four at once: eight requests on the wire together, so eight connections (a session
    # limited to one chunk's four would send the second four after the first)
    assert len(ports) == 8 and len(set(ports)) == 8
