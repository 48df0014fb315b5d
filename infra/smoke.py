"""After `cdk deploy`: show that an environment's stack really works in the account.

`make smoke ENV=dev` (`python -m infra.smoke --env dev` from the repository root) runs, with the
caller's AWS credentials (boto3's default chain; AWS_PROFILE and AWS_REGION, or --profile and
--region):

1. the stack's outputs (`BaseUrl`, `EventBusName`, `ApiKeysSecretName`), the stack named as the CDK
   app names it (infra/config.py);
2. a client API key: the first one in the API keys secret;
3. `GET /health`;
4. a temporary SQS queue, fed by a temporary rule on the stack's bus that matches the batch.completed
   event of this run's batch. The batch id is only known once the batch exists, and the rule must
   be in place before then, so the rule matches a token the batch carries in its metadata; the event
   that arrives is checked against the batch id;
5. with the official openai SDK: a small input file (`--requests` tiny chat completions for
   `--model`), a batch over it, polled with backoff until it is `completed` (`--timeout`);
6. the output file: every custom_id back, answered 200;
7. the batch.completed event of this batch, on the queue (`--event-timeout`).

Whatever happens, it then removes what it made: the files (through the API; a batch still running
is cancelled first), the rule's target, the rule, the queue. The batch record stays: the Batch API
has no way to delete one. Exit status 0 when every check passed; otherwise 1, with one line on
stderr saying which check failed.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import math
import os
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

REPO_ROOT = Path(__file__).resolve().parent.parent
FUNCTIONS_DIR = REPO_ROOT / "functions"
if str(FUNCTIONS_DIR) not in sys.path:  # batch_api's constants, also without an editable install
    sys.path.append(str(FUNCTIONS_DIR))

import boto3  # noqa: E402
import openai  # noqa: E402
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError  # noqa: E402

from batch_api.adapters.aws.eventbridge import EVENT_SOURCE  # noqa: E402
from batch_api.adapters.aws.secrets import ApiKeysSecretError, parse_api_keys  # noqa: E402
from infra import outputs  # noqa: E402
from infra.config import ConfigError, load_env_config  # noqa: E402

CDK_JSON = REPO_ROOT / "cdk.json"
ENDPOINT: Final = "/v1/chat/completions"
DEFAULT_MODEL = "gpt-4o-mini"  # cdk.json's upstreams (OpenAI, any model) serve it, as does the mock
MAX_REQUESTS = 10  # the upstream may be a paid one: a smoke test sends a handful of tiny requests
COMPLETED_EVENT = "batch.completed"  # workflow/terminal.py publishes batch.<status>
RUN_TOKEN_KEY = "batch_api_smoke_run"  # the batch's metadata key the rule matches
NAME_PREFIX = "batch-api-smoke"  # of the queue and rule; `<prefix>-<env>-<run token>`
TARGET_ID = "smoke-queue"
# a stack whose last operation left it working (an update rolled back: the previous version works)
USABLE_STACK_STATUSES = frozenset(
    {"CREATE_COMPLETE", "UPDATE_COMPLETE", "UPDATE_ROLLBACK_COMPLETE", "IMPORT_COMPLETE"}
)
TERMINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})
POLL_FIRST_SECONDS = 1.0
POLL_MAX_SECONDS = 15.0
POLL_FACTOR = 1.5
PROGRESS_EVERY_SECONDS = 30.0  # a line even while nothing changes, so a long wait shows it is alive
SQS_MAX_WAIT_SECONDS = 20  # ReceiveMessage's longest long poll
QUEUE_RETENTION_SECONDS = 3600  # a queue left behind (its removal failed) keeps the event an hour, no more


class SmokeFailed(Exception):
    """A check failed; the message is the one-line reason."""


class Timeline:
    """Prints each step with the seconds since the start."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def step(self, message: str) -> None:
        print(f"[{self.elapsed():7.1f}s] {message}", flush=True)


