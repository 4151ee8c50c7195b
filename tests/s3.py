"""Test support: a real S3-compatible server (moto's server mode) on 127.0.0.1, with fake credentials set
through the standard AWS environment variables and the endpoint through AWS_ENDPOINT_URL."""

import logging
import socket
import uuid

import pytest

SECRET = "lab-secret-Zq8wX2"  # a fake secret key, searched for in every output the tests see


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def s3_environment(monkeypatch, endpoint: str) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")


@pytest.fixture
def bucket(s3_endpoint, monkeypatch) -> str:
    """A fresh, empty bucket on the local server; the environment points at it."""
    import s3fs

    s3_environment(monkeypatch, s3_endpoint)
    name = f"lab-bucket-{uuid.uuid4().hex[:12]}"  # "bucket" in the name: a missing object is not a missing bucket
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
    return name


def s3fs_client():
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)
