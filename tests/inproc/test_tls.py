"""A hub served over https: nodes check its certificate, and say what to do when they
cannot trust it. The certificate is made here, for 127.0.0.1, by a throwaway authority."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kachery_fs.manifest import CHUNK_SIZE

from ..util import HubProcess, kfs

CH = "tls.test"


def make_certificates(directory):
    """An authority's certificate, and a server certificate for 127.0.0.1 it signed."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kachery-fs test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False),
                         critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {name: directory / f"{name}.pem" for name in ("ca", "cert", "key")}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    paths["key"].chmod(0o600)
    return paths


def test_a_hub_over_https_is_trusted_only_through_its_authority(tmp_path, monkeypatch):
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    pem = make_certificates(tmp_path)
    owner = tmp_path / "owner"
    kfs(owner, "init")
    hub = HubProcess(owner, tmp_path / "hub",
                     args=("--tls-cert", str(pem["cert"]), "--tls-key", str(pem["key"])))
    hub.url = f"https://127.0.0.1:{hub.port}"
    # the owner's node has not been told to trust the authority: one clear line, no retry
    hub.start()
    try:
        result = kfs(owner, "hub", "channel", "create", CH, "--hub", hub.url, check=False,
                     timeout=30)
        err = result.stderr.decode()
        assert result.returncode == 1 and "not trusted" in err and "SSL_CERT_FILE" in err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err

        monkeypatch.setenv("SSL_CERT_FILE", str(pem["ca"]))
        kfs(owner, "hub", "channel", "create", CH, "--hub", hub.url)
        kfs(owner, "join", hub.url, CH)
        data = b"over https " * 1000
        src = tmp_path / "f.bin"
        src.write_bytes(data)
        uri = kfs(owner, "put", str(src)).stdout.decode().strip()
        assert hashlib.sha1(data).hexdigest() in uri
        # a second node reads it from the bucket, also over https
        reader = tmp_path / "reader"
        reader_id = kfs(reader, "init").stdout.decode().strip()
        kfs(owner, "hub", "channel", "authorize", CH, reader_id, "--permissions",
            "requestFiles", "--hub", hub.url)
        kfs(reader, "join", hub.url, CH)
        assert kfs(reader, "cat", uri.split("?")[0]).stdout == data
        # a large file, read by chunk: its chunks come over https too
        big = os.urandom(CHUNK_SIZE + 1000)
        src.write_bytes(big)
        uri = kfs(owner, "put", "-q", str(src)).stdout.decode().strip()
        assert "?manifest=" in uri
        assert kfs(reader, "cat", uri, timeout=60).stdout == big
    finally:
        hub.stop()


def test_hub_serve_refuses_a_key_that_is_not_the_certificates(tmp_path):
    pem = make_certificates(tmp_path)
    (tmp_path / "other").mkdir()
    other = make_certificates(tmp_path / "other")  # another key
    owner = tmp_path / "owner"
    kfs(owner, "init")
    result = kfs(owner, "hub", "serve", "--port", "0", "--dir", str(tmp_path / "hub"),
                 "--tls-cert", str(pem["cert"]), "--tls-key", str(other["key"]), check=False)
    err = result.stderr.decode()
    assert result.returncode == 1 and "do not load together" in err, err
    result = kfs(owner, "hub", "serve", "--port", "0", "--tls-cert", str(pem["cert"]),
                 check=False)
    assert result.returncode == 1 and "--tls-key" in result.stderr.decode()


@pytest.fixture(autouse=True)
def _no_proxy_surprises(monkeypatch):
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
