"""The data bucket (file bodies, workflow state), its access-log bucket, and the metadata table."""

from __future__ import annotations

from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_s3 as s3
from constructs import Construct

import batch_api.adapters.aws.schema as schema
from infra.config import EnvConfig
from infra.nag import acknowledge, logical_id, wildcard

# finalize tags each output object expire-days=N (N = whole days it still has to live, 1..30)
EXPIRE_TAG = "expire-days"
MAX_EXPIRE_DAYS = 30
# workflow state (manifest, part files, journal) outlives its batch (<= 24 h window + finalize) by days
BATCH_STATE_DAYS = 7
# an Upload expires an hour after it is created; the sweep deletes the parts of expired ones where it
# runs, and this rule is the backstop for their bytes
UPLOAD_PARTS_DAYS = 2

_ATTRIBUTE_TYPES = {
    "S": dynamodb.AttributeType.STRING,
    "N": dynamodb.AttributeType.NUMBER,
    "B": dynamodb.AttributeType.BINARY,
}


def key_attribute(name: str) -> dynamodb.Attribute:
    """A key attribute typed as schema.KEY_ATTRIBUTES says."""
    return dynamodb.Attribute(name=name, type=_ATTRIBUTE_TYPES[dict(schema.KEY_ATTRIBUTES)[name]])


