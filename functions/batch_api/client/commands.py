"""The client commands, on the openai SDK. Each takes (client, args, ui) and returns an exit code;
`run` turns what goes wrong into a one-line error and its exit code."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
from openai.types import Batch, FileObject, Upload

from batch_api.client.display import BatchView, Ui
from batch_api.client.exit_codes import TERMINAL_STATUSES, ExitCode, for_status
from batch_api.client.inputs import (
    UsageError,
    infer_endpoint_of_file,
    output_paths,
    parse_metadata,
    smaller_part_size,
)

JSONL_MIME_TYPE = "application/jsonl"
REQUEST_TIMEOUT_SECONDS = 120.0  # one API call; `complete` of a large Upload takes a while on AWS
# while following a batch already seen: how long the API may be unreachable (a server restarting)
UNREACHABLE_GRACE_SECONDS = 120.0
DOWNLOAD_CHUNK_BYTES = 1024 * 1024


class WaitInterrupted(Exception):
    def __init__(self, batch: Batch) -> None:
        super().__init__(batch.id)
        self.batch = batch


def make_client(args: argparse.Namespace) -> openai.OpenAI:
    """The SDK client: --base-url/--api-key, else OPENAI_BASE_URL/OPENAI_API_KEY (the SDK reads them)."""
    try:
        return openai.OpenAI(
            base_url=args.base_url, api_key=args.api_key, timeout=REQUEST_TIMEOUT_SECONDS, max_retries=2
        )
    except openai.OpenAIError as exc:  # no API key
        raise UsageError(f"{exc} (any value works for a batch-api serve without --api-key)") from None


def emit_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def dump(model: Any) -> Any:
    return None if model is None else model.model_dump(mode="json")


# --- transfers --------------------------------------------------------------------------------------


def upload_input(
    client: openai.OpenAI, path: Path, part_size: int, ui: Ui
) -> tuple[FileObject, Upload | None]:
    """Upload `path` as a batch input file: in one request when it fits one part, else through the
    Uploads API. A 413 (this server names the part size it takes) makes the parts smaller."""
    size = path.stat().st_size
    with ui.transfer(f"uploading {path.name}", total=size) as advance:
        if size <= part_size:
            try:
                with path.open("rb") as body:
                    created = client.files.create(file=(path.name, body, JSONL_MIME_TYPE), purpose="batch")
                advance(size)
                return created, None
            except openai.APIStatusError as exc:
                if exc.status_code != 413:
                    raise
                part_size = _smaller(size, exc)
        return _upload_in_parts(client, path, size, part_size, advance, ui)


def _smaller(refused: int, exc: openai.APIStatusError) -> int:
    try:
        return smaller_part_size(refused, f"{exc.message} {exc.body}")
    except ValueError:
        raise exc from None


def _upload_in_parts(
    client: openai.OpenAI,
    path: Path,
    size: int,
    part_size: int,
    advance: Callable[[int], None],
    ui: Ui,
) -> tuple[FileObject, Upload]:
    upload = client.uploads.create(bytes=size, filename=path.name, mime_type=JSONL_MIME_TYPE, purpose="batch")
    part_ids: list[str] = []
    md5 = hashlib.md5(usedforsecurity=False)
    offset = 0
    try:
        with path.open("rb") as source:
            while offset < size:
                source.seek(offset)
                data = source.read(part_size)
                try:
                    part = client.uploads.parts.create(upload_id=upload.id, data=data)
                except openai.APIStatusError as exc:
                    if exc.status_code != 413:
                        raise
                    part_size = _smaller(len(data), exc)
                    ui.note(
                        f"the server refused a {len(data)}-byte part as too large; sending {part_size}-byte parts"
                    )
                    continue
                part_ids.append(part.id)
                md5.update(data)
                offset += len(data)
                advance(len(data))
        done = client.uploads.complete(upload_id=upload.id, part_ids=part_ids, md5=md5.hexdigest())
    except KeyboardInterrupt:
        ui.note(
            f"interrupted: upload {upload.id} is left pending (it expires unfinished); no batch was created"
        )
        raise
    if done.file is None:
        raise RuntimeError(f"upload {upload.id} completed without a file")
    return done.file, done


def download_files(
    client: openai.OpenAI, batch: Batch, directory: Path, ui: Ui
) -> dict[str, tuple[Path, int]]:
    """Write the batch's output and error files (those it has) into `directory`; kind -> (path, lines).
    Each is streamed to `<name>.part` and renamed when whole."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = output_paths(directory, batch.id)
    written: dict[str, tuple[Path, int]] = {}
    for kind, file_id in (("output", batch.output_file_id), ("errors", batch.error_file_id)):
        if not file_id:
            continue
        target = paths[kind]
        partial = target.with_name(target.name + ".part")
        lines = 0
        with client.files.with_streaming_response.content(file_id) as response:
            length = response.headers.get("content-length")
            with (
                ui.transfer(f"downloading {kind}", total=int(length) if length else None) as advance,
                partial.open("wb") as out,
            ):
                for chunk in response.iter_bytes(DOWNLOAD_CHUNK_BYTES):
                    out.write(chunk)
                    lines += chunk.count(b"\n")
                    advance(len(chunk))
        partial.replace(target)
        written[kind] = (target, lines)
    return written


