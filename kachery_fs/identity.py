"""Ed25519 node identities, kachery-compatible (reference: kachery.md §3.1).

A node id is the 64-hex raw public key. Keys are stored as ``private.pem``/``public.pem``
whose body is one base64 line of DER: the same files kachery's daemon and clients write, so
an existing kachery identity can be reused. A signature is Ed25519 over the 20-byte SHA-1
digest of the canonical JSON of the payload (128 hex); verification also accepts kachery's
legacy scheme, Ed25519 over the canonical JSON bytes themselves.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import stat
from pathlib import Path
from typing import TypeGuard

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from .canonical import canonical_bytes
from .errors import InvalidInput, NotFound, PermissionDenied

_PUBLIC_DER_PREFIX = bytes.fromhex("302a300506032b6570032100")
_PRIVATE_DER_PREFIX = bytes.fromhex("302e020100300506032b657004220420")
_NODE_ID_RE = re.compile(r"[0-9a-f]{64}")
_SIG_RE = re.compile(r"[0-9a-fA-F]{128}")

PRIVATE_PEM = "private.pem"
PUBLIC_PEM = "public.pem"


def is_node_id(value: object) -> TypeGuard[str]:
    """True for 64 lower-case hex digits (a raw Ed25519 public key)."""
    return isinstance(value, str) and _NODE_ID_RE.fullmatch(value) is not None


def _pem(kind: str, der: bytes) -> str:
    return (f"-----BEGIN {kind} KEY-----\n{base64.b64encode(der).decode()}\n"
            f"-----END {kind} KEY-----\n")


def _pem_der(text: str, kind: str) -> bytes:
    lines = [ln.strip() for ln in text.strip().splitlines()]
    if (len(lines) < 3 or lines[0] != f"-----BEGIN {kind} KEY-----"
            or lines[-1] != f"-----END {kind} KEY-----"):
        raise InvalidInput(f"not a {kind.lower()} key PEM file")
    try:
        return base64.b64decode("".join(lines[1:-1]), validate=True)
    except ValueError as exc:
        raise InvalidInput(f"bad base64 in {kind.lower()} key PEM: {exc}") from None


def _digest(payload) -> bytes:
    return hashlib.sha1(canonical_bytes(payload)).digest()


class NodeKey:
    """An Ed25519 key pair: a node's (or a feed's) identity."""

    def __init__(self, private_key: Ed25519PrivateKey):
        self._key = private_key
        self.seed = private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        self.public_bytes = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.node_id = self.public_bytes.hex()

    def __repr__(self) -> str:
        return f"<NodeKey {self.node_id[:12]}…>"

    @classmethod
    def generate(cls) -> NodeKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> NodeKey:
        if len(seed) != 32:
            raise InvalidInput("an Ed25519 seed is 32 bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def sign(self, payload) -> str:
        """Sign ``sha1(canonicalJSON(payload))``; return 128 hex digits."""
        return self._key.sign(_digest(payload)).hex()

    def private_pem(self) -> str:
        return _pem("PRIVATE", _PRIVATE_DER_PREFIX + self.seed)

    def public_pem(self) -> str:
        return _pem("PUBLIC", _PUBLIC_DER_PREFIX + self.public_bytes)

    @classmethod
    def from_private_pem(cls, text: str) -> NodeKey:
        der = _pem_der(text, "PRIVATE")
        if len(der) != 48 or not der.startswith(_PRIVATE_DER_PREFIX):
            raise InvalidInput("not an Ed25519 private key (kachery PEM format)")
        return cls.from_seed(der[len(_PRIVATE_DER_PREFIX):])

    def save(self, directory: Path) -> None:
        """Write ``private.pem`` (mode 0600) and ``public.pem`` atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, text, mode in ((PRIVATE_PEM, self.private_pem(), 0o600),
                                 (PUBLIC_PEM, self.public_pem(), 0o644)):
            tmp = directory / f".{name}.{os.getpid()}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            try:
                os.fchmod(fd, mode)
                os.write(fd, text.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, directory / name)

    @classmethod
    def load(cls, directory: Path) -> NodeKey:
        """Read ``private.pem``; refuse it if group or others can read it, as kachery does."""
        path = Path(directory) / PRIVATE_PEM
        try:
            st = path.stat()
            text = path.read_text()
        except FileNotFoundError:
            raise NotFound(f"no node key at {path}: run `kachery-fs init`") from None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise PermissionDenied(
                f"{path} is readable by other users (mode {stat.S_IMODE(st.st_mode):04o});"
                f" run `chmod 600 {path}`")
        return cls.from_private_pem(text)


def verify_signature(payload, signature: object, node_id: object) -> bool:
    """Check a signature by ``node_id`` over ``payload``. Never raises: bad input is False."""
    if not is_node_id(node_id) or not isinstance(signature, str) or not _SIG_RE.fullmatch(
            signature):
        return False
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(node_id))
        data = canonical_bytes(payload)
    except Exception:  # not a curve point, or a payload with no canonical form
        return False
    sig = bytes.fromhex(signature)
    for message in (hashlib.sha1(data).digest(), data):  # current, then legacy
        try:
            key.verify(sig, message)
            return True
        except InvalidSignature:
            continue
    return False
