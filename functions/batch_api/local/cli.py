"""`batch-api`: the command line of the local twin, and a client of any OpenAI-compatible Batch API.

    batch-api serve            the Batch API on http://127.0.0.1:8000/v1 (data in ./.batch-api)
    batch-api mock-upstream    the built-in deterministic mock as an OpenAI-compatible HTTP server
    batch-api submit|status|wait|download|cancel|ls|files
                               client commands (batch_api.client; the `cli` extra)

Every flag of `serve` has a BATCH_API_* environment variable; a flag wins over the variable.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import SecretStr, ValidationError

from batch_api.client.exit_codes import HELP as EXIT_CODES_HELP
from batch_api.client.exit_codes import ExitCode
from batch_api.client.parser import add_client_commands
from batch_api.config import Settings, redact_url
from batch_api.webhooks.endpoints import WebhookConfigError, parse_flag

logger = logging.getLogger("batch_api")

# flag -> settings field, for flags whose value passes through unchanged
_SERVE_FLAGS: list[tuple[str, str, type, str]] = [
    ("--host", "host", str, "interface to listen on (default 127.0.0.1)"),
    ("--port", "port", int, "port to listen on (default 8000)"),
    ("--data-dir", "data_dir", str, "where metadata and file bodies live (default ./.batch-api)"),
    ("--public-base-url", "public_base_url", str, "how clients reach this server, for download links"),
    ("--upstream-url", "upstream_url", str, "OpenAI-compatible base URL, e.g. http://localhost:8001/v1"),
    ("--upstream-timeout", "upstream_timeout_seconds", float, "seconds one upstream request may take (600)"),
    (
        "--upstream-max-retries",
        "upstream_max_retries",
        int,
        "retries on 429/5xx/timeouts/connection errors (5)",
    ),
    ("--upstream-backoff-base", "upstream_backoff_base_seconds", float, "first retry delay in seconds (0.5)"),
    (
        "--upstream-max-in-flight",
        "upstream_max_in_flight",
        int,
        "requests in flight to the upstream at most, across every batch (128)",
    ),
    (
        "--upstreams-file",
        "upstreams_file",
        str,
        "TOML file of several upstreams, routed by model (docs/capacity.md); replaces --upstream-url",
    ),
    ("--mock-latency", "mock_latency_seconds", float, "seconds the built-in mock waits per request (0)"),
    ("--chunk-max-lines", "chunk_max_lines", int, "requests per chunk (1000)"),
    ("--chunk-max-bytes", "chunk_max_bytes", int, "bytes of input per chunk (16 MiB)"),
    ("--chunk-concurrency", "chunk_concurrency", int, "chunks of one batch processed at once (4)"),
    ("--requests-per-chunk", "requests_per_chunk", int, "requests in flight per chunk (32)"),
    ("--completion-window-seconds", "completion_window_seconds", int, "length of the '24h' window (86400)"),
    ("--max-request-bytes", "max_request_bytes", int, "largest HTTP request body (80 MiB)"),
    ("--http-concurrency", "http_concurrency", int, "HTTP requests read and resolved at once (16)"),
    (
        "--webhooks-file",
        "webhooks_file",
        str,
        "TOML or JSON file of [[webhooks]] (url, secret, project, name): where terminal batch events go",
    ),
    ("--log-level", "log_level", str, "DEBUG, INFO, WARNING (INFO)"),
    (
        "--aws-endpoint-url",
        "aws_endpoint_url",
        str,
        "with --backend aws: endpoint for S3/DynamoDB/EventBridge",
    ),
    ("--aws-region", "aws_region", str, "with --backend aws: the region"),
    ("--table-name", "table_name", str, "with --backend aws (required): the DynamoDB table"),
    ("--bucket-name", "bucket_name", str, "with --backend aws (required): the S3 bucket"),
    ("--event-bus-name", "event_bus_name", str, "with --backend aws (required): the EventBridge bus"),
]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batch-api",
        description="An OpenAI-compatible Batch API (serve) and a client of any such API (submit, wait...).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"`batch-api COMMAND --help` shows a command's flags.\n\n{EXIT_CODES_HELP}",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the Batch API as one durable local process")
    for flag, field, kind, text in _SERVE_FLAGS:
        serve.add_argument(flag, dest=field, type=kind, default=None, help=text)
    serve.add_argument(
        "--backend",
        dest="backend",
        choices=["local", "aws"],
        default=None,
        help="'local' (SQLite + data dir, the default) or 'aws' (DynamoDB, S3, EventBridge)",
    )
    serve.add_argument(
        "--upstream",
        dest="upstream",
        choices=["mock", "http"],
        default=None,
        help="'mock' for the built-in deterministic mock (the default without --upstream-url)",
    )
    serve.add_argument(
        "--upstream-api-key",
        dest="upstream_api_key",
        default=None,
        help="API key sent upstream as a Bearer token (env BATCH_API_UPSTREAM_API_KEY; never logged)",
    )
    serve.add_argument(
        "--api-key",
        dest="api_keys",
        action="append",
        default=None,
        help="require this API key from clients (repeatable; each key is its own project)",
    )

    serve.add_argument(
        "--webhook",
        dest="webhook_flags",
        action="append",
        default=None,
        metavar="URL,SECRET[,PROJECT]",
        help="send terminal batch events to URL signed with SECRET (whsec_...), for PROJECT's batches (an "
        "API key of --api-key or a project id; default every project); repeatable",
    )

    mock = commands.add_parser(
        "mock-upstream", help="serve the deterministic mock as an OpenAI-compatible server"
    )
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, default=8001)
    mock.add_argument("--latency", type=float, default=0.0, help="seconds to wait before each answer")
    add_client_commands(commands)
    return parser


def run_client_command(args: argparse.Namespace) -> int:
    try:
        from batch_api.client.commands import run
    except ImportError as exc:  # the SDK or rich is not installed
        print(
            f"batch-api: the client commands need the cli extra ({exc.name} is missing): "
            "pip install -e '.[cli]' in a checkout",
            file=sys.stderr,
        )
        return ExitCode.USAGE
    return run(args)


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for _, field, _, _ in _SERVE_FLAGS:
        value = getattr(args, field)
        if value is not None:
            overrides[field] = value
    if args.upstream is not None:
        overrides["upstream"] = args.upstream
    if args.backend is not None:
        overrides["backend"] = args.backend
    if args.upstream_api_key is not None:
        overrides["upstream_api_key"] = SecretStr(args.upstream_api_key)
    if args.api_keys:
        overrides["api_keys"] = [SecretStr(k) for k in args.api_keys]
    if args.webhook_flags:
        overrides["webhooks"] = [parse_flag(value) for value in args.webhook_flags]
    return Settings(**overrides)


def serve(settings: Settings) -> int:
    from batch_api.local.bootstrap import DataDirLocked, build_local_app
    from batch_api.local.server import ApiAsgiApp, ResolverPool, build_server, listen
    from batch_api.service.housekeeping import sweep
    from batch_api.upstreams import UpstreamPool
    from batch_api.upstreams.capacity import GateStats

    if settings.upstreams_file is None and settings.upstream_kind == "http" and not settings.upstream_url:
        logger.error("--upstream http needs --upstream-url (or BATCH_API_UPSTREAM_URL)")
        return 2
    try:
        app = build_local_app(settings)
    except DataDirLocked as exc:
        logger.error("%s; stop it first or use another --data-dir", exc)
        return 2
    except ValueError as exc:  # the upstreams or webhooks: a bad file, URL or missing key variable
        logger.error("%s", exc)
        return 2
    try:
        sock = listen(settings.host, settings.port)
    except OSError as exc:
        logger.error("cannot listen on %s:%s: %s", settings.host, settings.port, exc)
        app.close()
        return 2

    if settings.upstreams_file is not None:
        for spec in app.deps.upstream_factory.specs:  # type: ignore[attr-defined]
            logger.info("upstream %s", spec.describe())
    elif settings.upstream_kind == "mock":
        logger.warning(
            "No upstream model server configured: using the built-in deterministic mock. "
            "Results are SYNTHETIC. Pass --upstream-url http://host:port/v1 to run real requests."
        )
    else:
        logger.info(
            "upstream: %s (API key %s)",
            redact_url(settings.upstream_url),
            "set" if settings.upstream_api_key else "not set",
        )
    if settings.backend == "aws":
        logger.info(
            "backend: aws (table %s, bucket %s, bus %s, endpoint %s); workflow steps run in-process",
            settings.table_name,
            settings.bucket_name,
            settings.event_bus_name,
            settings.aws_endpoint_url or "AWS",
        )
    else:
        logger.info("data directory: %s", settings.data_dir.resolve())
    if app.webhooks is not None:
        app.webhooks.start()  # before resume: an end a crash left unannounced is delivered too
    resumed = app.workflow.resume()
    if resumed:
        logger.info("resumed %d unfinished batch(es)", resumed)
    app.workflow.start_sweeper(lambda: sweep(app.deps))
    pool = app.deps.upstream_factory
    if isinstance(pool, UpstreamPool):
        seen: dict[str, GateStats] = {}

        def log_load() -> None:
            for line in pool.load_report(seen):
                logger.info("%s", line)

        app.workflow.every(settings.capacity_log_interval_seconds, log_load, name="capacity-log")

    resolvers = ResolverPool(app.api_factory, settings.http_concurrency)
    server = build_server(
        ApiAsgiApp(
            resolvers,
            blobs=app.blobs,
            signing_key=app.signing_key,
            settings=settings,
        ),
        on_started=lambda host, port: logger.info("Batch API listening on http://%s:%s/v1", host, port),
    )

    def stop(signum: int, _frame: Any) -> None:
        logger.info("received %s, shutting down", signal.Signals(signum).name)
        # a second signal does not wait for requests in flight
        server.request_exit(force=server.should_exit)
        app.workflow.begin_stop()  # running chunks wind down while the HTTP requests finish

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        resolvers.close()
        app.close()
    return 0


def describe(error: ValidationError) -> str:
    """What is wrong with the settings, without echoing the values (a URL may carry a password)."""
    lines = []
    for item in error.errors(include_input=False, include_url=False):
        where = ".".join(str(part) for part in item["loc"]) or "settings"
        lines.append(f"  {where}: {item['msg']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "client_command", None):
        return run_client_command(args)
    if args.command == "mock-upstream":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        from batch_api.upstreams.mock_server import run

        run(args.host, args.port, args.latency)
        return 0
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"batch-api: invalid settings:\n{describe(exc)}", file=sys.stderr)
        return 2
    except WebhookConfigError as exc:
        print(f"batch-api: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