class Cleanup:
    """What the run made, removed newest first; every removal is tried, whatever failed before it.
    An undo that returns a string says what it did (else "removed <what>" is printed)."""

    def __init__(self, timeline: Timeline) -> None:
        self.timeline = timeline
        self._undo: list[tuple[str, Callable[[], object]]] = []

    def add(self, what: str, undo: Callable[[], object]) -> None:
        self._undo.append((what, undo))

    def run(self) -> list[str]:
        """Remove everything; the removals that failed, each with its reason."""
        failures: list[str] = []
        while self._undo:
            what, undo = self._undo.pop()
            try:
                done = undo()
            except Exception as exc:  # one failed removal must not keep the others from running
                failures.append(f"{what} ({describe(exc)})")
                self.timeline.step(f"could not remove {what}: {describe(exc)}")
            else:
                self.timeline.step(done if isinstance(done, str) else f"removed {what}")
        return failures


@dataclass(frozen=True)
class StackOutputs:
    stack_name: str
    status: str
    base_url: str
    event_bus_name: str
    api_keys_secret_name: str


def stack_name_of(env: str, cdk_json: Path = CDK_JSON) -> str:
    """The stack the CDK app deploys for `env` (infra/app.py names it by `EnvConfig.stack_name`)."""
    context = json.loads(cdk_json.read_text())["context"]
    environments = context.get("environments") or {}
    if env not in environments:
        raise SmokeFailed(
            f"no environment {env!r} in cdk.json (it defines {', '.join(sorted(environments))})"
        )
    try:
        return load_env_config(context, env).stack_name
    except ConfigError as exc:
        raise SmokeFailed(str(exc).splitlines()[0]) from exc


def read_outputs(cloudformation: Any, stack_name: str) -> StackOutputs:
    region = cloudformation.meta.region_name
    try:
        [stack] = cloudformation.describe_stacks(StackName=stack_name)["Stacks"]
    except ClientError as exc:
        if "does not exist" in str(exc):
            raise SmokeFailed(
                f"stack {stack_name} not found in {region}: deploy it first, or check AWS_PROFILE/AWS_REGION"
            ) from exc
        raise
    status = stack["StackStatus"]
    if status not in USABLE_STACK_STATUSES:
        raise SmokeFailed(f"stack {stack_name} in {region} is {status}, not deployed and settled")
    values = {output["OutputKey"]: output["OutputValue"] for output in stack.get("Outputs", [])}
    wanted = (outputs.BASE_URL, outputs.EVENT_BUS_NAME, outputs.API_KEYS_SECRET_NAME)
    missing = [key for key in wanted if key not in values]
    if missing:
        raise SmokeFailed(
            f"stack {stack_name} has no output {', '.join(missing)} (deployed by an older version? deploy again)"
        )
    return StackOutputs(
        stack_name=stack_name,
        status=status,
        base_url=values[outputs.BASE_URL].rstrip("/"),
        event_bus_name=values[outputs.EVENT_BUS_NAME],
        api_keys_secret_name=values[outputs.API_KEYS_SECRET_NAME],
    )


def read_client_key(secretsmanager: Any, secret_name: str) -> str:
    """The first client API key in the secret, read as the API reads it (adapters/aws/secrets.py)."""
    answer = secretsmanager.get_secret_value(SecretId=secret_name)
    value = answer.get("SecretString", answer.get("SecretBinary"))
    if value is None:
        raise SmokeFailed(f"secret {secret_name} has no value")
    try:
        return parse_api_keys(secret_name, value)[0].get_secret_value()
    except ApiKeysSecretError as exc:
        raise SmokeFailed(str(exc)) from exc


def health_url(base_url: str) -> str:
    """`/health` sits beside `/v1` (at the stage's root on API Gateway)."""
    return base_url.rstrip("/").removesuffix("/v1") + "/health"


def check_health(base_url: str, timeout: float = 15.0) -> str:
    url = health_url(base_url)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            body = answer.read()
    except urllib.error.HTTPError as exc:
        raise SmokeFailed(f"GET {url} answered {exc.code}") from exc
    except OSError as exc:
        raise SmokeFailed(f"GET {url} failed: {exc}") from exc
    try:
        status = json.loads(body).get("status")
    except (ValueError, AttributeError):
        status = None
    if status != "ok":
        raise SmokeFailed(f"GET {url} answered {body[:200]!r}, not {{'status': 'ok'}}")
    return url


def event_pattern(run_token: str) -> dict[str, Any]:
    return {
        "source": [EVENT_SOURCE],
        "detail-type": [COMPLETED_EVENT],
        "detail": {"metadata": {RUN_TOKEN_KEY: [run_token]}},
    }


