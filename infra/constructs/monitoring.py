"""Alarms (failed executions, worker errors, plus those other constructs own) sent to one SNS topic per
environment, and one dashboard: batches, requests, upstream, errors, API."""

from __future__ import annotations

from aws_cdk import Duration
from aws_cdk import aws_apigateway as apigateway
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cloudwatch_actions
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions
from aws_cdk import aws_stepfunctions as sfn
from constructs import Construct

from infra.config import EnvConfig

# EMF metrics the handlers emit through Powertools Metrics (dimension "service")
METRICS_NAMESPACE = "BatchApi"
SERVICE_NAME = "batch-api"
PERIOD = Duration.minutes(5)


def app_metric(name: str, statistic: str, label: str, upstream: str | None = None) -> cloudwatch.Metric:
    """One of the handlers' metrics; with `upstream`, that upstream's (dimension "Upstream")."""
    dimensions = (
        {"service": SERVICE_NAME} if upstream is None else {"service": SERVICE_NAME, "Upstream": upstream}
    )
    return cloudwatch.Metric(
        namespace=METRICS_NAMESPACE,
        metric_name=name,
        dimensions_map=dimensions,
        statistic=statistic,
        period=PERIOD,
        label=label,
    )


class Monitoring(Construct):
    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        config: EnvConfig,
        state_machine: sfn.StateMachine,
        worker: lambda_.Function,
        functions: dict[str, lambda_.Function],
        rest_api: apigateway.RestApi,
        other_alarms: list[cloudwatch.Alarm],
    ) -> None:
        super().__init__(scope, id)
        if config.alarm_topic_arn:
            self.topic: sns.ITopic = sns.Topic.from_topic_arn(self, "AlarmTopic", config.alarm_topic_arn)
        else:
            self.topic = sns.Topic(
                self,
                "AlarmTopic",
                display_name=f"batch-api {config.name} alarms",
                enforce_ssl=True,
                master_key=kms.Alias.from_alias_name(self, "AlarmTopicKey", "alias/aws/sns"),
            )
            if config.alarm_email:
                self.topic.add_subscription(subscriptions.EmailSubscription(config.alarm_email))
        self.failed_executions_alarm = state_machine.metric_failed(
            period=PERIOD, statistic="Sum"
        ).create_alarm(
            self,
            "FailedExecutions",
            alarm_description="A batch workflow execution failed (its batch was marked failed).",
            threshold=1,
            evaluation_periods=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        self.worker_errors_alarm = worker.metric_errors(period=PERIOD, statistic="Sum").create_alarm(
            self,
            "WorkerErrors",
            alarm_description="The chunk worker (process) Lambda raised errors.",
            threshold=1,
            evaluation_periods=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )

        self.alarms = [self.failed_executions_alarm, self.worker_errors_alarm, *other_alarms]
        for alarm in self.alarms:
            alarm.add_alarm_action(cloudwatch_actions.SnsAction(self.topic))

        self.dashboard = cloudwatch.Dashboard(self, "Dashboard", dashboard_name=f"batch-api-{config.name}")
        self.dashboard.add_widgets(
            cloudwatch.GraphWidget(
                title="Batches (workflow executions)",
                left=[
                    state_machine.metric_started(period=PERIOD, label="started"),
                    state_machine.metric_succeeded(period=PERIOD, label="succeeded"),
                    state_machine.metric_failed(period=PERIOD, label="failed"),
                    state_machine.metric_timed_out(period=PERIOD, label="timed out"),
                ],
                width=8,
            ),
            cloudwatch.GraphWidget(
                title="Requests",
                left=[
                    app_metric("RequestsSucceeded", "Sum", "succeeded"),
                    app_metric("RequestsFailed", "Sum", "failed"),
                ],
                width=8,
            ),
            cloudwatch.GraphWidget(
                title="Upstream latency",
                left=[
                    app_metric("UpstreamLatency", "Average", "average"),
                    app_metric("UpstreamLatency", "p99", "p99"),
                ],
                width=8,
            ),
        )
        self.dashboard.add_widgets(
            cloudwatch.GraphWidget(
                title="Function errors and throttles",
                left=[
                    fn.metric_errors(period=PERIOD, label=f"{name} errors") for name, fn in functions.items()
                ],
                right=[
                    fn.metric_throttles(period=PERIOD, label=f"{name} throttles")
                    for name, fn in functions.items()
                ],
                width=8,
            ),
            cloudwatch.GraphWidget(
                title="API responses",
                left=[
                    rest_api.metric_count(period=PERIOD, label="requests"),
                    rest_api.metric_client_error(period=PERIOD, label="4xx"),
                    rest_api.metric_server_error(period=PERIOD, label="5xx"),
                ],
                width=8,
            ),
            cloudwatch.GraphWidget(
                title="API latency",
                left=[
                    rest_api.metric_latency(period=PERIOD, statistic="p50", label="p50"),
                    rest_api.metric_latency(period=PERIOD, statistic="p99", label="p99"),
                    rest_api.metric_integration_latency(
                        period=PERIOD, statistic="p99", label="integration p99"
                    ),
                ],
                width=8,
            ),
        )
        # per upstream (batch_api.upstreams.metered): slots leased across the workers against its
        # limit, each worker's adaptive limit, the queue of batches waiting for a slot, 429/503s; and
        # its latency beside it
        for spec in config.upstream_specs:
            self.dashboard.add_widgets(
                cloudwatch.GraphWidget(
                    title=f"Upstream {spec.name} (limit {spec.max_in_flight} in flight)",
                    left=[
                        app_metric("CapacityHeld", "Maximum", "slots leased", spec.name),
                        app_metric("UpstreamLimit", "Average", "adaptive limit per worker", spec.name),
                    ],
                    right=[
                        app_metric("CapacityWaitingBatches", "Maximum", "batches waiting", spec.name),
                        app_metric("UpstreamThrottled", "Sum", "429/503", spec.name),
                    ],
                    width=12,
                ),
                cloudwatch.GraphWidget(
                    title=f"Upstream {spec.name} latency (ms)",
                    left=[
                        app_metric("UpstreamLatency", "p50", "p50", spec.name),
                        app_metric("UpstreamLatency", "p99", "p99", spec.name),
                    ],
                    width=12,
                ),
            )
        self.dashboard.add_widgets(cloudwatch.AlarmStatusWidget(title="Alarms", alarms=self.alarms, width=24))
