"""The stack's outputs, by the keys readers look them up with (`aws cloudformation describe-stacks`,
`infra/smoke.py`).

CDK names an output made inside a construct by its path plus a hash (`ApiBaseUrl6CEEB3A1`); each of
these is given its plain key instead, so a reader never has to guess. No CDK import here: the smoke
test reads these keys without loading the CDK.
"""

from __future__ import annotations

BASE_URL = "BaseUrl"  # the openai SDK's base_url: https://<api>.execute-api.<region>.amazonaws.com/<env>/v1
EVENT_BUS_NAME = "EventBusName"  # the bus that announces batch.* events
API_KEYS_SECRET_NAME = "ApiKeysSecretName"  # the Secrets Manager secret holding the client API keys
ALARM_TOPIC_ARN = "AlarmTopicArn"  # where alarms go
