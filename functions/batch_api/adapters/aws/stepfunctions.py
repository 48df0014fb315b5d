"""Workflow on AWS Step Functions: one STANDARD execution per batch, named after the batch."""

from __future__ import annotations

import json
from typing import Any

from botocore.exceptions import ClientError


class StepFunctionsWorkflow:
    """ports.Workflow. The execution name is the batch id, so a second start of one batch is harmless:
    Step Functions returns the running execution for the same name and input, and answers
    ExecutionAlreadyExists for a closed one (names stay taken for 90 days), which is success here too."""

    def __init__(self, client: Any, state_machine_arn: str) -> None:
        self.client = client
        self.state_machine_arn = state_machine_arn

    def start(self, project_id: str, batch_id: str) -> None:
        try:
            self.client.start_execution(
                stateMachineArn=self.state_machine_arn,
                name=batch_id,
                input=json.dumps({"project_id": project_id, "batch_id": batch_id}),
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "ExecutionAlreadyExists":
                raise
