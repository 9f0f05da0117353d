"""A real S3-compatible server for tests: moto in server mode on 127.0.0.1, in a thread of this process.

Requires ``moto[server]>=5.2.2`` (5.2.0/5.2.1 answer CompleteMultipartUpload with a
``CompleteMultipartUploadResponse`` root element, which pyarrow's S3 client rejects).
Credentials are fake and come from the environment, as on a real cluster:
:data:`S3_TEST_ENV` must be in ``os.environ`` of every process that talks to the
server (the test process and, for Ray tests, the Ray processes started after it).
"""

from __future__ import annotations

import logging
import socket
from contextlib import contextmanager

S3_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never probe instance metadata for credentials/region
}
MIN_MOTO = (5, 2, 2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moto_version_problem() -> str | None:
    """None if the installed moto can serve pyarrow, else why not."""
    try:
        import moto
        from moto.server import ThreadedMotoServer  # noqa: F401  (needs the [server] extra)
    except ImportError as exc:
        return f"moto server not installed ({exc}); pip install 'moto[server]>=5.2.2'"
    version = tuple(int(x) for x in moto.__version__.split(".")[:3] if x.isdigit())
    if version < MIN_MOTO:
        return f"moto {moto.__version__} < 5.2.2 breaks pyarrow multipart uploads; pip install -U 'moto[server]>=5.2.2'"
    return None


@contextmanager
def s3_server(bucket: str):
    """Start the server, create ``bucket``; yields ``host:port``."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log line per request
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"127.0.0.1:{port}"
        s3_client(endpoint).create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        server.stop()


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=f"http://{endpoint}", aws_access_key_id=S3_TEST_ENV["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=S3_TEST_ENV["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")


def list_keys(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    client = s3_client(endpoint)
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return sorted(keys)
