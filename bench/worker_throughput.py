"""One chunk worker at R requests in flight: CPU seconds per 1,000 requests, peak RSS and wall time of
the process Lambda's own code path, for the cost model (docs/cost-model.md).

    .venv/bin/python bench/worker_throughput.py                  # writes bench/results/worker_throughput.md
    .venv/bin/python bench/worker_throughput.py --latency 0.05 --runs 1 --output /tmp/quick.md

What runs: `batch_api.handlers.workflow.process_handler`, the process Lambda's entry point, in a fresh
child process per run (bench/_lambda_worker.py: one cold "container", one invocation, Lambda's limit of
1,024 open files), with the environment the stack gives that function (backend aws, upstreams JSON,
`BATCH_API_REQUESTS_PER_CHUNK=R`, journal flushed every second, Powertools logs and EMF metrics to
stdout). So its deps are the Lambda's (`get_deps`: DynamoDB metadata and capacity leases, S3 blobs and
journal, metered upstream clients); AWS is a moto server in its own process on localhost, so only
the worker's own (boto3 client side) CPU is counted, as Lambda bills it. X-Ray is off
(POWERTOOLS_TRACE_DISABLED): there is no daemon here.

Upstream: `batch-api mock-upstream --latency T` in its own process. Each run is one chunk (validated
by the real validate step with one chunk for the whole input) of N chat requests, N = R x `--waves`
clamped to [`--min-requests`, `--max-requests`]. Per run: wall time of the invocation, CPU seconds
(user + sys) of the invocation and of the init (imports), peak RSS (the child's VmHWM, and the
parent's psutil samples every 50 ms), the requests in flight (the upstream gate, sampled every 50 ms:
peak and mean), and a check that every request is journaled as completed. Settings alternate within a
round; medians over rounds are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import RESULTS, ROOT, machine

REGION = "us-east-1"
TABLE = "bench-table"
BUCKET = "bench-bucket"
BUS = "bench-bus"
PROJECT = "bench"
WORKER = Path(__file__).resolve().parent / "_lambda_worker.py"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(url: str, what: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start") from None
            time.sleep(0.1)


def input_lines(n: int) -> bytes:
    return b"".join(
        json.dumps(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"Say {i}"}]},
            },
            separators=(",", ":"),
        ).encode()
        + b"\n"
        for i in range(n)
    )


@dataclass
class Run:
    r: int
    n: int
    wall: float
    cpu: float
    init_cpu: float
    init_rss_mib: float
    peak_rss_mib: float
    sampled_rss_mib: float
    in_flight_peak: int
    in_flight_mean: float
    open_files: int  # peak, sampled
    log_bytes: int
    failure: str | None = None  # the worker's last error line when it failed

    @property
    def cpu_per_1000(self) -> float:
        return self.cpu / self.n * 1000


class World:
    """moto (table, bucket) and the deps the bench uses to seed batches and check their journals."""

    def __init__(self, endpoint: str, upstreams_json: str) -> None:
        import boto3

        from batch_api.adapters.aws.schema import create_table_kwargs
        from batch_api.bootstrap_aws import build_aws_deps
        from batch_api.config import Settings

        self.endpoint = endpoint
        self.upstreams_json = upstreams_json
        boto3.client("dynamodb", endpoint_url=endpoint, region_name=REGION).create_table(
            **create_table_kwargs(TABLE)
        )
        boto3.client("s3", endpoint_url=endpoint, region_name=REGION).create_bucket(Bucket=BUCKET)
        settings = Settings(
            backend="aws",
            aws_endpoint_url=endpoint,
            aws_region=REGION,
            table_name=TABLE,
            bucket_name=BUCKET,
            event_bus_name=BUS,
            upstreams_json=upstreams_json,
            chunk_max_lines=50_000,  # one chunk per batch
        )

        class NoWorkflow:
            def start(self, project_id: str, batch_id: str) -> None:
                pass

        self.deps = build_aws_deps(settings, workflow=NoWorkflow())
        self.inputs: dict[int, str] = {}

    def input_file(self, n: int) -> str:
        from batch_api import object_keys
        from batch_api.contract.ids import new_file_id
        from batch_api.contract.models import FileRecord

        if n not in self.inputs:
            data = input_lines(n)
            now = self.deps.now()
            record = FileRecord(
                id=new_file_id(),
                project_id=PROJECT,
                bytes=len(data),
                created_at=now,
                expires_at=now + 30 * 86400,
                filename=f"{n}.jsonl",
                purpose="batch",
                blob_key="",
            )
            record = record.model_copy(update={"blob_key": object_keys.file_key(record.id)})
            self.deps.blobs.put(record.blob_key, data)
            self.deps.metadata.create_file(record)
            self.inputs[n] = record.id
        return self.inputs[n]

    def chunk_event(self, n: int) -> dict[str, Any]:
        """A new batch of `n` requests, validated (one chunk): the event the Distributed Map sends."""
        import orjson

        from batch_api.contract.ids import new_batch_id
        from batch_api.contract.models import BatchRecord
        from batch_api.workflow.validate import validate_batch

        now = self.deps.now()
        batch = BatchRecord(
            id=new_batch_id(),
            project_id=PROJECT,
            endpoint="/v1/chat/completions",
            input_file_id=self.input_file(n),
            created_at=now,
            expires_at=now + 86400,
        )
        self.deps.metadata.create_batch(batch)
        validated = validate_batch({"project_id": PROJECT, "batch_id": batch.id}, self.deps)
        assert validated.next == "process" and validated.chunk_count == 1, validated
        assert validated.manifest_key is not None
        (chunk,) = orjson.loads(self.deps.blobs.get(validated.manifest_key))
        return {"project_id": PROJECT, "batch_id": batch.id, "chunk": chunk}

    def check_done(self, event: dict[str, Any], n: int) -> None:
        from batch_api.workflow.tally import read_tally

        tally = read_tally(self.deps, event["batch_id"], 0, "/v1/chat/completions")
        assert len(tally.done_ids) == n and tally.completed == n, (len(tally.done_ids), tally.completed, n)

    def worker_env(self, r: int) -> dict[str, str]:
        """The process function's environment (infra: stack.py and constructs/workflow.py)."""
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("BATCH_API_", "POWERTOOLS_", "AWS_"))
        }
        env.update(
            {
                "PYTHONPATH": f"{ROOT / 'functions'}",
                "AWS_ACCESS_KEY_ID": "bench",
                "AWS_SECRET_ACCESS_KEY": "bench",
                "AWS_REGION": REGION,
                "AWS_DEFAULT_REGION": REGION,
                "AWS_LAMBDA_FUNCTION_NAME": "batch-api-bench-process",
                "BATCH_API_BACKEND": "aws",
                "BATCH_API_AWS_ENDPOINT_URL": self.endpoint,
                "BATCH_API_TABLE_NAME": TABLE,
                "BATCH_API_BUCKET_NAME": BUCKET,
                "BATCH_API_EVENT_BUS_NAME": BUS,
                "BATCH_API_CHUNK_MAX_LINES": "50000",
                "BATCH_API_UPSTREAMS_JSON": self.upstreams_json,
                "BATCH_API_REQUESTS_PER_CHUNK": str(r),
                "BATCH_API_JOURNAL_FLUSH_INTERVAL_SECONDS": "1",
                "POWERTOOLS_SERVICE_NAME": "batch-api",
                "POWERTOOLS_METRICS_NAMESPACE": "BatchApi",
                "POWERTOOLS_TRACE_DISABLED": "true",
            }
        )
        return env


