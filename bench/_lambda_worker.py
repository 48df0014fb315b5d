"""One chunk-worker "Lambda container" for bench/worker_throughput.py: imports the process handler as the
Lambda runtime does (INIT), then invokes `process_handler` once with the event given, and writes what it
measured as JSON.

    python bench/_lambda_worker.py EVENT_JSON RESULT_PATH

The environment is the one the stack gives the process function (set by the bench). This file imports
nothing but the handler module and the standard library, so the process's memory is the worker's.
Output: CPU seconds (user + sys, `getrusage(RUSAGE_SELF)`) of the init and of the invocation, the
invocation's wall time, the process's peak RSS (VmHWM), and the upstream gate's requests in
flight sampled every 50 ms during the invocation (peak and time average).
"""

from __future__ import annotations

import json
import resource
import sys
import threading
import time


def peak_rss_mib() -> float:
    """This process's RSS high-water mark (VmHWM: kept per address space, so it starts afresh at exec,
    whereas `ru_maxrss` carries over the forking parent's)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Context:
    """What Powertools and the handler read of a Lambda context; 15 minutes to run, as the stack's."""

    function_name = "batch-api-bench-process"
    function_version = "$LATEST"
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:batch-api-bench-process"
    memory_limit_in_mb = 1769
    aws_request_id = "00000000-0000-0000-0000-000000000000"
    log_group_name = "/aws/lambda/batch-api-bench-process"
    log_stream_name = "bench"

    def __init__(self, seconds: float = 900.0) -> None:
        self.deadline = time.monotonic() + seconds

    def get_remaining_time_in_millis(self) -> int:
        return int((self.deadline - time.monotonic()) * 1000)


def main() -> None:
    event_path, result_path = sys.argv[1], sys.argv[2]
    # Lambda's limit of open files; the upstream connections count against it
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
    started_cpu = cpu_seconds()
    from batch_api.handlers import workflow  # INIT: what the runtime imports before the first event

    init_cpu = cpu_seconds() - started_cpu
    init_rss = peak_rss_mib()
    event = json.loads(open(event_path).read())  # noqa: SIM115 - a one-shot script

    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        # the gates of the container's upstream pool (`Deps.route` is the pool's bound `route`), once
        # the handler has built the container's deps (on its first invocation, as in Lambda)
        while workflow.get_deps.cache_info().currsize == 0:
            if stop.wait(0.01):
                return
        pool = workflow.get_deps().route.__self__  # type: ignore[union-attr]
        gates = list(pool.gates.values())
        while not stop.wait(0.05):
            samples.append(sum(gate.in_flight for gate in gates))

    sampler = threading.Thread(target=sample, daemon=True)
    cpu_before = cpu_seconds()
    wall_before = time.perf_counter()
    sampler.start()
    result = workflow.process_handler(event, Context())  # type: ignore[arg-type]
    wall = time.perf_counter() - wall_before
    cpu = cpu_seconds() - cpu_before
    stop.set()
    sampler.join()
    sys.stdout.flush()
    with open(result_path, "w") as out:
        json.dump(
            {
                "result": result,
                "wall": wall,
                "cpu": cpu,
                "init_cpu": init_cpu,
                "init_rss_mib": init_rss,
                "peak_rss_mib": peak_rss_mib(),
                "in_flight_peak": max(samples, default=0),
                "in_flight_mean": sum(samples) / len(samples) if samples else 0.0,
            },
            out,
        )
    # what a frozen container never does: close the kept loop and its connections (no warnings at exit)
    from batch_api.upstreams import loops

    loops.close_loop(loops.keep_loop())


if __name__ == "__main__":
    main()
