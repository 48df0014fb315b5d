"""The client commands (`batch-api submit|status|wait|download|cancel|ls|files`) as subprocesses against
`batch-api serve`, configured the usual way (OPENAI_BASE_URL / OPENAI_API_KEY): the exit code of each
outcome, --json parsed, the files downloaded, a large file through the Uploads API, Ctrl-C."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import jsonl, request_line, upload
from tests.support.server import ServerProcess, free_port

pytestmark = pytest.mark.e2e

CHAT = "/v1/chat/completions"
# 100 requests one at a time, half a second each: a batch that runs for most of a minute
SLOW = (
    "--mock-latency",
    "0.5",
    "--chunk-max-lines",
    "10",
    "--chunk-concurrency",
    "1",
    "--requests-per-chunk",
    "1",
)
FAST_PROGRESS = {"BATCH_API_PROGRESS_INTERVAL_SECONDS": "0.1"}
COMMAND = [sys.executable, "-m", "batch_api.local.cli"]


def cli_env(base_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "BATCH_API_"))}
    env.update(OPENAI_BASE_URL=base_url, OPENAI_API_KEY="sk-cli-test")
    return env


def cli(base_url: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *args], capture_output=True, text=True, env=cli_env(base_url), cwd=cwd, timeout=180
    )


def parsed(done: subprocess.CompletedProcess[str]) -> Any:
    """stdout as the one JSON document it must be."""
    return json.loads(done.stdout)


def write_requests(path: Path, lines: list[Any]) -> Path:
    path.write_bytes(jsonl(lines))
    return path


def slow_batch(server: ServerProcess, count: int = 100) -> Any:
    client = server.client()
    return client.batches.create(
        input_file_id=upload(client, [request_line(CHAT, i) for i in range(count)]).id,
        endpoint=CHAT,
        completion_window="24h",
    )


def test_submit_wait_json_downloads_the_output_and_error_files(start_server: Any, tmp_path: Path) -> None:
    server = start_server()
    lines = [request_line(CHAT, i) for i in range(12)]
    lines[5]["body"]["n"] = 0  # the mock answers 400: one line for the error file
    requests = write_requests(tmp_path / "requests.jsonl", lines)

    done = cli(
        server.base_url,
        "submit",
        str(requests),
        "--wait",
        "--json",
        "--interval",
        "0.2",
        "--metadata",
        "suite=cli",
        "run=1",
        "--output-expires-after",
        "7200",
        "--output-dir",
        str(tmp_path / "out"),
    )
    assert done.returncode == 0, done.stderr
    result = parsed(done)
    batch = result["batch"]
    assert batch["status"] == "completed" and batch["endpoint"] == CHAT  # inferred from the lines
    assert batch["metadata"] == {"suite": "cli", "run": "1"}
    assert batch["request_counts"] == {"total": 12, "completed": 11, "failed": 1}
    assert result["upload"] is None and result["input_file"]["id"] == batch["input_file_id"]
    assert result["input_file"]["bytes"] == requests.stat().st_size

    output = Path(result["downloaded"]["output"])
    errors = Path(result["downloaded"]["errors"])
    assert output == tmp_path / "out" / f"{batch['id']}_output.jsonl"
    assert errors == tmp_path / "out" / f"{batch['id']}_errors.jsonl"
    output_lines = [json.loads(x) for x in output.read_text().splitlines()]
    error_lines = [json.loads(x) for x in errors.read_text().splitlines()]
    assert sorted(x["custom_id"] for x in output_lines) == sorted(f"req-{i}" for i in range(12) if i != 5)
    assert all(x["response"]["status_code"] == 200 and x["error"] is None for x in output_lines)
    assert [(x["custom_id"], x["response"]["status_code"]) for x in error_lines] == [("req-5", 400)]
    # what the server holds, byte for byte
    client = server.client()
    assert output.read_bytes() == client.files.content(batch["output_file_id"]).content
    assert errors.read_bytes() == client.files.content(batch["error_file_id"]).content
    produced = client.files.retrieve(batch["output_file_id"])
    assert produced.expires_at is not None and abs(produced.expires_at - (produced.created_at + 7200)) <= 1
    assert not list((tmp_path / "out").glob("*.part"))
    # no terminal: plain status lines on stderr, no progress bar
    assert f"{batch['id']}: completed (12/12 done, 1 failed)" in done.stderr
    assert "\x1b" not in done.stderr and "\r" not in done.stderr


def test_a_large_file_goes_through_the_uploads_api_in_parts_the_server_takes(
    start_server: Any, tmp_path: Path
) -> None:
    # requests of at most 2 MiB: the CLI's first 4 MiB part is refused with a 413 naming part_size=
    server = start_server("--max-request-bytes", str(2 * 1024 * 1024))
    filler = "x" * 100_000
    lines = [
        request_line(
            CHAT, i, body={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"{filler} {i}"}]}
        )
        for i in range(50)
    ]
    requests = write_requests(tmp_path / "large.jsonl", lines)
    size = requests.stat().st_size
    assert size > 4 * 1024 * 1024  # over the Uploads API threshold (the default part size)

    done = cli(
        server.base_url,
        "submit",
        str(requests),
        "--wait",
        "--json",
        "--interval",
        "0.2",
        "--output-dir",
        str(tmp_path),
    )
    assert done.returncode == 0, done.stderr
    result = parsed(done)
    upload_obj, batch = result["upload"], result["batch"]
    assert upload_obj["object"] == "upload" and upload_obj["status"] == "completed"
    assert upload_obj["bytes"] == size and upload_obj["file"]["id"] == batch["input_file_id"]
    assert "the server refused a 4194304-byte part as too large; sending 1048576-byte parts" in done.stderr
    client = server.client()
    assert client.files.content(batch["input_file_id"]).content == requests.read_bytes()  # parts in order
    assert batch["status"] == "completed" and batch["request_counts"]["completed"] == 50
    assert len(Path(result["downloaded"]["output"]).read_text().splitlines()) == 50


def test_wait_on_a_batch_that_fails_validation_exits_1_naming_the_line(
    start_server: Any, tmp_path: Path
) -> None:
    server = start_server()
    lines = [request_line(CHAT, 0), request_line(CHAT, 1, custom_id="req-0"), request_line(CHAT, 2)]
    requests = write_requests(tmp_path / "dup.jsonl", lines)

    submitted = cli(server.base_url, "submit", str(requests))
    assert submitted.returncode == 0, submitted.stderr
    batch_id = submitted.stdout.strip()  # without --json: the batch id alone on stdout
    assert batch_id.startswith("batch_") and f"batch-api wait {batch_id}" in submitted.stderr

    waited = cli(server.base_url, "wait", batch_id, "--json", "--interval", "0.2")
    assert waited.returncode == 1, waited.stderr
    batch = parsed(waited)
    assert batch["id"] == batch_id and batch["status"] == "failed"
    assert [(e["code"], e["line"]) for e in batch["errors"]["data"]] == [("duplicate_custom_id", 2)]

    human = cli(server.base_url, "wait", batch_id)
    assert human.returncode == 1
    assert f"{batch_id} failed: its input did not pass validation" in human.stdout
    assert "line 2: duplicate_custom_id:" in human.stdout


def test_status_cancel_wait_and_download_of_a_cancelled_batch(start_server: Any, tmp_path: Path) -> None:
    server = start_server(*SLOW, env=FAST_PROGRESS)
    batch_id = slow_batch(server).id

    running = cli(server.base_url, "status", batch_id, "--json")
    assert running.returncode == 7, running.stderr  # not finished yet
    assert parsed(running)["status"] in ("validating", "in_progress")

    cancelled = cli(server.base_url, "cancel", batch_id, "--json")
    assert cancelled.returncode == 0, cancelled.stderr
    assert parsed(cancelled)["status"] in ("cancelling", "cancelled")

    waited = cli(server.base_url, "wait", batch_id, "--json", "--interval", "0.2")
    assert waited.returncode == 4, waited.stderr
    assert parsed(waited)["status"] == "cancelled"

    downloaded = cli(server.base_url, "download", batch_id, "--json", "--output-dir", str(tmp_path / "dl"))
    assert downloaded.returncode == 4, downloaded.stderr
    result = parsed(downloaded)
    errors = [json.loads(x) for x in Path(result["downloaded"]["errors"]).read_text().splitlines()]
    output = Path(result["downloaded"]["output"]) if result["downloaded"]["output"] else None
    done = len(output.read_text().splitlines()) if output else 0
    assert done + len(errors) == 100
    assert any(e["error"] and e["error"]["code"] == "batch_cancelled" for e in errors)


def test_a_batch_past_its_window_exits_3_with_what_it_finished(start_server: Any, tmp_path: Path) -> None:
    server = start_server(*SLOW, "--completion-window-seconds", "3", env=FAST_PROGRESS)
    requests = write_requests(tmp_path / "requests.jsonl", [request_line(CHAT, i) for i in range(40)])
    done = cli(
        server.base_url, "submit", str(requests), "--wait", "--interval", "0.2", "--output-dir", str(tmp_path)
    )
    assert done.returncode == 3, done.stderr
    batch_id = done.stdout.split()[0]
    assert done.stdout.startswith(f"{batch_id} expired")  # the summary
    errors = [json.loads(x) for x in (tmp_path / f"{batch_id}_errors.jsonl").read_text().splitlines()]
    assert any(e["error"] and e["error"]["code"] == "batch_expired" for e in errors)


def test_ctrl_c_stops_waiting_says_how_to_resume_and_never_cancels(start_server: Any) -> None:
    server = start_server(*SLOW, env=FAST_PROGRESS)
    batch_id = slow_batch(server).id
    waiting = subprocess.Popen(
        [*COMMAND, "wait", batch_id, "--interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(server.base_url),
    )
    assert waiting.stderr is not None
    first = waiting.stderr.readline()  # the first progress line: it is waiting now
    assert f"{batch_id}: " in first, first
    waiting.send_signal(signal.SIGINT)
    stdout, stderr = waiting.communicate(timeout=30)

    assert waiting.returncode == 130
    assert f"stopped waiting; batch {batch_id} is still " in stderr
    assert f"resume with: batch-api wait {batch_id}" in stderr
    assert "Traceback" not in stderr and stdout == ""
    batch = server.client().batches.retrieve(batch_id)
    assert batch.status in ("validating", "in_progress") and batch.cancelling_at is None


@pytest.mark.parametrize("backend", ["local"])  # what is drawn does not depend on the backend
def test_wait_on_a_terminal_draws_a_live_progress_bar(start_server: Any, backend: str) -> None:
    server = start_server("--mock-latency", "0.05", "--requests-per-chunk", "2", env=FAST_PROGRESS)
    client = server.client()
    batch = client.batches.create(
        input_file_id=upload(client, [request_line(CHAT, i) for i in range(40)]).id,
        endpoint=CHAT,
        completion_window="24h",
    )
    leader, follower = pty.openpty()
    waiting = subprocess.Popen(
        [*COMMAND, "wait", batch.id, "--interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=follower,
        env={**cli_env(server.base_url), "COLUMNS": "120", "TERM": "xterm"},
    )
    os.close(follower)
    drawn = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 1)
        if not ready:
            if waiting.poll() is not None:
                break
            continue
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: the command ended
            break
        if not chunk:
            break
        drawn += chunk
    os.close(leader)
    stdout, _ = waiting.communicate(timeout=30)
    assert waiting.returncode == 0
    screen = drawn.decode(errors="replace")
    assert "\x1b[" in screen and "\r" in screen  # drawn and redrawn in place
    assert "40/40" in screen and "req/s" in screen and "failed" in screen
    assert f"{batch.id}: " in screen  # the status changes, printed above the bar
    assert stdout.decode().startswith(f"{batch.id} completed")  # stdout stays plain


def test_ls_files_and_the_apis_errors(start_server: Any) -> None:
    server = start_server()
    client = server.client()
    input_file = upload(client, [request_line(CHAT, i) for i in range(3)], name="three.jsonl")
    batch = client.batches.create(input_file_id=input_file.id, endpoint=CHAT, completion_window="24h")
    deadline = time.monotonic() + 60
    while client.batches.retrieve(batch.id).status != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.1)

    listed = cli(server.base_url, "ls", "--json", "--limit", "5")
    assert listed.returncode == 0, listed.stderr
    page = parsed(listed)
    assert page["object"] == "list" and [b["id"] for b in page["data"]] == [batch.id]

    table = cli(server.base_url, "ls", "--status", "completed")
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()
    assert header.split() == ["ID", "STATUS", "ENDPOINT", "MODEL", "CREATED", "DONE/TOTAL", "FAILED"]
    assert row.split()[:4] == [batch.id, "completed", CHAT, "gpt-4o-mini"] and row.split()[-2:] == [
        "3/3",
        "0",
    ]

    files = cli(server.base_url, "files", "ls", "--purpose", "batch", "--json")
    assert files.returncode == 0, files.stderr
    assert [(f["id"], f["filename"]) for f in parsed(files)["data"]] == [(input_file.id, "three.jsonl")]

    removed = cli(server.base_url, "files", "rm", input_file.id, "--json")
    assert removed.returncode == 0, removed.stderr
    assert parsed(removed)["data"] == [{"id": input_file.id, "object": "file", "deleted": True}]
    assert [f.id for f in client.files.list(purpose="batch")] == []

    finished = cli(server.base_url, "cancel", batch.id)  # the API's 409, in one line
    assert finished.returncode == 6
    assert finished.stderr.strip().splitlines() == [
        "batch-api cancel: error: 409 Cannot cancel a batch with status 'completed'."
    ]

    unknown = cli(server.base_url, "status", "batch_doesnotexist", "--json")
    assert unknown.returncode == 6
    assert parsed(unknown)["error"]["status_code"] == 404
    assert unknown.stderr.strip().splitlines() == [
        "batch-api status: error: 404 No batch found with id 'batch_doesnotexist'."
    ]


def test_usage_errors_exit_2_before_anything_is_sent(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}/v1"  # nothing may be sent: nothing listens
    mixed = write_requests(
        tmp_path / "mixed.jsonl", [request_line(CHAT, 0), request_line("/v1/embeddings", 1)]
    )
    done = cli(closed, "submit", str(mixed), "--json")
    assert done.returncode == 2
    assert parsed(done)["error"]["type"] == "usage"
    assert "line 2 has \"url\" '/v1/embeddings' but line 1 has '/v1/chat/completions'" in done.stderr

    bad_metadata = cli(closed, "submit", str(mixed), "--endpoint", CHAT, "--metadata", "oops")
    assert bad_metadata.returncode == 2 and "--metadata 'oops': expected key=value" in bad_metadata.stderr

    missing = cli(closed, "submit", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2 and "nope.jsonl: no such file" in missing.stderr

    bad_flag = cli(closed, "wait", "batch_x", "--interval", "-1")
    assert bad_flag.returncode == 2 and "must be greater than 0" in bad_flag.stderr

    env = {k: v for k, v in cli_env(closed).items() if k != "OPENAI_API_KEY"}
    no_key = subprocess.run([*COMMAND, "ls"], capture_output=True, text=True, env=env, timeout=60)
    assert no_key.returncode == 2 and "OPENAI_API_KEY" in no_key.stderr


def test_a_server_that_cannot_be_reached_exits_5(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}/v1"
    done = cli(closed, "status", "batch_x", "--json")
    assert done.returncode == 5
    assert parsed(done)["error"]["type"] == "connection"
    assert done.stderr.strip().splitlines() == [
        f"batch-api status: error: cannot reach {closed}/: Connection error: [Errno 111] Connection refused"
    ]
