"""The client commands' pure logic: endpoint inference, metadata, part sizes from a 413, exit codes,
error mapping, and the Uploads API loop against a fake SDK client."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import openai
import pytest

from batch_api.client import commands
from batch_api.client.display import Ui
from batch_api.client.exit_codes import HELP, ExitCode, for_status
from batch_api.client.inputs import (
    DEFAULT_PART_SIZE,
    MIN_PART_SIZE,
    UsageError,
    infer_endpoint,
    output_paths,
    parse_metadata,
    part_size_hint,
    smaller_part_size,
)
from batch_api.contract import limits
from batch_api.local.cli import _parser

pytestmark = pytest.mark.unit

# the HTTP library of the installed SDK (httpx for openai 1.x, httpx2 later)
http: Any = importlib.import_module("httpx2" if importlib.util.find_spec("httpx2") else "httpx")


def line(url: str) -> bytes:
    return b'{"custom_id": "a", "method": "POST", "url": "%s", "body": {}}\n' % url.encode()


# --- endpoint inference ----------------------------------------------------------------------------


def test_the_endpoint_is_the_url_every_line_names() -> None:
    assert infer_endpoint([line("/v1/embeddings"), b"\n", line("/v1/embeddings")]) == "/v1/embeddings"


def test_lines_that_disagree_are_a_usage_error_naming_both_lines() -> None:
    with pytest.raises(UsageError, match=r"line 4 has \"url\" '/v1/completions' but line 2 has"):
        infer_endpoint(
            [b"  \n", line("/v1/chat/completions"), line("/v1/chat/completions"), line("/v1/completions")]
        )


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (b"{not json\n", "line 2 is not valid JSON"),
        (b'{"custom_id": "b"}\n', 'line 2 has no "url"'),
        (b"[1]\n", 'line 2 has no "url"'),
    ],
)
def test_a_line_without_a_url_is_a_usage_error_naming_it(bad: bytes, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        infer_endpoint([line("/v1/responses"), bad])


def test_a_file_without_request_lines_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="no request lines"):
        infer_endpoint([b"\n", b"   \n"])


# --- metadata ---------------------------------------------------------------------------------------


def test_metadata_pairs_split_at_the_first_equals_sign() -> None:
    assert parse_metadata(["team=search", "query=a=b", "empty="]) == {
        "team": "search",
        "query": "a=b",
        "empty": "",
    }
    assert parse_metadata([]) == {}


@pytest.mark.parametrize(
    ("pairs", "message"),
    [(["team"], "expected key=value"), (["=x"], "expected key=value"), (["a=1", "a=2"], "given twice")],
)
def test_bad_metadata_is_a_usage_error(pairs: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_metadata(pairs)


# --- part sizes -------------------------------------------------------------------------------------


def test_the_part_size_is_read_from_this_servers_413_message() -> None:
    message = limits.too_large_message(2 * 1024 * 1024, 1_048_576, 4_194_486)
    assert part_size_hint(message) == 1_048_576
    assert smaller_part_size(DEFAULT_PART_SIZE, message) == 1_048_576
    assert part_size_hint("Request Entity Too Large") is None


def test_without_a_smaller_hint_the_part_is_halved_down_to_a_floor() -> None:
    assert smaller_part_size(DEFAULT_PART_SIZE, "413 Payload Too Large") == DEFAULT_PART_SIZE // 2
    assert smaller_part_size(1_000_000, "part_size=4194304") == 500_000  # a hint no smaller is no help
    assert smaller_part_size(1_000_000, "part_size=0") == 500_000
    with pytest.raises(ValueError, match="refused a part of"):
        smaller_part_size(MIN_PART_SIZE, "too large")


def test_downloads_are_named_after_the_batch(tmp_path: Path) -> None:
    assert output_paths(tmp_path, "batch_1") == {
        "output": tmp_path / "batch_1_output.jsonl",
        "errors": tmp_path / "batch_1_errors.jsonl",
    }


# --- exit codes -------------------------------------------------------------------------------------


def test_each_terminal_status_has_its_own_exit_code() -> None:
    assert [for_status(s) for s in ("completed", "failed", "expired", "cancelled")] == [0, 1, 3, 4]
    for running in ("validating", "in_progress", "finalizing", "cancelling"):
        assert for_status(running) == ExitCode.NOT_FINISHED == 7
    assert len({int(code) for code in ExitCode}) == len(ExitCode)
    for code in ExitCode:
        assert code == ExitCode.BROKEN_PIPE or f"\n  {int(code):<4} " in f"\n{HELP}", code


def _request() -> Any:
    return http.Request("GET", "http://127.0.0.1:9/v1/batches/batch_x")


def status_error(status: int, body: dict[str, Any]) -> openai.APIStatusError:
    response = http.Response(status, request=_request(), json={"error": body})
    return openai.APIStatusError(f"Error code: {status}", response=response, body=body)


def test_an_api_error_is_one_line_with_its_status_and_exit_code_6() -> None:
    code, error = commands.describe_error(
        status_error(404, {"message": "No batch found with id 'batch_x'.\n", "code": None}), "http://x/v1"
    )
    assert code == ExitCode.API_ERROR
    assert error == {
        "type": "api",
        "status_code": 404,
        "code": None,
        "message": "404 No batch found with id 'batch_x'.",
    }


def test_a_connection_error_names_the_base_url_and_exits_5() -> None:
    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except ConnectionRefusedError as cause:
            raise openai.APIConnectionError(request=_request()) from cause
    except openai.APIConnectionError as exc:
        code, error = commands.describe_error(exc, "http://127.0.0.1:9/v1/")
    assert code == ExitCode.CONNECTION
    assert (
        error["message"]
        == "cannot reach http://127.0.0.1:9/v1/: Connection error: [Errno 111] Connection refused"
    )


def test_a_usage_error_exits_2() -> None:
    assert commands.describe_error(UsageError("bad"), "x") == (
        ExitCode.USAGE,
        {"type": "usage", "message": "bad"},
    )


# --- the parser -------------------------------------------------------------------------------------


def test_the_client_commands_parse_next_to_serve() -> None:
    args = _parser().parse_args(
        ["submit", "in.jsonl", "--metadata", "a=1", "b=2", "--metadata", "c=3", "--json", "--wait"]
    )
    assert (args.client_command, args.file, args.metadata, args.json, args.wait) == (
        "submit",
        "in.jsonl",
        ["a=1", "b=2", "c=3"],
        True,
        True,
    )
    assert args.part_size == DEFAULT_PART_SIZE and args.interval == 2.0 and args.output_dir == "."
    assert _parser().parse_args(["files", "rm", "file-1", "file-2"]).file_ids == ["file-1", "file-2"]
    assert _parser().parse_args(["files", "ls"]).client_command == "files ls"
    assert not hasattr(_parser().parse_args(["serve"]), "client_command")


@pytest.mark.parametrize(
    "argv", [["wait", "b", "--interval", "0"], ["ls", "--status", "done"], ["submit"], ["files"]]
)
def test_bad_arguments_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        _parser().parse_args(argv)
    assert exited.value.code == ExitCode.USAGE


def test_the_client_imports_nothing_of_the_server() -> None:
    """The commands start fast: no boto3, no server, adapters or workflow modules."""
    probe = (
        "import sys\n"
        "from batch_api.local.cli import _parser\n"
        "import batch_api.client.commands\n"
        "_parser()\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore', 'uvicorn', 'aiohttp')"
        " or m.startswith(('batch_api.adapters', 'batch_api.service', 'batch_api.workflow', 'batch_api.handlers',"
        " 'batch_api.local.server', 'batch_api.upstreams')))\n"
        "print(heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    loaded = eval(done.stdout)  # a printed list of module names
    # the openai SDK may bring its own optional aiohttp transport; nothing else may appear
    assert [m for m in loaded if not m.startswith("aiohttp")] == []


# --- the Uploads API loop against a fake SDK client -------------------------------------------------


class FakeClient:
    """files.create refuses anything over `limit` bytes with this server's 413; so do parts."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: dict[str, bytes] = {}
        self.completed: dict[str, Any] = {}
        self.refused: list[int] = []
        self.files = SimpleNamespace(create=self._create_file)
        self.uploads = SimpleNamespace(
            create=lambda **kw: SimpleNamespace(id="upload_1", **kw),
            parts=SimpleNamespace(create=self._create_part),
            complete=self._complete,
        )

    def _refuse(self, size: int) -> None:
        self.refused.append(size)
        message = limits.too_large_message(
            self.limit, limits.part_size_for(self.limit, 64 * 1024 * 1024), size
        )
        raise status_error(413, {"message": message, "code": None})

    def _create_file(self, *, file: Any, purpose: str) -> Any:
        data = file[1].read()
        if len(data) > self.limit:
            self._refuse(len(data))
        return SimpleNamespace(id="file-direct", bytes=len(data))

    def _create_part(self, *, upload_id: str, data: bytes) -> Any:
        if len(data) + limits.MULTIPART_OVERHEAD_BYTES > self.limit:
            self._refuse(len(data))
        part_id = f"part_{len(self.parts)}"
        self.parts[part_id] = data
        return SimpleNamespace(id=part_id)

    def _complete(self, *, upload_id: str, part_ids: list[str], md5: str) -> Any:
        body = b"".join(self.parts[p] for p in part_ids)
        self.completed = {"part_ids": part_ids, "md5": md5, "body": body}
        return SimpleNamespace(id=upload_id, file=SimpleNamespace(id="file-uploaded", bytes=len(body)))


