"""The local server's own request rate: `GET /v1/batches/{id}` and 1 MB `files.create`, this tree against
an earlier commit, side by side in one run.

    .venv/bin/python bench/http_server.py --before <git ref>   # writes bench/results/http_server.md

Each variant is `batch-api serve` (built-in mock upstream, one client API key) in its own process; the
earlier commit runs from a temporary `git worktree` with the same virtualenv. The load comes from one
aiohttp session in this process with C keep-alive connections. Variants alternate within every round;
medians are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
from _common import RESULTS, ROOT, machine
from tests.support.server import ServerProcess

API_KEY = "sk-bench"
MIB = 1024 * 1024


@contextmanager
def source_tree(ref: str | None) -> Iterator[Path]:
    """This tree, or `ref` checked out in a temporary worktree."""
    if ref is None:
        yield ROOT
        return
    where = Path(tempfile.mkdtemp(prefix="bench-before-"))
    subprocess.run(["git", "worktree", "add", "--detach", str(where), ref], cwd=ROOT, check=True)
    try:
        yield where
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(where)], cwd=ROOT, check=False)
        shutil.rmtree(where, ignore_errors=True)


def start(tree: Path, data_dir: Path) -> ServerProcess:
    env = {"PYTHONPATH": str(tree / "functions"), "BATCH_API_LOG_LEVEL": "WARNING"}
    return ServerProcess(data_dir, "--api-key", API_KEY, env=env).start()


def a_batch(server: ServerProcess) -> str:
    client = server.client(api_key=API_KEY)
    line = {
        "custom_id": "r0",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
    }
    data = (json.dumps(line) + "\n").encode()
    input_file = client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    batch = client.batches.create(
        input_file_id=input_file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    return batch.id


async def rate(make_request: Callable[[aiohttp.ClientSession], object], n: int, concurrency: int) -> float:
    """Requests per second for `n` requests, `concurrency` at a time over keep-alive connections."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        remaining = iter(range(n))

        async def worker() -> None:
            for _ in remaining:
                await make_request(session)  # type: ignore[misc]

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return n / (time.perf_counter() - started)


def get_batch(base_url: str, batch_id: str) -> Callable[[aiohttp.ClientSession], object]:
    async def one(session: aiohttp.ClientSession) -> None:
        async with session.get(f"{base_url}/batches/{batch_id}") as response:
            await response.read()
            assert response.status == 200, response.status

    return one


def create_file(base_url: str, payload: bytes) -> Callable[[aiohttp.ClientSession], object]:
    async def one(session: aiohttp.ClientSession) -> None:
        form = aiohttp.FormData()
        form.add_field("purpose", "user_data")
        form.add_field("file", payload, filename="blob.bin", content_type="application/octet-stream")
        async with session.post(f"{base_url}/files", data=form) as response:
            await response.read()
            assert response.status == 200, (response.status, await response.text())

    return one


def measure(tree: Path, args: argparse.Namespace) -> tuple[float, float]:
    data_dir = Path(tempfile.mkdtemp(prefix="bench-http-"))
    server = start(tree, data_dir / "data")
    try:
        batch_id = a_batch(server)
        gets = asyncio.run(rate(get_batch(server.base_url, batch_id), args.get_requests, args.concurrency))
        payload = os.urandom(MIB)
        uploads = asyncio.run(
            rate(create_file(server.base_url, payload), args.upload_requests, args.upload_concurrency)
        )
        return gets, uploads
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--before", required=True, help="git ref of the earlier server")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--get-requests", type=int, default=3000)
    parser.add_argument("--upload-requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--upload-concurrency", type=int, default=1)
    parser.add_argument("--output", type=Path, default=RESULTS / "http_server.md")
    args = parser.parse_args()

    results: dict[str, list[tuple[float, float]]] = {"before": [], "after": []}
    with source_tree(args.before) as before_tree:
        trees = {"before": before_tree, "after": ROOT}
        for round_no in range(args.rounds):
            for name, tree in trees.items():
                gets, uploads = measure(tree, args)
                results[name].append((gets, uploads))
                print(f"round {round_no + 1} {name}: GET {gets:,.0f}/s, 1 MB files.create {uploads:,.1f}/s")

    before_commit = subprocess.run(
        ["git", "rev-parse", "--short", args.before], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()

    def row(label: str, index: int, fmt: str) -> str:
        before = [r[index] for r in results["before"]]
        after = [r[index] for r in results["after"]]
        median_before, median_after = statistics.median(before), statistics.median(after)
        return (
            f"| {label} | {median_before:{fmt}} ({', '.join(f'{v:{fmt}}' for v in before)}) "
            f"| {median_after:{fmt}} ({', '.join(f'{v:{fmt}}' for v in after)}) "
            f"| {median_after / median_before:.2f} |"
        )

    report = "\n".join(
        [
            "# Local server request rate: before and after",
            "",
            f"Machine: {machine()}",
            f"Command: `.venv/bin/python bench/http_server.py --before {args.before} --rounds {args.rounds} "
            f"--get-requests {args.get_requests} --upload-requests {args.upload_requests} "
            f"--concurrency {args.concurrency} --upload-concurrency {args.upload_concurrency}`",
            "",
            f"Before: commit {before_commit}. After: this commit. `batch-api serve` with one client API key and",
            "the built-in mock; load from one aiohttp session in the benchmark process (same 2 cores).",
            "Requests per second, median of the rounds (each round's value in brackets); variants alternate.",
            "",
            "| request | before | after | after / before |",
            "|---|---|---|---|",
            row(f"`GET /v1/batches/{{id}}`, {args.concurrency} connections", 0, ",.0f"),
            row(f"1 MB `files.create`, {args.upload_concurrency} connections", 1, ",.1f"),
            "",
        ]
    )
    args.output.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
