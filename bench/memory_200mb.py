"""Peak resident memory of `batch-api serve` while a 200 MB, 50,000-line batch goes through upload
(Uploads API), validation, processing against the built-in mock, and download of the output file.
Run once with 16 MiB parts and once with the SDK's default 64 MiB parts.

    .venv/bin/python bench/memory_200mb.py            # writes bench/results/memory_200mb.md

Target: peak RSS under 500 MB. The server is a subprocess; psutil samples its RSS every 50 ms.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import psutil
from _common import RESULTS, machine
from tests.support.server import ServerProcess

TARGET_BYTES = 200 * 1000 * 1000 - 4096  # just under 200 MB (and so under 200 MiB)
LINES = 50_000


def make_input(path: Path) -> int:
    per_line = TARGET_BYTES // LINES
    template = {
        "custom_id": "",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": ""}]},
    }
    overhead = len(json.dumps(template)) + 1 + 12
    with path.open("w") as out:
        for i in range(LINES):
            template["custom_id"] = f"req-{i:08d}"
            template["body"]["messages"][0]["content"] = ("lorem ipsum " * (per_line // 12 + 1))[
                : per_line - overhead
            ]  # type: ignore[index]
            out.write(json.dumps(template) + "\n")
    return path.stat().st_size


class Sampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.peak = 0
        self.phase_peaks: dict[str, int] = {}
        self.phase = "start"
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                rss = self.process.memory_info().rss
            except psutil.Error:
                return
            self.peak = max(self.peak, rss)
            self.phase_peaks[self.phase] = max(self.phase_peaks.get(self.phase, 0), rss)
            time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part-sizes-mib", default="16,64")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        size = make_input(work / "input.jsonl")
        reports = [run_once(work, size, int(mib) * 1024 * 1024) for mib in args.part_sizes_mib.split(",")]
    header = f"""# Peak memory: a 200 MB, 50,000-line batch

Machine: {machine()}
Command: `.venv/bin/python bench/memory_200mb.py` (server: `batch-api serve --requests-per-chunk 64`,
mock upstream; RSS of the server process sampled every 50 ms with psutil). Target: peak RSS < 500 MB.

"""
    report = header + "\n".join(reports)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "memory_200mb.md").write_text(report)
    print(report)


def run_once(work: Path, size: int, part_size: int) -> str:
    import shutil

    shutil.rmtree(work / "data", ignore_errors=True)
    server = ServerProcess(work / "data", "--requests-per-chunk", "64").start()
    sampler = Sampler(server.proc.pid)  # type: ignore[union-attr]
    sampler.start()
    try:
        client = server.client(timeout=600)
        started = time.perf_counter()
        sampler.phase = "upload"
        upload = client.uploads.upload_file_chunked(
            file=work / "input.jsonl",
            mime_type="application/jsonl",
            purpose="batch",
            part_size=part_size,
        )
        uploaded = time.perf_counter()
        sampler.phase = "validate+process"
        batch = client.batches.create(
            input_file_id=upload.file.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        while batch.status not in ("completed", "failed", "expired", "cancelled"):
            time.sleep(0.5)
            batch = client.batches.retrieve(batch.id)
            if batch.status in ("finalizing",):
                sampler.phase = "finalize"
        finished = time.perf_counter()
        sampler.phase = "download"
        with client.files.with_streaming_response.content(batch.output_file_id) as response:
            out_bytes = sum(len(chunk) for chunk in response.iter_bytes())
    finally:
        sampler.stop_event.set()
        server.stop()
    assert batch.status == "completed" and batch.request_counts.completed == LINES, batch
    mib = 1024 * 1024
    return f"""## Uploads API with {part_size // mib} MiB parts

| what | value |
|---|---|
| input file | {size:,} bytes, {LINES:,} lines |
| upload | {uploaded - started:.1f} s |
| validate + process + finalize | {finished - uploaded:.1f} s |
| output file (streamed download) | {out_bytes:,} bytes |
| **peak RSS of the server** | **{sampler.peak / mib:.0f} MiB** |
""" + "".join(
        f"| peak RSS during {phase} | {peak / mib:.0f} MiB |\n" for phase, peak in sampler.phase_peaks.items()
    )


if __name__ == "__main__":
    main()
