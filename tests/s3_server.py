"""A local S3-compatible server for tests: moto's ThreadedMotoServer on a free port, fake credentials.

The fixture `s3` (session-scoped, imported by tests/conftest.py) starts the server once, sets fake
credentials and `AWS_ENDPOINT_URL` in the environment (so subprocesses and fsspec/botocore find it without
any storage_options), creates a bucket and yields an `S3Server`. Tests skip when moto / s3fs are not
installed (`pip install -e ".[dev]"` installs them).
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from dataclasses import dataclass

import pytest

# Fake credentials: distinctive strings so tests can assert they never end up in a store, a run folder or
# a log.
FAKE_KEY_ID = "KVMAPFAKEKEYID0000000"
FAKE_SECRET = "kvmap-fake-secret-do-not-log-0123456789"


@dataclass
class S3Server:
    endpoint_url: str
    bucket: str

    def url(self, name: str) -> str:
        """A fresh store URL in the test bucket (unique prefix per call)."""
        return f"s3://{self.bucket}/{uuid.uuid4().hex[:8]}/{name}"

    @property
    def storage_options(self) -> dict:
        return {"endpoint_url": self.endpoint_url}

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.endpoint_url, skip_instance_cache=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3():
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": FAKE_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    srv = S3Server(endpoint_url=env["AWS_ENDPOINT_URL"], bucket="kvmap-test")
    srv.fs().mkdir(srv.bucket)
    try:
        yield srv
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
