"""A real S3 for tests: moto's server over HTTP on 127.0.0.1, fresh buckets."""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import boto3
from moto.server import ThreadedMotoServer

CREDENTIALS = {"key": "testing", "secret": "testing"}
REGION = "us-east-1"
_bucket_numbers = itertools.count()


def start_moto() -> tuple[ThreadedMotoServer, str]:
    """Start moto on a free port of 127.0.0.1; returns the server and its endpoint URL."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one INFO line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def boto_client(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=CREDENTIALS["key"],
        aws_secret_access_key=CREDENTIALS["secret"],
        region_name=REGION,
    )


@dataclass
class S3Bucket:
    """One bucket on the test server, and how segbatch reaches it."""

    bucket: str
    endpoint: str
    client: Any = field(repr=False)

    @property
    def storage_options(self) -> dict[str, Any]:
        return self.options_via(self.endpoint)

    def options_via(self, endpoint: str) -> dict[str, Any]:
        """Storage options that reach this bucket through ``endpoint`` (e.g. a fault proxy)."""
        return {"endpoint_url": endpoint, **CREDENTIALS}

    def url(self, path: str = "") -> str:
        return f"s3://{self.bucket}/{path.lstrip('/')}"

    def put(self, key: str, data: bytes) -> str:
        """Upload with boto3 (not segbatch), so a test checks segbatch against a second client."""
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)
        return self.url(key)

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def new_bucket(endpoint: str, name_hint: str) -> S3Bucket:
    """A fresh bucket with a unique, valid name."""
    stem = "".join(c if c.isalnum() else "-" for c in name_hint.lower()).strip("-")[:40] or "test"
    name = f"{stem}-{os.getpid()}-{next(_bucket_numbers)}"
    client = boto_client(endpoint)
    client.create_bucket(Bucket=name)
    return S3Bucket(bucket=name, endpoint=endpoint, client=client)


def aws_test_env() -> Iterator[tuple[str, str | None]]:
    """Environment that keeps boto clients off real credentials and profiles."""
    yield "AWS_ACCESS_KEY_ID", CREDENTIALS["key"]
    yield "AWS_SECRET_ACCESS_KEY", CREDENTIALS["secret"]
    yield "AWS_DEFAULT_REGION", REGION
    yield "AWS_SESSION_TOKEN", None
    yield "AWS_PROFILE", None
    yield "AWS_CONFIG_FILE", os.devnull
    yield "AWS_SHARED_CREDENTIALS_FILE", os.devnull
