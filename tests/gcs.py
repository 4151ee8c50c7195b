"""Test support: a real GCS-compatible server (gcp-storage-emulator, in memory) on 127.0.0.1, found by gcsfs
through the standard STORAGE_EMULATOR_HOST; no credentials, as against any emulator."""

import uuid

import pytest

from tests.s3 import free_port


@pytest.fixture(scope="session")
def gcs_endpoint():
    pytest.importorskip("gcsfs")
    from gcp_storage_emulator.server import create_server

    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def gcs_bucket(gcs_endpoint, monkeypatch) -> str:
    """A fresh, empty bucket on the local server; the environment points at it."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_endpoint)
    name = f"lab-bucket-{uuid.uuid4().hex[:12]}"  # "bucket" in the name: a missing object is not a missing bucket
    gcsfs_client().mkdir(name)
    return name


def gcsfs_client():
    import gcsfs

    return gcsfs.GCSFileSystem(skip_instance_cache=True)
