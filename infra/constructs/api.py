"""The REST API: one Lambda proxy ({proxy+}, ANY) running the Powertools resolver for every route.

Authentication is the handler's: the openai SDK sends `Authorization: Bearer <key>`, checked against
the keys in the API keys secret (each key is its own project, stored under a hash of the key); API
Gateway authorizers (IAM, Cognito) cannot check those keys.
"""

from __future__ import annotations

from aws_cdk import CfnOutput, Duration, RemovalPolicy
from aws_cdk import aws_apigateway as apigateway
from aws_cdk import aws_iam as iam
from aws_cdk import aws_logs as logs
from aws_cdk import aws_secretsmanager as secretsmanager
from aws_cdk import aws_stepfunctions as sfn
from constructs import Construct

from infra import outputs
from infra.config import EnvConfig
from infra.constructs.storage import PUT_ITEMS, READ_ITEMS, UPDATE_ITEMS, Storage
from infra.functions import FunctionFactory
from infra.nag import acknowledge, logical_id, wildcard

API_HANDLER = "batch_api.handlers.lambda_api.handler"
GATEWAY_TIMEOUT_SECONDS = 29  # API Gateway's integration timeout (REST API default)
# under the gateway's, so a request that runs long ends as the function's error (a 502 in the envelope,
# from the gateway responses) rather than the gateway's 504 while the function goes on working
API_TIMEOUT = Duration.seconds(GATEWAY_TIMEOUT_SECONDS - 1)
# A Lambda proxy takes 6 MB each way and binary bodies travel base64 (4/3 larger): ~4.5 MB of raw
# request and ~4 MB of inline download fit; bigger uploads use the Uploads API, bigger downloads a 302.
MAX_REQUEST_BYTES = 4_500_000
MAX_INLINE_DOWNLOAD_BYTES = 4_000_000


def openai_error_template(error_type: str) -> str:
    """A gateway response body in the OpenAI envelope; `messageString` is the message, JSON-quoted."""
    return (
        '{"error":{"message":$context.error.messageString,'
        f'"type":"{error_type}","param":null,"code":null}}}}'
    )


