"""S3-compatible artifact store: the only module that talks to S3."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import boto3
from botocore.config import Config


class StorageError(RuntimeError):
    """The artifact store is unreachable, refuses the credentials, or holds a corrupt object."""


@dataclass(frozen=True)
class S3Config:
    """Where the store is and how to sign requests; any S3-compatible endpoint works."""

    endpoint_url: str | None      # None = AWS S3
    access_key: str
    secret_key: str
    bucket: str
    region: str = "us-east-1"

    def __repr__(self) -> str:    # never print the secret
        return f"S3Config(endpoint_url={self.endpoint_url!r}, bucket={self.bucket!r}, access_key=***)"

    @classmethod
    def from_env(cls, env: os._Environ | dict | None = None) -> "S3Config":
        """Read SEGPIPE_S3_ENDPOINT, SEGPIPE_S3_BUCKET, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY."""
        env = os.environ if env is None else env
        missing = [k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not env.get(k)]
        if missing:
            raise StorageError(
                f"S3 credentials missing: {', '.join(missing)} not set. Run `segpipe stack up` and "
                "`source .segpipe/credentials.env`, or export the credentials of your S3 endpoint."
            )
        return cls(
            endpoint_url=env.get("SEGPIPE_S3_ENDPOINT") or None,
            access_key=env["AWS_ACCESS_KEY_ID"],
            secret_key=env["AWS_SECRET_ACCESS_KEY"],
            bucket=env.get("SEGPIPE_S3_BUCKET", "segpipe"),
            region=env.get("AWS_DEFAULT_REGION", "us-east-1"),
        )

    def client(self):
        """A boto3 S3 client (SigV4, path-style addressing for local endpoints, bounded retries)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                retries={"max_attempts": 5, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
            ),
        )