def follow(client: openai.OpenAI, batch: Batch, interval: float, ui: Ui) -> Batch:
    """Poll the batch until it reaches a terminal status. Once it has been seen, the API may be
    unreachable (or answer 5xx/429) for UNREACHABLE_GRACE_SECONDS before this gives up. Ctrl-C raises
    WaitInterrupted with the last batch seen: the batch is never cancelled."""
    view: BatchView
    with ui.following(batch.id) as view:
        try:
            view.update(batch)
            lost_since: float | None = None
            while batch.status not in TERMINAL_STATUSES:
                time.sleep(interval)
                try:
                    batch = client.batches.retrieve(batch.id)
                except (openai.APIConnectionError, openai.InternalServerError, openai.RateLimitError) as exc:
                    now = time.monotonic()
                    lost_since = lost_since if lost_since is not None else now
                    if now - lost_since > UNREACHABLE_GRACE_SECONDS:
                        raise
                    view.lost(_one_line(exc))
                    continue
                lost_since = None
                view.update(batch)
        except KeyboardInterrupt:
            raise WaitInterrupted(batch) from None
    return batch


# --- commands ---------------------------------------------------------------------------------------


def submit(client: openai.OpenAI, args: argparse.Namespace, ui: Ui) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    metadata = parse_metadata(args.metadata)
    endpoint = args.endpoint or infer_endpoint_of_file(path)
    output_dir = Path(args.output_dir)
    if args.wait:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--output-dir {output_dir}: {exc.strerror}") from None

    input_file, upload = upload_input(client, path, args.part_size, ui)
    how = f" through the Uploads API ({upload.id})" if upload is not None else ""
    ui.note(f"uploaded {path} ({input_file.bytes} bytes) as {input_file.id}{how}")
    options: dict[str, Any] = {}
    if metadata:
        options["metadata"] = metadata
    if args.output_expires_after is not None:
        # extra_body: SDKs older than the parameter send it as well
        options["extra_body"] = {
            "output_expires_after": {"anchor": "created_at", "seconds": args.output_expires_after}
        }
    batch = client.batches.create(
        input_file_id=input_file.id,
        endpoint=endpoint,  # type: ignore[arg-type]  # whatever endpoint the server takes
        completion_window=args.completion_window,
        **options,
    )
    result: dict[str, Any] = {"batch": None, "input_file": dump(input_file), "upload": dump(upload)}
    if not args.wait:
        result["batch"] = dump(batch)
        if ui.json:
            emit_json(result)
        else:
            ui.result(batch.id)
            ui.note(f"created batch {batch.id} ({endpoint}); follow it with: batch-api wait {batch.id}")
        return ExitCode.COMPLETED

    ui.note(f"created batch {batch.id} ({endpoint})")
    batch = follow(client, batch, args.interval, ui)
    try:
        downloaded = download_files(client, batch, output_dir, ui)
    except KeyboardInterrupt:
        ui.note(f"interrupted while downloading; get the files with: batch-api download {batch.id}")
        raise
    result["batch"] = dump(batch)
    result["downloaded"] = _paths(downloaded)
    if ui.json:
        emit_json(result)
    else:
        ui.summary(batch, downloaded)
    return for_status(batch.status)


def status(client: openai.OpenAI, args: argparse.Namespace, ui: Ui) -> int:
    batch = client.batches.retrieve(args.batch_id)
    if ui.json:
        emit_json(dump(batch))
    else:
        ui.batch_details(batch)
    return for_status(batch.status)


def wait(client: openai.OpenAI, args: argparse.Namespace, ui: Ui) -> int:
    batch = follow(client, client.batches.retrieve(args.batch_id), args.interval, ui)
    if ui.json:
        emit_json(dump(batch))
    else:
        ui.summary(batch)
        if batch.output_file_id or batch.error_file_id:
            ui.note(f"download its files with: batch-api download {batch.id}")
    return for_status(batch.status)


def download(client: openai.OpenAI, args: argparse.Namespace, ui: Ui) -> int:
    batch = client.batches.retrieve(args.batch_id)
    downloaded: dict[str, tuple[Path, int]] = {}
    if batch.status in TERMINAL_STATUSES:
        downloaded = download_files(client, batch, Path(args.output_dir), ui)
    if ui.json:
        emit_json({"batch": dump(batch), "downloaded": _paths(downloaded)})
    elif batch.status in TERMINAL_STATUSES:
        ui.summary(batch, downloaded)
    else:
        ui.note(f"{batch.id} is still {batch.status}: nothing to download yet (batch-api wait {batch.id})")
    return for_status(batch.status)


