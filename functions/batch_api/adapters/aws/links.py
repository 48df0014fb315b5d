"""Download links signed with credentials that outlive them.

A presigned URL stops working when the credentials that signed it expire, whatever its own stated
lifetime, and the credentials of a Lambda's role carry no expiry the code can read. So the API signs
links with the credentials of a role it assumes for that alone (`download_signer_role_arn`: it may
only read the files), for an hour, role chaining's most: their expiry is known, and a link is signed
only with credentials that live at least its lifetime more; else the role is assumed again (with
30-minute links, about every half hour).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

ASSUME_SECONDS = 3600  # the longest session role chaining allows
MARGIN_SECONDS = 60  # clocks differ a little; a link should not die in its last seconds
SESSION_NAME = "batch-api-download-links"


class AssumedRoleSigner:
    """The S3 client to sign a link of `lifetime` seconds with (call it): one on credentials of the
    signer role that outlive the link. Thread-safe; the STS call is made on first use, not when built."""

    def __init__(
        self,
        sts: Any,
        role_arn: str,
        make_s3: Callable[[dict[str, Any]], Any],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.sts = sts
        self.role_arn = role_arn
        self.make_s3 = make_s3  # credentials (STS's AccessKeyId, SecretAccessKey, SessionToken) -> client
        self.clock = clock
        self._lock = threading.Lock()
        self._client: Any = None
        self._expires_at = float("-inf")

    @property
    def expires_at(self) -> float:
        """When the credentials links are signed with now expire (-inf before the first link)."""
        return self._expires_at

    def __call__(self, lifetime: int) -> Any:
        with self._lock:
            if self._expires_at - self.clock() < lifetime + MARGIN_SECONDS:
                answer = self.sts.assume_role(
                    RoleArn=self.role_arn, RoleSessionName=SESSION_NAME, DurationSeconds=ASSUME_SECONDS
                )
                credentials = answer["Credentials"]
                self._client = self.make_s3(credentials)
                self._expires_at = credentials["Expiration"].timestamp()
            return self._client
