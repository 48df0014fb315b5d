"""The custom EventBridge bus (one per environment) that announces every terminal batch status."""

from __future__ import annotations

from aws_cdk import CfnOutput, Duration, RemovalPolicy
from aws_cdk import aws_events as events
from constructs import Construct

from infra import outputs
from infra.config import EnvConfig
from infra.naming import kept_name

ARCHIVE_DAYS = 30


class Events(Construct):
    def __init__(
        self, scope: Construct, id: str, *, config: EnvConfig, removal_policy: RemovalPolicy
    ) -> None:
        super().__init__(scope, id)
        # kept on destroy in a retaining environment: then named for this stack's creation, so the next
        # deploy makes a bus of its own instead of failing on the kept one's name
        self.bus = events.EventBus(self, "Bus", event_bus_name=kept_name(config.bus_name, removal_policy))
        self.bus.apply_removal_policy(removal_policy)
        # replayable history of batch.* events, e.g. for a consumer that was down
        self.archive = self.bus.archive(
            "Archive",
            description=f"batch-api {config.name} batch status events",
            event_pattern=events.EventPattern(account=[self.bus.env.account]),
            retention=Duration.days(ARCHIVE_DAYS),
        )
        CfnOutput(
            self,
            "EventBusName",
            value=self.bus.event_bus_name,
            description="EventBridge bus for batch.* events",
        ).override_logical_id(outputs.EVENT_BUS_NAME)
