"""The pipeline's own cost: a batch vs a tuned direct client sending the same requests at the same
concurrency to the same upstream (the targets: within 15% with an upstream answering at once, within
10% at 50 ms).

    .venv/bin/python bench/pipeline_overhead.py      # writes bench/results/pipeline_overhead.md

Upstream: `batch-api mock-upstream --latency 0.05` in its own process. Direct client: one pooled
aiohttp session with a semaphore of C. Batch: `batch-api serve --upstream-url ...` with
chunk-concurrency x requests-per-chunk = C, timed from batches.create to `completed` (polling every
50 ms). Runs alternate, median of each is reported side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
from _common import RESULTS, machine
from tests.support.server import ServerProcess, free_port


def body(i: int) -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"Say {i}"}]}


async def direct(url: str, n: int, concurrency: int) -> float:
    semaphore = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int) -> None:
            async with semaphore, session.post(f"{url}/chat/completions", json=body(i)) as response:
                await response.read()
                assert response.status == 200

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return time.perf_counter() - started


def batch(server: ServerProcess, n: int) -> float:
    client = server.client()
    data = b"".join(
        json.dumps(
            {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body(i)}
        ).encode()
        + b"\n"
        for i in range(n)
    )
    input_file = client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    started = time.perf_counter()
    created = client.batches.create(
        input_file_id=input_file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    while True:
        current = client.batches.retrieve(created.id)
        if current.status in ("completed", "failed", "expired", "cancelled"):
            break
        time.sleep(0.05)
    elapsed = time.perf_counter() - started
    assert current.status == "completed" and current.request_counts.completed == n, current
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--chunk-concurrency", type=int, default=2)
    parser.add_argument("--requests-per-chunk", type=int, default=32)
    parser.add_argument("--chunk-max-lines", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    concurrency = args.chunk_concurrency * args.requests_per_chunk

    port = free_port()
    upstream = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "batch_api.local.cli",
            "mock-upstream",
            "--port",
            str(port),
            "--latency",
            str(args.latency),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(100):
        try:
            urllib.request.urlopen(f"{url}/models", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    direct_times: list[float] = []
    batch_times: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(
            Path(tmp) / "data",
            "--upstream-url",
            url,
            "--chunk-concurrency",
            str(args.chunk_concurrency),
            "--requests-per-chunk",
            str(args.requests_per_chunk),
            "--chunk-max-lines",
            str(args.chunk_max_lines),
        ).start()
        try:
            for _ in range(args.runs):
                direct_times.append(asyncio.run(direct(url, args.requests, concurrency)))
                batch_times.append(batch(server, args.requests))
        finally:
            server.stop()
            upstream.terminate()
            upstream.wait(10)
    ideal = args.requests / concurrency * args.latency
    d, b = statistics.median(direct_times), statistics.median(batch_times)
    report = f"""# Pipeline overhead: batch vs a tuned direct client

Machine: {machine()}
Command: `.venv/bin/python bench/pipeline_overhead.py --requests {args.requests} --latency {args.latency} \\
  --chunk-concurrency {args.chunk_concurrency} --requests-per-chunk {args.requests_per_chunk} --chunk-max-lines {args.chunk_max_lines} --runs {args.runs}`

{args.requests:,} chat requests, {concurrency} in flight, upstream answers after {args.latency * 1000:.0f} ms
(ideal {ideal:.2f} s). Runs alternate; medians side by side.

| client | median | runs | requests/s |
|---|---|---|---|
| direct (aiohttp, one session, semaphore {concurrency}) | {d:.2f} s | {", ".join(f"{t:.2f}" for t in direct_times)} | {args.requests / d:,.0f} |
| batch (create -> completed, polled every 50 ms) | {b:.2f} s | {", ".join(f"{t:.2f}" for t in batch_times)} | {args.requests / b:,.0f} |

**Ratio batch / direct: {b / d:.3f}** (target <= {1.15 if args.latency == 0 else 1.10:.2f})
"""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pipeline_overhead.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
