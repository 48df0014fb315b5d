"""Webhook delivery on AWS: a rule on the bus for the terminal batch events -> an SQS queue (with a
dead-letter queue) -> the delivery function (`batch_api.handlers.webhooks`), which signs and POSTs
each event to the endpoints of its project and retries through the queue (`batch_api/webhooks/queue.py`).

The function reads the endpoints' secrets and nothing of the table or bucket: the event carries what it
sends. It runs outside any VPC, with a guard that calls only https URLs whose host resolves to public
addresses only, and connects to the address it checked.
"""

from __future__ import annotations

from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_lambda_event_sources as sources
from aws_cdk import aws_secretsmanager as secretsmanager
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from batch_api.webhooks.events import terminal_event_pattern
from infra.config import EnvConfig
from infra.constructs.monitoring import METRICS_NAMESPACE, SERVICE_NAME
from infra.functions import FunctionFactory

HANDLER = "batch_api.handlers.webhooks.handler"
GAVE_UP_METRIC = "WebhookGaveUp"  # batch_api.handlers.webhooks
# a batch of 5 messages, each one attempt of at most 10 s (an event only fans out)
FUNCTION_TIMEOUT = Duration.minutes(3)
BATCH_SIZE = 5
# at least the function's timeout (Lambda requires it): a message whose invocation died comes back then
VISIBILITY_TIMEOUT = Duration.minutes(15)
# the 72-hour retry window and then some; a retry is a visibility change, so one message lives it all
RETENTION = Duration.days(4)
# receives before the dead-letter queue: the ~80 attempts of 72 hours of backoff, with room to spare
MAX_RECEIVE_COUNT = 200


class Webhooks(Construct):
    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        config: EnvConfig,
        functions: FunctionFactory,
        bus: events.IEventBus,
        event_source: str,
        removal_policy: RemovalPolicy,
    ) -> None:
        super().__init__(scope, id)
        self.dead_letters = sqs.Queue(
            self,
            "DeadLetters",
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
            retention_period=Duration.days(14),
            removal_policy=removal_policy,
        )
        self.queue = sqs.Queue(
            self,
            "Queue",
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
            visibility_timeout=VISIBILITY_TIMEOUT,
            retention_period=RETENTION,
            dead_letter_queue=sqs.DeadLetterQueue(
                queue=self.dead_letters, max_receive_count=MAX_RECEIVE_COUNT
            ),
            removal_policy=removal_policy,
        )
        pattern = terminal_event_pattern(event_source)
        self.rule = events.Rule(
            self,
            "TerminalEvents",
            description="batch-api: terminal batch statuses to the webhook delivery queue",
            event_bus=bus,
            event_pattern=events.EventPattern(source=pattern["source"], detail_type=pattern["detail-type"]),
            targets=[targets.SqsQueue(self.queue)],
        )
        environment = {
            "BATCH_API_WEBHOOKS": config.webhooks_json,
            "BATCH_API_WEBHOOK_QUEUE_URL": self.queue.queue_url,
        }
        if config.webhooks:
            environment["BATCH_API_WEBHOOK_SECRETS_SECRET_NAME"] = config.webhook_secrets
        self.function: lambda_.Function = functions.create(
            self,
            "Function",
            handler=HANDLER,
            description="batch-api: delivers terminal batch events to the webhook endpoints, signed",
            timeout=FUNCTION_TIMEOUT,
            memory_mb=256,
            environment=environment,
        )
        # receive, delete and set visibility (the retries), and send (one delivery per failed endpoint)
        self.function.add_event_source(
            sources.SqsEventSource(self.queue, batch_size=BATCH_SIZE, report_batch_item_failures=True)
        )
        self.queue.grant_send_messages(self.function)
        if config.webhooks:
            secretsmanager.Secret.from_secret_name_v2(self, "Secrets", config.webhook_secrets).grant_read(
                self.function
            )
        self.dead_letters_alarm = self.dead_letters.metric_approximate_number_of_messages_visible(
            period=Duration.minutes(5), statistic="Maximum"
        ).create_alarm(
            self,
            "DeadLetterMessages",
            alarm_description="Webhook events the delivery function could not handle are in the dead-letter queue.",
            threshold=1,
            evaluation_periods=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        self.gave_up_alarm = cloudwatch.Metric(
            namespace=METRICS_NAMESPACE,
            metric_name=GAVE_UP_METRIC,
            dimensions_map={"service": SERVICE_NAME},
            period=Duration.minutes(5),
            statistic="Sum",
        ).create_alarm(
            self,
            "GaveUp",
            alarm_description="A webhook event was not delivered within 72 hours and was dropped.",
            threshold=1,
            evaluation_periods=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
