"""Throughput and CPU of OpenAIHttpUpstream vs a bare aiohttp loop (the "tuned direct client").

Both send the same chat completion request to the mock upstream server (run in its own process,
answering after --latency seconds) with --concurrency requests in flight, --requests in all. Each
client runs --runs times, alternating which goes first; the median requests/s and the median CPU
time of this process per 1,000 requests are reported. At 0 ms latency the CPU column is the cost of
the client itself: the bare aiohttp loop against OpenAIHttpUpstream on its `http1` connection pool,
with retries, deadlines and parsing into UpstreamResponse.

    .venv/bin/python bench/upstream_client.py --output bench/results/upstream_client.md
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import orjson

from batch_api.upstreams.openai_http import OpenAIHttpUpstream

ENDPOINT = "/v1/chat/completions"
BODY = orjson.dumps(
    {
        "model": "mock-chat",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Summarise the plot of Hamlet in two sentences, please."},
        ],
        "max_tokens": 64,
    }
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_mock_server(port: int, latency: float) -> subprocess.Popen[bytes]:
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "batch_api.upstreams.mock_server",
            "--port",
            str(port),
            "--latency",
            str(latency),
        ],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return server
        except OSError:
            if server.poll() is not None:
                raise RuntimeError("the mock server exited at start") from None
            time.sleep(0.05)
    server.terminate()
    raise RuntimeError("the mock server did not start within 15 s")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def drive(send: Callable[[], Awaitable[bool]], requests: int, concurrency: int) -> tuple[float, float]:
    """Send `requests` with `concurrency` workers: requests/s and CPU seconds per 1,000 requests.
    Every answer must be a success."""
    remaining = requests
    failures = 0

    async def worker() -> None:
        nonlocal remaining, failures
        while remaining > 0:
            remaining -= 1
            if not await send():
                failures += 1

    started, cpu = time.perf_counter(), cpu_seconds()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    if failures:
        raise RuntimeError(f"{failures} of {requests} requests failed")
    return requests / elapsed, cpu / requests * 1000


async def run_direct(base_url: str, requests: int, concurrency: int) -> tuple[float, float]:
    """The baseline: one pooled session, a raw POST, read and parse the body. Nothing else."""
    url = base_url + ENDPOINT.removeprefix("/v1")
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def send() -> bool:
            async with session.post(url, data=BODY) as response:
                orjson.loads(await response.read())
                return response.status == 200

        await drive(send, concurrency, concurrency)  # warm the pool
        return await drive(send, requests, concurrency)


async def run_ours(base_url: str, requests: int, concurrency: int) -> tuple[float, float]:
    async with OpenAIHttpUpstream(base_url, "sk-bench", max_connections=concurrency) as client:

        async def send() -> bool:
            return (await client.send(ENDPOINT, BODY)).status_code == 200

        await drive(send, concurrency, concurrency)  # warm the pool
        return await drive(send, requests, concurrency)


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.05, help="mock server answer delay, seconds")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--output", type=Path, help="also write the results as markdown here")
    args = parser.parse_args()

    port = free_port()
    server = start_mock_server(port, args.latency)
    base_url = f"http://127.0.0.1:{port}/v1"
    results: dict[str, list[tuple[float, float]]] = {"direct aiohttp loop": [], "OpenAIHttpUpstream": []}
    clients = {"direct aiohttp loop": run_direct, "OpenAIHttpUpstream": run_ours}
    try:
        for run in range(args.runs):
            order = list(clients) if run % 2 == 0 else list(reversed(clients))
            for name in order:
                rate, cpu = asyncio.run(clients[name](base_url, args.requests, args.concurrency))
                results[name].append((rate, cpu))
                print(f"run {run + 1} {name}: {rate:,.0f} requests/s, {cpu:.3f} CPU s per 1,000", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=10)

    ideal = args.concurrency / args.latency if args.latency > 0 else float("inf")
    direct = statistics.median(rate for rate, _cpu in results["direct aiohttp loop"])
    direct_cpu = statistics.median(cpu for _rate, cpu in results["direct aiohttp loop"])
    lines = [
        "# Upstream client throughput",
        "",
        f"Mock upstream (`batch_api.upstreams.mock_server`, own process) answering after {args.latency * 1000:g} ms; "
        f"{args.concurrency} requests in flight; {args.requests} chat completion requests per run; "
        f"median of {args.runs} runs, clients alternating. Ideal: "
        + (f"{ideal:,.0f} requests/s." if args.latency > 0 else "bound by CPU (no latency)."),
        "",
        "| client | median requests/s | runs | vs direct | CPU s per 1,000 requests | CPU vs direct |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for name, measured in results.items():
        median = statistics.median(rate for rate, _cpu in measured)
        cpu = statistics.median(cpu for _rate, cpu in measured)
        runs = ", ".join(f"{rate:,.0f}" for rate, _cpu in measured)
        lines.append(
            f"| {name} | {median:,.0f} | {runs} | {median / direct:.1%} | {cpu:.3f} | {cpu / direct_cpu:.2f}x |"
        )
    lines += [
        "",
        f"Machine: {os.cpu_count()} CPUs ({cpu_model()}), Python {platform.python_version()}, "
        f"aiohttp {aiohttp.__version__}, {platform.system()} {platform.release()}.",
        f"Recorded {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}, commit {commit()}.",
        "",
        "Repeat with:",
        "",
        "```",
        f".venv/bin/python bench/upstream_client.py --requests {args.requests} --concurrency {args.concurrency} "
        f"--latency {args.latency:g} --runs {args.runs} --output bench/results/upstream_client.md",
        "```",
    ]
    report = "\n".join(lines) + "\n"
    print()
    print(report)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report)


if __name__ == "__main__":
    main()