def _ui() -> Ui:
    return Ui(json_output=True)


def test_a_file_that_fits_one_part_is_one_files_create(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(line("/v1/embeddings") * 10)
    client = FakeClient(limit=10 * 1024 * 1024)
    created, upload = commands.upload_input(client, path, DEFAULT_PART_SIZE, _ui())  # type: ignore[arg-type]
    assert (created.id, upload, client.parts) == ("file-direct", None, {})


def test_a_large_file_goes_up_in_parts_of_the_size_the_server_names(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    body = bytes(range(256)) * (9 * 1024 * 1024 // 256 + 17)
    path.write_bytes(body)
    client = FakeClient(limit=2 * 1024 * 1024)
    created, upload = commands.upload_input(client, path, DEFAULT_PART_SIZE, _ui())  # type: ignore[arg-type]
    assert created.id == "file-uploaded" and upload is not None
    assert client.refused == [DEFAULT_PART_SIZE]  # learned once, from the 413's part_size=
    assert {len(p) for p in list(client.parts.values())[:-1]} == {1024 * 1024}
    assert client.completed["body"] == body
    assert client.completed["md5"] == hashlib.md5(body).hexdigest()


def test_a_small_file_the_server_refuses_goes_through_the_uploads_api(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    body = b"x" * (3 * 1024 * 1024)
    path.write_bytes(body)
    client = FakeClient(limit=2 * 1024 * 1024)
    created, _ = commands.upload_input(client, path, DEFAULT_PART_SIZE, _ui())  # type: ignore[arg-type]
    assert created.id == "file-uploaded" and client.refused == [len(body)]
    assert client.completed["body"] == body and len(client.parts) == 3


def test_a_server_that_refuses_every_part_is_an_api_error(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"x" * (1024 * 1024))
    client = FakeClient(limit=1024)
    with pytest.raises(openai.APIStatusError):
        commands.upload_input(client, path, 256 * 1024, _ui())  # type: ignore[arg-type]
    assert client.refused == [256 * 1024]  # the size it names is below MIN_PART_SIZE: no more tries


def test_without_a_terminal_progress_is_plain_lines(capsys: pytest.CaptureFixture[str]) -> None:
    ui = Ui(json_output=False)
    assert not ui.live
    counts = SimpleNamespace(total=4, completed=1, failed=1)
    with ui.following("batch_1") as view:
        view.update(SimpleNamespace(status="validating", request_counts=None))
        view.update(SimpleNamespace(status="in_progress", request_counts=counts))
        view.update(SimpleNamespace(status="in_progress", request_counts=counts))
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "\x1b" not in err and "\r" not in err
    assert "batch_1: validating" in err and "batch_1: in_progress (2/4 done, 1 failed)" in err


def test_an_interrupted_wait_never_cancels(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    batch = SimpleNamespace(id="batch_1", status="in_progress", request_counts=None)
    calls: list[str] = []

    def retrieve(batch_id: str) -> Any:
        calls.append("retrieve")
        return batch

    def cancel(batch_id: str) -> Any:  # pragma: no cover - the assertion is that it is never called
        calls.append("cancel")
        return batch

    client = SimpleNamespace(
        base_url="http://x/v1", batches=SimpleNamespace(retrieve=retrieve, cancel=cancel)
    )

    def interrupt(_: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(commands.time, "sleep", interrupt)
    monkeypatch.setattr(commands, "make_client", lambda args: client)
    args = argparse.Namespace(
        json=False, base_url=None, client_command="wait", batch_id="batch_1", interval=1.0
    )
    assert commands.run(args) == ExitCode.INTERRUPTED == 130
    assert calls == ["retrieve"]
    assert (
        "stopped waiting; batch batch_1 is still in_progress; resume with: batch-api wait batch_1"
        in capsys.readouterr().err
    )