class Storage(Construct):
    def __init__(
        self, scope: Construct, id: str, *, config: EnvConfig, removal_policy: RemovalPolicy
    ) -> None:
        super().__init__(scope, id)
        destroy = removal_policy == RemovalPolicy.DESTROY

        self.access_logs = s3.Bucket(
            self,
            "AccessLogs",
            encryption=s3.BucketEncryption.S3_MANAGED,  # the only encryption S3 server access logging supports
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            enforce_ssl=True,
            lifecycle_rules=[
                s3.LifecycleRule(id="expire-logs", expiration=Duration.days(config.log_retention_days))
            ],
            removal_policy=removal_policy,
            auto_delete_objects=destroy,
        )
        acknowledge(
            self.access_logs,
            {"AwsSolutions-S1": "This is the server access log bucket; logging it into itself would loop."},
        )

        self.bucket = s3.Bucket(
            self,
            "Data",
            encryption=s3.BucketEncryption.S3_MANAGED,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            enforce_ssl=True,
            server_access_logs_bucket=self.access_logs,
            server_access_logs_prefix="data/",
            lifecycle_rules=[
                *(
                    s3.LifecycleRule(
                        id=f"{EXPIRE_TAG}-{days}",
                        tag_filters={EXPIRE_TAG: str(days)},
                        expiration=Duration.days(days),
                    )
                    for days in range(1, MAX_EXPIRE_DAYS + 1)
                ),
                s3.LifecycleRule(
                    id="abort-incomplete-multipart",
                    abort_incomplete_multipart_upload_after=Duration.days(1),
                ),
                s3.LifecycleRule(
                    id="expire-batch-state", prefix="batches/", expiration=Duration.days(BATCH_STATE_DAYS)
                ),
                s3.LifecycleRule(
                    id="expire-upload-parts", prefix="uploads/", expiration=Duration.days(UPLOAD_PARTS_DAYS)
                ),
            ],
            removal_policy=removal_policy,
            auto_delete_objects=destroy,
        )

        self.table = dynamodb.Table(
            self,
            "Metadata",
            partition_key=key_attribute(schema.PARTITION_KEY),
            sort_key=key_attribute(schema.SORT_KEY),
            billing_mode=dynamodb.BillingMode.PAY_PER_REQUEST,
            point_in_time_recovery_specification=dynamodb.PointInTimeRecoverySpecification(
                point_in_time_recovery_enabled=True
            ),
            encryption=dynamodb.TableEncryption.AWS_MANAGED,
            deletion_protection=not destroy,
            removal_policy=removal_policy,
            # DynamoDB deletes expired idempotency keys (lazily; readers treat them as absent already)
            time_to_live_attribute=schema.TTL_ATTRIBUTE,
        )
        for index_name, partition_key, sort_key in schema.GLOBAL_SECONDARY_INDEXES:
            self.table.add_global_secondary_index(
                index_name=index_name,
                partition_key=key_attribute(partition_key),
                sort_key=key_attribute(sort_key),
                projection_type=dynamodb.ProjectionType.ALL,
            )

    # Least privilege by key prefix (keys as in docs/architecture.md#data-layout): "files/" bodies, "uploads/" parts,
    # "batches/" workflow state. ListBucket lets a missing key answer 404 instead of 403.

    def grant_table(self, function: lambda_.Function, actions: frozenset[str]) -> None:
        """`actions` on the table and its GSIs (by-project lists, by-state sweeps): only what the
        function's code calls (`tests/integration/test_state_machine_moto.py` records the calls of
        every function and compares them with its policy)."""
        if not actions <= TABLE_ACTIONS:
            raise ValueError(f"not a data action of this table: {sorted(actions - TABLE_ACTIONS)}")
        _role(function).add_to_principal_policy(
            iam.PolicyStatement(
                actions=sorted(actions),
                resources=[self.table.table_arn, f"{self.table.table_arn}/index/*"],
            )
        )
        acknowledge(
            _role(function),
            {
                wildcard(f"<{logical_id(self.table)}.Arn>/index/*"): "Queries on this table's own GSIs "
                f"({', '.join(name for name, _, _ in schema.GLOBAL_SECONDARY_INDEXES)}); CDK grants them as index/*."
            },
        )

    def grant_objects(
        self,
        function: lambda_.Function,
        *,
        read: tuple[str, ...] = (),
        write: tuple[str, ...] = (),
        delete: tuple[str, ...] = (),
        tag: tuple[str, ...] = (),
    ) -> None:
        """`tag`: prefixes whose objects' expiry tag the function sets without writing them (a batch's
        end gives its input file its expiry back)."""
        statements = [
            (("s3:GetObject",), read),
            (("s3:PutObject", "s3:PutObjectTagging", "s3:AbortMultipartUpload"), write),
            (("s3:PutObjectTagging",), tuple(p for p in tag if p not in write)),
            (("s3:DeleteObject",), delete),
        ]
        role = _role(function)
        for actions, prefixes in statements:
            if prefixes:
                role.add_to_principal_policy(
                    iam.PolicyStatement(
                        actions=list(actions),
                        resources=[self.bucket.arn_for_objects(f"{prefix}*") for prefix in prefixes],
                    )
                )
        role.add_to_principal_policy(
            iam.PolicyStatement(actions=["s3:ListBucket"], resources=[self.bucket.bucket_arn])
        )
        bucket_id = logical_id(self.bucket)
        acknowledge(
            role,
            {
                wildcard(
                    f"<{bucket_id}.Arn>/{prefix}*"
                ): f"Objects under the {prefix} prefix of this bucket only; "
                "their keys hold generated ids, so no narrower resource exists."
                for prefix in {*read, *write, *delete}
            },
        )


# The DynamoDB actions the adapter (`adapters/aws/dynamodb.py`) calls, and who needs which:
READ_ITEMS = frozenset({"dynamodb:GetItem", "dynamodb:Query"})
PUT_ITEMS = frozenset({"dynamodb:PutItem"})  # new records, chunk progress, idempotency claims
UPDATE_ITEMS = frozenset({"dynamodb:UpdateItem"})  # conditional status changes
DELETE_PROGRESS = frozenset({"dynamodb:BatchWriteItem"})  # a batch's chunk progress, when it ends
LEASE_ITEMS = frozenset({"dynamodb:DeleteItem"})  # capacity leases given back (`adapters/aws/leases.py`)
# an input file's hold, deleted by every update that leaves its batch ended (the terminal commit, the
# announce after it); the API's creates put it, its deletes and the sweeps only read it
END_HOLDS = frozenset({"dynamodb:DeleteItem"})
TABLE_ACTIONS = READ_ITEMS | PUT_ITEMS | UPDATE_ITEMS | DELETE_PROGRESS | LEASE_ITEMS | END_HOLDS


def _role(function: lambda_.Function) -> iam.IRole:
    if function.role is None:
        raise ValueError(f"{function.node.path} has no role")
    return function.role
