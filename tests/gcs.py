"""Helpers for the gs:// tests (tests/*/test_gcs.py), with the ``fake_gcs`` fixture in
tests/conftest.py: the emulator's bucket, a service-account key made here, random files."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .util import free_port

BUCKET = "kfs-test"


def service_account_key(path: Path) -> Path:
    """A service-account JSON key file with a new RSA key. Its token URI is a closed
    loopback port: were a token ever fetched, it could not leave this machine."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    path.write_text(json.dumps({
        "type": "service_account", "project_id": "kfs-test", "private_key_id": "test",
        "private_key": pem, "client_email": "kachery-fs-hub@kfs-test.iam.gserviceaccount.com",
        "client_id": "1", "token_uri": f"http://127.0.0.1:{free_port()}/token"}))
    return path


def random_file(path: Path, size: int) -> tuple[bytes, str]:
    data = os.urandom(size)
    path.write_bytes(data)
    return data, hashlib.sha1(data).hexdigest()
