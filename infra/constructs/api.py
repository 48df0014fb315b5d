"""The REST API: one Lambda proxy ({proxy+}, ANY) running the Powertools resolver for every route.

Authentication is the handler's: the openai SDK sends `Authorization: Bearer <key>`, checked against
the keys in the API keys secret (each key is its own project, stored under a hash of the key); API
Gateway authorizers (IAM, Cognito) cannot check those keys.
"""

from __future__ import annotations

import json

from aws_cdk import CfnOutput, Duration, RemovalPolicy
from aws_cdk import aws_apigateway as apigateway
from aws_cdk import aws_iam as iam
from aws_cdk import aws_logs as logs
from aws_cdk import aws_secretsmanager as secretsmanager
from aws_cdk import aws_stepfunctions as sfn
from constructs import Construct

from batch_api.contract import limits
from batch_api.service.uploads import MAX_PART_BYTES
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
# A Lambda proxy event takes 6 MB each way and bodies travel base64 (contract/limits.py works out what
# fits): bigger files go through the Uploads API in parts of PART_SIZE, bigger downloads answer a 302.
MAX_REQUEST_BYTES = limits.proxy_max_request_bytes()
MAX_INLINE_DOWNLOAD_BYTES = limits.proxy_max_inline_download_bytes()
PART_SIZE = limits.part_size_for(MAX_REQUEST_BYTES, MAX_PART_BYTES)
# An Upload's complete assembles its file within one API request. Parts that arrive through the gateway
# are under S3's 5 MiB part minimum, so their bytes pass through the function (read 8 objects at a time,
# written 4 parts at a time: adapters/aws/s3.py). Assumed: 25 MiB/s each way, well under what one
# function reaches to S3 in its region, for the 20 s of the budget left after the rest of the request.
# Larger Uploads are refused when created (400 on `bytes`), before any part is sent.
ASSEMBLY_MIB_PER_SECOND = 25
ASSEMBLY_SECONDS = GATEWAY_TIMEOUT_SECONDS - 9
MAX_UPLOAD_BYTES = ASSEMBLY_SECONDS * ASSEMBLY_MIB_PER_SECOND * 1024 * 1024


def openai_error_template(error_type: str, message: str | None = None, code: str | None = None) -> str:
    """A gateway response body in the OpenAI envelope: `message`, or API Gateway's own (`messageString`
    is it JSON-quoted)."""
    text = json.dumps(message) if message is not None else "$context.error.messageString"
    return json.dumps(
        {"error": {"message": "@MESSAGE@", "type": error_type, "param": None, "code": code}},
        separators=(",", ":"),
    ).replace('"@MESSAGE@"', text)


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
                "BATCH_API_MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES),
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
        # Answers API Gateway makes itself (stage throttling, a Lambda error or timeout) keep the OpenAI
        # error envelope, with all four keys, like the handler's answers.
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
        # A body too large for the Lambda invoke (or over API Gateway's 10 MB) never reaches the handler:
        # API Gateway answers REQUEST_TOO_LARGE itself. Worded as the handler's own 413: the limit, a
        # part size that fits, and no retry (the same body would be refused again).
        self.rest_api.add_gateway_response(
            "RequestTooLarge",
            type=apigateway.ResponseType.REQUEST_TOO_LARGE,
            status_code="413",
            response_headers={"x-should-retry": "'false'", "Content-Type": "'application/json'"},
            templates={
                "application/json": openai_error_template(
                    "invalid_request_error",
                    limits.too_large_message(MAX_REQUEST_BYTES, PART_SIZE),
                    code="request_too_large",
                )
            },
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
