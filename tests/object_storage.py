"""
S3 on loopback for the tests whose files live in object storage: moto, in a thread or as a process.

Airflow's ``s3://`` paths (an ``ObjectStoragePath`` without a connection id) use the default AWS credential
chain: :meth:`S3Endpoint.env` sends every S3 client of a process to the endpoint, with the instance-metadata
look-up turned off so that nothing ever leaves the machine.
"""

from __future__ import annotations

import importlib.util
import json
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airflow_env import unavailable

REGION = "us-east-1"


def _split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


@dataclass(frozen=True)
class S3Endpoint:
    """
    An S3 endpoint and the credentials its clients sign with.

    :param url: the endpoint, e.g. ``http://127.0.0.1:PORT``.
    """

    url: str
    access_key: str = "llmbatch-test"
    secret_key: str = field(default_factory=lambda: secrets.token_hex(16))

    def env(self) -> dict[str, str]:
        """Return the variables that send every S3 client of a process (boto3, s3fs) here."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL_S3": self.url,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self) -> Any:
        """Return a boto3 S3 client of this endpoint."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=REGION,
        )

    def upload(self, path: Path, uri: str) -> str:
        """Upload a local file to ``s3://bucket/key``, creating the bucket if needed; return the URI."""
        bucket, key = _split(uri)
        client = self.client()
        if bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=bucket)
        client.upload_file(str(path), bucket, key)
        return uri

    def read_jsonl(self, uri: str) -> list[dict[str, Any]]:
        """Return the rows of a JSONL object."""
        bucket, key = _split(uri)
        body = self.client().get_object(Bucket=bucket, Key=key)["Body"].read().decode("utf-8")
        return [json.loads(line) for line in body.splitlines() if line.strip()]


def require_moto() -> None:
    """Fail under CI, skip elsewhere, unless moto (the ``e2e`` extra) is installed."""
    if importlib.util.find_spec("moto") is None:
        unavailable("moto is not installed: pip install -e '.[e2e]' (tasks.py test does)")


@contextmanager
def threaded_s3() -> Iterator[S3Endpoint]:
    """Serve S3 (moto) on a free 127.0.0.1 port in a thread of this process."""
    require_moto()
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield S3Endpoint(f"http://{host}:{port}")
    finally:
        server.stop()