def run_worker(world: World, r: int, n: int, tmp: Path) -> Run:
    import psutil

    event = world.chunk_event(n)
    event_path, result_path, log_path = tmp / "event.json", tmp / "result.json", tmp / "stdout.log"
    event_path.write_text(json.dumps(event))
    with log_path.open("wb") as log:
        child = subprocess.Popen(
            [sys.executable, str(WORKER), str(event_path), str(result_path)],
            env=world.worker_env(r),
            stdout=log,
            stderr=subprocess.PIPE,
        )
        assert child.stderr is not None
        peak = files = 0
        process = psutil.Process(child.pid)
        stopped = threading.Event()

        def sample() -> None:
            nonlocal peak, files
            while not stopped.wait(0.05):
                try:
                    peak = max(peak, process.memory_info().rss)
                    files = max(files, process.num_fds())
                except psutil.Error:
                    return

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stderr = child.stderr.read()
        child.wait()
        stopped.set()
        sampler.join()
    if child.returncode != 0:
        errors = [line for line in stderr.decode().splitlines() if "Error" in line]
        print(stderr.decode()[-4000:], file=sys.stderr)
        return Run(r, n, 0, 0, 0, 0, 0, peak / 2**20, 0, 0, files, 0, (errors or ["?"])[-1].strip())
    measured = json.loads(result_path.read_text())
    assert measured["result"]["done"] is True and measured["result"]["stopped"] is None, measured
    world.check_done(event, n)
    return Run(
        r=r,
        n=n,
        wall=measured["wall"],
        cpu=measured["cpu"],
        init_cpu=measured["init_cpu"],
        init_rss_mib=measured["init_rss_mib"],
        peak_rss_mib=measured["peak_rss_mib"],
        sampled_rss_mib=peak / 2**20,
        in_flight_peak=measured["in_flight_peak"],
        in_flight_mean=measured["in_flight_mean"],
        open_files=files,
        log_bytes=log_path.stat().st_size,
    )


def start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def median(values: list[float]) -> float:
    return statistics.median(values)


