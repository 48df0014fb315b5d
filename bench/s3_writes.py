"""Streaming a file into S3: the blob store's own multipart upload (`S3BlobStore.write_stream`) against
s3transfer's `upload_fileobj` (what boto3's managed transfer uses), side by side in one run.

    .venv/bin/python bench/s3_writes.py       # writes bench/results/s3_writes.md

Each variant streams the same 200 MB (a generator of 1 MiB pieces, as finalize and complete feed it)
into a bucket of a moto server running in its own process, in a fresh child process of its own so
its peak RSS is its own. Variants alternate; medians are reported. moto answers far faster than S3,
so the times say what each costs in CPU; with S3's latency a concurrent upload gains, a sequential
one does not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import RESULTS, ROOT, machine
from tests.support.server import free_port

MIB = 1024 * 1024

CHILD = r"""
import io, json, sys, time, boto3, psutil
from boto3.s3.transfer import TransferConfig
sys.path.insert(0, sys.argv[4])
from batch_api.adapters.aws.s3 import S3BlobStore

endpoint, variant, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                  aws_access_key_id="x", aws_secret_access_key="x")
piece = bytes(range(256)) * 4096  # 1 MiB

def pieces():
    for _ in range(size // len(piece)):
        yield piece

class Reader(io.RawIOBase):
    # the generator as a file object, the shape upload_fileobj takes
    def __init__(self, chunks):
        self.chunks, self.buffer = iter(chunks), b""
    def readable(self):
        return True
    def readinto(self, target):
        while not self.buffer:
            self.buffer = next(self.chunks, b"")
            if not self.buffer:
                return 0
        n = min(len(target), len(self.buffer))
        target[:n], self.buffer = self.buffer[:n], self.buffer[n:]
        return n

process = psutil.Process()
before = process.memory_info().rss
started = time.perf_counter()
if variant == "blob_store":
    S3BlobStore(s3, "bench").write_stream(f"k-{variant}", pieces())
else:
    concurrency = 10 if variant == "upload_fileobj" else 2
    config = TransferConfig(multipart_threshold=8 * 1024 * 1024, multipart_chunksize=8 * 1024 * 1024,
                            max_concurrency=concurrency)
    s3.upload_fileobj(io.BufferedReader(Reader(pieces())), "bench", f"k-{variant}", Config=config)
elapsed = time.perf_counter() - started
peak = psutil.Process().memory_info().rss
head = s3.head_object(Bucket="bench", Key=f"k-{variant}")
assert head["ContentLength"] == size
print(json.dumps({"seconds": elapsed, "rss_growth_mib": (peak - before) / 2**20}))
"""


def run(endpoint: str, variant: str, size: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, endpoint, variant, str(size), str(ROOT / "functions")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--megabytes", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS / "s3_writes.md")
    args = parser.parse_args()
    port = free_port()
    env = {**os.environ, "MOTO_PORT": str(port)}
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        import boto3

        deadline = time.monotonic() + 30
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="x",
            aws_secret_access_key="x",
        )
        while True:
            try:
                client.create_bucket(Bucket="bench")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        results: dict[str, list[dict[str, float]]] = {
            "blob_store": [],
            "upload_fileobj": [],
            "upload_fileobj_2": [],
        }
        for _ in range(args.rounds):
            for variant in results:
                results[variant].append(run(endpoint, variant, args.megabytes * MIB))
                print(variant, results[variant][-1])
    finally:
        server.terminate()
        server.wait(10)

    def row(variant: str, label: str) -> str:
        seconds = [r["seconds"] for r in results[variant]]
        growth = [r["rss_growth_mib"] for r in results[variant]]
        return (
            f"| {label} | {statistics.median(seconds):.2f} s ({', '.join(f'{v:.2f}' for v in seconds)}) "
            f"| {statistics.median(growth):.0f} MiB ({', '.join(f'{v:.0f}' for v in growth)}) |"
        )

    report = "\n".join(
        [
            "# Streaming a file into S3: the blob store's multipart upload vs s3transfer",
            "",
            f"Machine: {machine()}",
            f"Command: `.venv/bin/python bench/s3_writes.py --megabytes {args.megabytes} --rounds {args.rounds}`",
            "",
            f"{args.megabytes} MB from a generator of 1 MiB pieces into a moto server (its own process); 8 MiB",
            "parts for both. Medians of the rounds (each round in brackets); variants alternate.",
            "",
            "| writer | time | process RSS growth |",
            "|---|---|---|",
            row("blob_store", "`S3BlobStore.write_stream` (sequential parts)"),
            row("upload_fileobj", "s3transfer `upload_fileobj` (default concurrency 10)"),
            row("upload_fileobj_2", "s3transfer `upload_fileobj`, concurrency 2"),
            "",
        ]
    )
    args.output.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