def queue_policy(queue_arn: str, rule_arn: str) -> dict[str, Any]:
    """EventBridge may send to the queue on behalf of that one rule only."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "SmokeRuleOnly",
                "Effect": "Allow",
                "Principal": {"Service": "events.amazonaws.com"},
                "Action": "sqs:SendMessage",
                "Resource": queue_arn,
                "Condition": {"ArnEquals": {"aws:SourceArn": rule_arn}},
            }
        ],
    }


class EventWatch:
    """A temporary queue fed by a temporary rule on `bus` matching the batch.completed event of the
    batch that carries `run_token` in its metadata."""

    def __init__(self, events: Any, sqs: Any, bus: str, name: str, run_token: str) -> None:
        self.events, self.sqs, self.bus, self.name, self.run_token = events, sqs, bus, name, run_token
        self.queue_url = ""

    def open(self, cleanup: Cleanup) -> None:
        """Queue, rule, the queue's policy, the rule's target: each registered for removal as soon as it
        exists (the cleanup removes the target, then the rule, then the queue)."""
        self.queue_url = self.sqs.create_queue(
            QueueName=self.name,
            Attributes={
                "MessageRetentionPeriod": str(QUEUE_RETENTION_SECONDS),
                "SqsManagedSseEnabled": "true",
            },
        )["QueueUrl"]
        queue_url = self.queue_url
        cleanup.add(f"queue {self.name}", lambda: self.sqs.delete_queue(QueueUrl=queue_url))
        queue_arn = self.sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])[
            "Attributes"
        ]["QueueArn"]
        rule_arn = self.events.put_rule(
            Name=self.name,
            EventBusName=self.bus,
            EventPattern=json.dumps(event_pattern(self.run_token)),
            State="ENABLED",
            Description="batch-api smoke test (temporary): this run's batch.completed",
        )["RuleArn"]
        cleanup.add(
            f"rule {self.name}", lambda: self.events.delete_rule(Name=self.name, EventBusName=self.bus)
        )
        self.sqs.set_queue_attributes(
            QueueUrl=queue_url, Attributes={"Policy": json.dumps(queue_policy(queue_arn, rule_arn))}
        )
        answer = self.events.put_targets(
            Rule=self.name, EventBusName=self.bus, Targets=[{"Id": TARGET_ID, "Arn": queue_arn}]
        )
        if answer.get("FailedEntryCount", 0):
            entry = answer["FailedEntries"][0]
            raise SmokeFailed(
                f"rule {self.name} took no target: {entry['ErrorCode']} {entry['ErrorMessage']}"
            )
        cleanup.add(
            f"target of rule {self.name}",
            lambda: self.events.remove_targets(Rule=self.name, EventBusName=self.bus, Ids=[TARGET_ID]),
        )

    def wait_for(self, batch_id: str, timeout: float) -> dict[str, Any]:
        """The batch.completed event of `batch_id`, or SmokeFailed once `timeout` seconds have passed."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            answer = self.sqs.receive_message(
                QueueUrl=self.queue_url,
                MaxNumberOfMessages=10,
                WaitTimeSeconds=min(SQS_MAX_WAIT_SECONDS, math.ceil(remaining)),
            )
            for message in answer.get("Messages", []):
                event = json.loads(message["Body"])
                if (
                    event.get("detail-type") == COMPLETED_EVENT
                    and event.get("detail", {}).get("id") == batch_id
                ):
                    return dict(event)
        raise SmokeFailed(
            f"no {COMPLETED_EVENT} event for {batch_id} reached queue {self.name} within {timeout:g}s "
            f"(rule {self.name} on bus {self.bus})"
        )


def request_lines(model: str, count: int) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"smoke-{i}",
            "method": "POST",
            "url": ENDPOINT,
            "body": {
                "model": model,
                "messages": [{"role": "user", "content": f"Reply with the number {i}."}],
            },
        }
        for i in range(1, count + 1)
    ]


def _counts(batch: Any) -> str:
    counts = batch.request_counts
    if counts is None or not counts.total:  # validating: the requests are not counted yet
        return str(batch.status)
    return f"{batch.status}: {counts.completed}/{counts.total} done, {counts.failed} failed"