def report(args: argparse.Namespace, command: str, runs: dict[int, list[Run]]) -> str:
    lines = [
        "| R | requests | wall (ideal) | mean / peak in flight | requests/s | CPU s (per 1,000 req) "
        "| CPU s per s | peak RSS | init CPU s, RSS | open files | log bytes per req |",
        "|---:|---:|---|---|---:|---|---:|---:|---|---:|---:|",
    ]
    for r, all_runs in runs.items():
        n = all_runs[0].n
        failed = [x for x in all_runs if x.failure]
        if failed:
            lines.append(
                f"| {r} | {n:,} | **{len(failed)} of {len(all_runs)} runs failed**: `{failed[0].failure}` "
                f"| | | | | | | {max(x.open_files for x in failed)} | |"
            )
        rs = [x for x in all_runs if not x.failure]
        if not rs:
            continue
        wall = median([x.wall for x in rs])
        cpu = median([x.cpu for x in rs])
        per_1000 = [x.cpu_per_1000 for x in rs]
        ideal = n / r * args.latency
        lines.append(
            f"| {r} | {n:,} | {wall:.1f} s ({ideal:.1f}) [{', '.join(f'{x.wall:.1f}' for x in rs)}] "
            f"| {median([x.in_flight_mean for x in rs]):.0f} / {max(x.in_flight_peak for x in rs)} "
            f"| {n / wall:,.0f} "
            f"| {cpu:.2f} ({median(per_1000):.3f}) [{', '.join(f'{v:.3f}' for v in per_1000)}] "
            f"| {median([x.cpu / x.wall for x in rs]):.3f} "
            f"| {median([x.peak_rss_mib for x in rs]):.0f} MiB "
            f"(sampled {median([x.sampled_rss_mib for x in rs]):.0f}) "
            f"| {median([x.init_cpu for x in rs]):.2f}, {median([x.init_rss_mib for x in rs]):.0f} MiB "
            f"| {max(x.open_files for x in rs)} "
            f"| {median([x.log_bytes / x.n for x in rs]):.0f} |"
        )
    return "\n".join(
        [
            f"## Upstream latency {args.latency:g} s",
            "",
            f"Machine: {machine()}",
            f"Command: `{command}`",
            f"Load average before the runs: {os.getloadavg()[0]:.2f} (other work was running on the machine)",
            "",
            *lines,
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--latency", type=float, default=2.0, help="upstream latency, seconds")
    parser.add_argument("--requests-per-chunk", default="32,64,128,256,512", help="R values, comma separated")
    parser.add_argument("--waves", type=int, default=40, help="N = R x waves, clamped to the bounds below")
    parser.add_argument("--min-requests", type=int, default=5000)
    parser.add_argument("--max-requests", type=int, default=20000)
    parser.add_argument("--max-in-flight", type=int, default=1024, help="the upstream's max_in_flight")
    parser.add_argument("--runs", type=int, default=3, help="rounds; every R once per round")
    parser.add_argument("--output", type=Path, default=RESULTS / "worker_throughput.md")
    parser.add_argument("--append", action="store_true", help="add this section to the output file")
    args = parser.parse_args()
    command = "bench/worker_throughput.py " + " ".join(sys.argv[1:])
    rs = [int(v) for v in args.requests_per_chunk.split(",")]

    upstream_port, moto_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'functions'}"}
    upstream = start(
        [
            sys.executable,
            "-m",
            "batch_api.local.cli",
            "mock-upstream",
            "--port",
            str(upstream_port),
            "--latency",
            str(args.latency),
        ],
        env,
    )
    moto = start([sys.executable, "-m", "moto.server", "-p", str(moto_port)], env)
    for key, value in {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        os.environ[key] = value
    os.environ.pop("AWS_PROFILE", None)
    upstream_url = f"http://127.0.0.1:{upstream_port}/v1"
    endpoint = f"http://127.0.0.1:{moto_port}"
    runs: dict[int, list[Run]] = {r: [] for r in rs}
    try:
        wait_for(f"{upstream_url}/models", "the mock upstream")
        wait_for(endpoint, "moto")
        upstreams = [
            {"name": "bench", "base_url": upstream_url, "models": ["*"], "max_in_flight": args.max_in_flight}
        ]
        world = World(endpoint, json.dumps(upstreams, separators=(",", ":")))
        with tempfile.TemporaryDirectory() as tmp:
            for round_ in range(args.runs):
                for r in rs:
                    n = min(args.max_requests, max(args.min_requests, r * args.waves))
                    run = run_worker(world, r, n, Path(tmp))
                    runs[r].append(run)
                    if run.failure:
                        print(f"round {round_ + 1} R={r} N={n}: FAILED {run.failure}", flush=True)
                        continue
                    print(
                        f"round {round_ + 1} R={r} N={n}: wall {run.wall:.2f} s, cpu {run.cpu:.2f} s "
                        f"({run.cpu_per_1000:.3f} per 1,000), rss {run.peak_rss_mib:.0f} MiB, "
                        f"in flight {run.in_flight_mean:.0f}/{run.in_flight_peak}",
                        flush=True,
                    )
    finally:
        for process in (upstream, moto):
            process.terminate()
            process.wait(10)
    section = report(args, command, runs)
    print(section)
    if args.append and args.output.exists():
        args.output.write_text(args.output.read_text().rstrip("\n") + "\n\n" + section)
    else:
        args.output.write_text(section)


if __name__ == "__main__":
    main()