class Api(Construct):
    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        config: EnvConfig,
        functions: FunctionFactory,
        storage: Storage,
        api_keys_secret: secretsmanager.ISecret,
        state_machine: sfn.IStateMachine,
        log_retention: logs.RetentionDays,
        removal_policy: RemovalPolicy,
    ) -> None:
        super().__init__(scope, id)
        self.function = functions.create(
            self,
            "Handler",
            handler=API_HANDLER,
            description="batch-api: the OpenAI-compatible Files, Uploads and Batches API",
            timeout=API_TIMEOUT,
            memory_mb=config.api_memory_mb,
            reserved_concurrency=config.api_reserved_concurrency,
            environment={
                "BATCH_API_STATE_MACHINE_ARN": state_machine.state_machine_arn,
                "BATCH_API_API_KEYS_SECRET_NAME": config.api_keys_secret,
                "BATCH_API_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES),
                "BATCH_API_MAX_INLINE_DOWNLOAD_BYTES": str(MAX_INLINE_DOWNLOAD_BYTES),
                "POWERTOOLS_TRACER_CAPTURE_RESPONSE": "false",  # file downloads would bloat traces
            },
        )
        storage.grant_table(self.function, READ_ITEMS | PUT_ITEMS | UPDATE_ITEMS)
        # files/: uploads, reads, deletes, expiry tags; uploads/: Uploads API parts until complete
        # concatenates them into files/
        prefixes = ("files/", "uploads/")
        storage.grant_objects(self.function, read=prefixes, write=prefixes, delete=prefixes)
        # Download links are signed with this role's credentials, which the API assumes for an hour at a
        # time (adapters/aws/links.py): their expiry is known, so a link lives its whole stated lifetime
        # (signed with the function's own credentials it would die with them). It may only read files.
        assert self.function.role is not None
        self.link_signer = iam.Role(
            self,
            "DownloadLinkSigner",
            assumed_by=iam.ArnPrincipal(self.function.role.role_arn),
            description=f"batch-api {config.name}: signs download links of files (read only)",
            max_session_duration=Duration.hours(1),
        )
        self.link_signer.add_to_policy(
            iam.PolicyStatement(
                actions=["s3:GetObject"], resources=[storage.bucket.arn_for_objects("files/*")]
            )
        )
        self.link_signer.grant_assume_role(self.function.role)
        self.function.add_environment("BATCH_API_DOWNLOAD_SIGNER_ROLE_ARN", self.link_signer.role_arn)
        acknowledge(
            self.link_signer,
            {
                wildcard(f"<{logical_id(storage.bucket)}.Arn>/files/*"): "Reads the objects under the files/ "
                "prefix of this bucket only: the files whose download links it signs, by generated ids."
            },
        )
        state_machine.grant_start_execution(self.function)
        api_keys_secret.grant_read(self.function)

        self.access_logs = logs.LogGroup(
            self, "AccessLogs", retention=log_retention, removal_policy=removal_policy
        )
        self.rest_api = apigateway.LambdaRestApi(
            self,
            "RestApi",
            rest_api_name=f"batch-api-{config.name}",
            description=f"batch-api ({config.name}): OpenAI-compatible Files, Uploads and Batches API",
            handler=self.function,
            proxy=True,
            binary_media_types=["*/*"],  # multipart and file bodies arrive base64, byte-exact
            endpoint_types=[apigateway.EndpointType.REGIONAL],
            cloud_watch_role=True,  # stage logging needs the account's API Gateway -> CloudWatch role
            cloud_watch_role_removal_policy=RemovalPolicy.RETAIN,  # account-wide; other APIs may use it
            deploy_options=apigateway.StageOptions(
                stage_name=config.name,
                tracing_enabled=True,
                logging_level=apigateway.MethodLoggingLevel.ERROR,
                data_trace_enabled=False,  # request bodies are user data
                metrics_enabled=True,
                throttling_rate_limit=config.api_throttle_rate_limit,
                throttling_burst_limit=config.api_throttle_burst_limit,
                access_log_destination=apigateway.LogGroupLogDestination(self.access_logs),
                access_log_format=apigateway.AccessLogFormat.json_with_standard_fields(
                    caller=True,
                    http_method=True,
                    ip=True,
                    protocol=True,
                    request_time=True,
                    resource_path=True,
                    response_length=True,
                    status=True,
                    user=True,
                ),
            ),
        )
        # Answers API Gateway makes itself (stage throttling, a body over 10 MB, a Lambda error or
        # timeout) keep the OpenAI error envelope, with all four keys, like the handler's answers.
        for response_id, response_type, error_type in (
            ("Throttled", apigateway.ResponseType.THROTTLED, "rate_limit_exceeded"),
            ("Default4xx", apigateway.ResponseType.DEFAULT_4_XX, "invalid_request_error"),
            ("Default5xx", apigateway.ResponseType.DEFAULT_5_XX, "server_error"),
        ):
            self.rest_api.add_gateway_response(
                response_id,
                type=response_type,
                templates={"application/json": openai_error_template(error_type)},
            )
        self.base_url = f"{self.rest_api.url}v1"
        CfnOutput(
            self, "BaseUrl", value=self.base_url, description="openai SDK base_url"
        ).override_logical_id(outputs.BASE_URL)
        CfnOutput(
            self,
            "ApiKeysSecretName",
            value=api_keys_secret.secret_name,
            description="Secrets Manager secret holding the client API keys",
        ).override_logical_id(outputs.API_KEYS_SECRET_NAME)

        acknowledge(
            self.rest_api,
            {
                "AwsSolutions-APIG2": "Every request goes to the handler, which validates it against the OpenAI "
                "contract and answers 400 in the OpenAI error envelope; API Gateway models would duplicate that.",
                "AwsSolutions-APIG3": "WAF is left to the operator (an account-level choice with its own cost); "
                "the stage is throttled and every route checks a bearer API key.",
                "AwsSolutions-APIG4": "The handler authenticates each request with the OpenAI-style bearer API key "
                "(the keys in the API keys secret); IAM and Cognito authorizers cannot check those keys.",
                "AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/"
                "AmazonAPIGatewayPushToCloudWatchLogs]": "API Gateway's account-level logging role; this AWS managed "
                "policy is the documented one for it and only lets API Gateway write its own logs.",
                "AwsSolutions-COG4": "No Cognito: clients are openai SDKs authenticating with bearer API keys, "
                "which the handler checks.",
            },
        )