def cancel(client: openai.OpenAI, args: argparse.Namespace, ui: Ui) -> int:
    batch = client.batches.cancel(args.batch_id)
    if ui.json:
        emit_json(dump(batch))
    else:
        ui.result(f"{batch.id} {batch.status}")
        if batch.status not in TERMINAL_STATUSES:
            ui.note(
                f"it ends 'cancelled' with its partial results; follow it with: batch-api wait {batch.id}"
            )
    return ExitCode.COMPLETED


def list_batches(client: openai.OpenAI, args: argparse.Namespace, ui: Ui) -> int:
    batches: list[Batch] = []
    # the API has no status filter: with one, read pages until enough match
    page_size = min(args.limit, 100) if args.status is None else 100
    for batch in client.batches.list(limit=page_size):
        if args.status is None or batch.status == args.status:
            batches.append(batch)
            if len(batches) >= args.limit:
                break
    if ui.json:
        emit_json({"object": "list", "data": [dump(b) for b in batches]})
    else:
        ui.batches_table(batches)
    return ExitCode.COMPLETED


def list_files(client: openai.OpenAI, args: argparse.Namespace, ui: Ui) -> int:
    options: dict[str, Any] = {"limit": min(args.limit, 10_000)}
    if args.purpose:
        options["purpose"] = args.purpose
    files: list[FileObject] = []
    for file in client.files.list(**options):
        files.append(file)
        if len(files) >= args.limit:
            break
    if ui.json:
        emit_json({"object": "list", "data": [dump(f) for f in files]})
    else:
        ui.files_table(files)
    return ExitCode.COMPLETED


def remove_files(client: openai.OpenAI, args: argparse.Namespace, ui: Ui) -> int:
    deleted = []
    for file_id in args.file_ids:
        deleted.append(client.files.delete(file_id))
        ui.result(f"deleted {file_id}")
    if ui.json:
        emit_json({"object": "list", "data": [dump(d) for d in deleted]})
    return ExitCode.COMPLETED


COMMANDS: dict[str, Callable[[openai.OpenAI, argparse.Namespace, Ui], int]] = {
    "submit": submit,
    "status": status,
    "wait": wait,
    "download": download,
    "cancel": cancel,
    "ls": list_batches,
    "files ls": list_files,
    "files rm": remove_files,
}


def _paths(downloaded: dict[str, tuple[Path, int]]) -> dict[str, str | None]:
    return {kind: str(downloaded[kind][0]) if kind in downloaded else None for kind in ("output", "errors")}


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, openai.APIConnectionError) and cause is not None and str(cause):
        text = f"{text.rstrip('.')}: {cause}"
    return " ".join(text.split())


def describe_error(exc: Exception, base_url: str) -> tuple[ExitCode, dict[str, Any]]:
    """A failed command's exit code and its error: `message` is one line for a person."""
    if isinstance(exc, UsageError):
        return ExitCode.USAGE, {"type": "usage", "message": str(exc)}
    if isinstance(exc, openai.APIStatusError):
        body = exc.body if isinstance(exc.body, dict) else {}
        # the envelope's message; else what answered (a proxy's page), which the SDK's message repeats
        message = body.get("message") or (exc.body if isinstance(exc.body, str) and exc.body else exc.message)
        return ExitCode.API_ERROR, {
            "type": "api",
            "status_code": exc.status_code,
            "code": body.get("code"),
            "message": " ".join(f"{exc.status_code} {message}".split()),
        }
    if isinstance(exc, openai.APIConnectionError):
        return ExitCode.CONNECTION, {
            "type": "connection",
            "message": f"cannot reach {base_url}: {_one_line(exc)}",
        }
    raise exc


def run(args: argparse.Namespace) -> int:
    ui = Ui(json_output=args.json)
    base_url = args.base_url or "the API"
    try:
        client = make_client(args)
        base_url = str(client.base_url)
        return COMMANDS[args.client_command](client, args, ui)
    except WaitInterrupted as stopped:
        batch = stopped.batch
        hint = f"batch-api wait {batch.id}" + (f" --base-url {args.base_url}" if args.base_url else "")
        ui.note(f"stopped waiting; batch {batch.id} is still {batch.status}; resume with: {hint}")
        if ui.json:
            emit_json({"error": {"type": "interrupted", "message": "stopped waiting", "batch": dump(batch)}})
        return ExitCode.INTERRUPTED
    except KeyboardInterrupt:
        ui.note("interrupted")
        return ExitCode.INTERRUPTED
    except BrokenPipeError:
        # the reader of stdout went away: say nothing more, and do not fail again flushing at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.BROKEN_PIPE
    except (UsageError, openai.APIStatusError, openai.APIConnectionError) as exc:
        code, error = describe_error(exc, base_url)
        ui.note(f"batch-api {args.client_command}: error: {error['message']}")
        if ui.json:
            emit_json({"error": {**error, "exit_code": int(code)}})
        return code