def wait_until_ended(client: openai.OpenAI, batch_id: str, timeout: float, timeline: Timeline) -> Any:
    """The batch once it is terminal, polled with backoff; SmokeFailed when `timeout` passes first."""
    deadline = time.monotonic() + timeout
    delay = POLL_FIRST_SECONDS
    shown, shown_at = "", 0.0
    while True:
        batch = client.batches.retrieve(batch_id)
        progress = _counts(batch)
        if progress != shown or time.monotonic() - shown_at >= PROGRESS_EVERY_SECONDS:
            timeline.step(f"batch {batch_id} {progress}")
            shown, shown_at = progress, time.monotonic()
        if batch.status in TERMINAL_STATUSES:
            return batch
        if time.monotonic() + delay > deadline:
            raise SmokeFailed(f"batch {batch_id} still {progress} after {timeout:g}s")
        time.sleep(delay)
        delay = min(delay * POLL_FACTOR, POLL_MAX_SECONDS)


def _first_error(batch: Any) -> str:
    errors = batch.errors.data if batch.errors and batch.errors.data else []
    if not errors:
        return "no errors given"
    error = errors[0]
    return f"{error.code}: {error.message}" + (f" (line {error.line})" if error.line else "")


def _lines(client: openai.OpenAI, file_id: str | None) -> Iterable[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).content.splitlines() if line.strip()]


def _why_not_200(line: dict[str, Any]) -> str:
    response, error = line.get("response"), line.get("error")
    if isinstance(response, dict):
        body = response.get("body")
        message = body.get("error", {}).get("message") if isinstance(body, dict) else None
        return f"answered {response.get('status_code')}" + (f": {message}" if message else "")
    if isinstance(error, dict):
        return f"failed: {error.get('code')}: {error.get('message')}"
    return "came back with neither a response nor an error"


def check_results(client: openai.OpenAI, batch: Any, custom_ids: Sequence[str]) -> None:
    """Every custom_id back exactly once, in the output file, answered 200."""
    if batch.status != "completed":
        raise SmokeFailed(f"batch {batch.id} ended {batch.status}: {_first_error(batch)}")
    results: dict[str, dict[str, Any]] = {}
    for line in [*_lines(client, batch.output_file_id), *_lines(client, batch.error_file_id)]:
        if line.get("custom_id") in results:
            raise SmokeFailed(f"batch {batch.id}: {line['custom_id']} came back twice")
        results[str(line.get("custom_id"))] = line
    missing = [custom_id for custom_id in custom_ids if custom_id not in results]
    if missing:
        raise SmokeFailed(f"batch {batch.id}: no result for {', '.join(missing)}")
    for custom_id in custom_ids:
        response = results[custom_id].get("response")
        if not isinstance(response, dict) or response.get("status_code") != 200:
            raise SmokeFailed(f"batch {batch.id}: {custom_id} {_why_not_200(results[custom_id])}")
    unexpected = sorted(set(results) - set(custom_ids))
    if unexpected:
        raise SmokeFailed(f"batch {batch.id}: results for requests never sent: {', '.join(unexpected)}")


def _cancel_if_running(client: openai.OpenAI, batch_id: str) -> str:
    status = client.batches.retrieve(batch_id).status
    if status in TERMINAL_STATUSES:
        return f"batch {batch_id} is {status}: nothing to cancel (the API keeps batch records)"
    client.batches.cancel(batch_id)
    return f"cancelled batch {batch_id} (it was {status})"


