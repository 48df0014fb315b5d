"""The hourly sweep, on AWS: the function the local server runs on a timer (`service/housekeeping.py`),
its schedule, its grants and its alarm.

It removes expired files' records and bytes and the parts of expired pending uploads, and announces
the ends a crash left unannounced (which also drops those batches' progress and journals and an input
body kept for them). DynamoDB TTL (idempotency keys) and the bucket's lifecycle rules are the
backstops.
"""

from __future__ import annotations

from aws_cdk import Duration
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_lambda as lambda_
from constructs import Construct

from infra.config import EnvConfig
from infra.constructs.storage import DELETE_PROGRESS, END_HOLDS, READ_ITEMS, UPDATE_ITEMS, Storage
from infra.functions import FunctionFactory

HANDLER = "batch_api.handlers.workflow.housekeeping_handler"
SCHEDULE = Duration.hours(1)


class Housekeeping(Construct):
    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        config: EnvConfig,
        functions: FunctionFactory,
        storage: Storage,
        bus: events.IEventBus,
    ) -> None:
        super().__init__(scope, id)
        self.function: lambda_.Function = functions.create(
            self,
            "Function",
            handler=HANDLER,
            description="batch-api: hourly sweep of expired files and uploads, and unannounced batch ends",
            timeout=Duration.minutes(5),
            memory_mb=config.step_memory_mb,
        )
        # announcing an end a crash left unannounced: the update clearing the mark deletes the input's
        # hold again, and the batch's chunk progress goes
        storage.grant_table(self.function, READ_ITEMS | UPDATE_ITEMS | END_HOLDS | DELETE_PROGRESS)
        # files/ bodies (expired, or kept for an ended batch), uploads/ parts, batches/ journals
        storage.grant_objects(self.function, delete=("files/", "uploads/", "batches/"))
        bus.grant_put_events_to(self.function)  # the events a crash left unpublished
        events.Rule(
            self,
            "Schedule",
            description="batch-api: run the housekeeping sweep every hour",
            schedule=events.Schedule.rate(SCHEDULE),
            targets=[targets.LambdaFunction(self.function, retry_attempts=2)],
        )
        # Two failed runs in a row: expired data is piling up (or an end is left unannounced).
        self.errors_alarm = self.function.metric_errors(period=SCHEDULE, statistic="Sum").create_alarm(
            self,
            "Errors",
            alarm_description="The hourly housekeeping sweep failed twice in a row.",
            threshold=1,
            evaluation_periods=2,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