def run(args: argparse.Namespace, timeline: Timeline, cleanup: Cleanup) -> None:
    """Every check, in order; whatever is made goes on `cleanup` the moment it exists."""
    stack_name = stack_name_of(args.env)
    session = boto3.Session(profile_name=args.profile or None, region_name=args.region or None)
    if not session.region_name:
        raise SmokeFailed("no AWS region: set AWS_REGION (or a region in your AWS profile, or --region)")
    found = read_outputs(session.client("cloudformation"), stack_name)
    timeline.step(f"stack {stack_name} ({found.status}) in {session.region_name}: {found.base_url}")

    api_key = read_client_key(session.client("secretsmanager"), found.api_keys_secret_name)
    timeline.step(f"client API key read from secret {found.api_keys_secret_name}")

    timeline.step(f"GET {check_health(found.base_url)}: ok")

    run_token = uuid.uuid4().hex[:12]
    name = f"{NAME_PREFIX}-{args.env}-{run_token}"
    watch = EventWatch(session.client("events"), session.client("sqs"), found.event_bus_name, name, run_token)
    watch.open(cleanup)
    timeline.step(f"queue {name} subscribed to bus {found.event_bus_name} by rule {name}")

    client = openai.OpenAI(base_url=found.base_url, api_key=api_key, max_retries=2, timeout=60.0)
    lines = request_lines(args.model, args.requests)
    body = "".join(json.dumps(line) + "\n" for line in lines).encode()
    input_file = client.files.create(file=("batch-api-smoke.jsonl", io.BytesIO(body)), purpose="batch")
    cleanup.add(f"file {input_file.id}", lambda: client.files.delete(input_file.id))
    timeline.step(f"uploaded {input_file.id}: {len(lines)} request(s) to {ENDPOINT} for {args.model}")

    batch = client.batches.create(
        input_file_id=input_file.id,
        endpoint=ENDPOINT,
        completion_window="24h",
        metadata={RUN_TOKEN_KEY: run_token},
    )
    cleanup.add(f"batch {batch.id} (cancel)", lambda: _cancel_if_running(client, batch.id))
    timeline.step(f"created batch {batch.id}")

    batch = wait_until_ended(client, batch.id, args.timeout, timeline)
    for file_id in (batch.output_file_id, batch.error_file_id):
        if file_id:
            cleanup.add(f"file {file_id}", functools.partial(client.files.delete, file_id))
    check_results(client, batch, [line["custom_id"] for line in lines])
    timeline.step(f"output file {batch.output_file_id}: all {len(lines)} custom_id(s) answered 200")

    watch.wait_for(batch.id, args.event_timeout)
    timeline.step(f"{COMPLETED_EVENT} event for {batch.id} arrived on queue {name}")


def describe(exc: BaseException) -> str:
    """One line for an error of the SDKs."""
    if isinstance(exc, openai.APIStatusError):
        request = exc.response.request
        return f"{request.method} {request.url} answered {exc.status_code}: {exc.message}"
    if isinstance(exc, openai.APIConnectionError):
        return f"could not reach the API: {exc.__cause__ or exc}"
    if isinstance(exc, NoCredentialsError):
        return "no AWS credentials found: set AWS_PROFILE (or sign in, e.g. aws sso login)"
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return f"{exc.operation_name} failed: {error.get('Code')}: {error.get('Message')}"
    return " ".join(str(exc).split()) or type(exc).__name__


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m infra.smoke",
        description="Check that a deployed batch-api stack works: health, a small batch through the "
        "openai SDK, its output and its batch.completed event. Removes what it creates.",
    )
    parser.add_argument("--env", required=True, help="the environment in cdk.json (stack BatchApi-<env>)")
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"model of the requests (default {DEFAULT_MODEL})"
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=2,
        choices=range(1, MAX_REQUESTS + 1),
        metavar=f"1..{MAX_REQUESTS}",
        help="tiny chat completions in the batch (default 2)",
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for the batch to complete")
    parser.add_argument(
        "--event-timeout", type=float, default=120.0, help="seconds for its event to reach the queue"
    )
    parser.add_argument("--profile", default=os.environ.get("AWS_PROFILE"), help="default: AWS_PROFILE")
    parser.add_argument("--region", default=os.environ.get("AWS_REGION"), help="default: AWS_REGION")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    timeline = Timeline()
    cleanup = Cleanup(timeline)
    failure: str | None = None
    try:
        run(args, timeline, cleanup)
    except SmokeFailed as exc:
        failure = str(exc)
    except (openai.OpenAIError, BotoCoreError, ClientError) as exc:
        failure = describe(exc)
    finally:
        leftovers = cleanup.run()  # also on Ctrl-C and on a bug, which then go on with their traceback
    if leftovers:
        left = f"could not remove {'; '.join(leftovers)}"
        failure = left if failure is None else f"{failure}; and {left}"
    if failure is not None:
        print(f"smoke test of {args.env} FAILED: {failure}", file=sys.stderr, flush=True)
        return 1
    timeline.step(f"smoke test of {args.env} passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
