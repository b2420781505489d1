"""The local bucket's check of V4 signed URLs (``GOOG4-RSA-SHA256``), as GCS checks them.

The canonical request is rebuilt from the request that arrived and verified against the
RSA public key of the signer named in the credential (the keys of
:class:`kachery_fs.hub.signing.UrlSigner`, which builds the same canonical request).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from email.utils import formatdate
from urllib.parse import quote

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from .http import GcsError, _Request

#: Longest validity a V4 signature may claim (GCS's limit).
MAX_SIGNATURE_EXPIRY_S = 7 * 24 * 3600

#: How far in the future a signature's ``X-Goog-Date`` may be (clock skew we forgive).
MAX_FUTURE_SKEW_S = 300

ALGORITHM = "GOOG4-RSA-SHA256"
_SIGNATURE_PARAMS = ("X-Goog-Algorithm", "X-Goog-Credential", "X-Goog-Date",
                     "X-Goog-Expires", "X-Goog-SignedHeaders", "X-Goog-Signature")


def verify_signed_request(request: _Request, public_keys: dict, now: float) -> None:
    """Check a V4 signed request the way GCS does; return quietly if it is genuine.

    The canonical request is rebuilt from what actually arrived (method, path, query
    without the signature, the signed headers' values), so re-pointing the URL at
    another object, or changing any signed header or query parameter, voids it.

    Raises GcsError: ``403 AccessDenied`` (no signature, unknown signer),
    ``400 ExpiredToken``, ``400 AuthorizationQueryParametersError`` (malformed),
    ``403 SignatureDoesNotMatch``.
    """
    params = _signature_params(request.query)
    if params["X-Goog-Algorithm"] != ALGORITHM:
        raise _malformed(f"X-Goog-Algorithm must be {ALGORITHM}")
    date = params["X-Goog-Date"]
    email, scope = _parse_credential(params["X-Goog-Credential"], date)
    public_key = public_keys.get(email)
    if public_key is None:
        raise GcsError(403, "AccessDenied", f"{email} is not a signer this bucket trusts.")
    _check_validity(date, params["X-Goog-Expires"], now)
    signed_headers = _parse_signed_headers(params["X-Goog-SignedHeaders"])
    canonical = _canonical_request(request, signed_headers)
    string_to_sign = "\n".join(
        [ALGORITHM, date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    try:
        signature = bytes.fromhex(params["X-Goog-Signature"])
        public_key.verify(signature, string_to_sign.encode(), padding.PKCS1v15(),
                          hashes.SHA256())
    except (ValueError, InvalidSignature):
        raise GcsError(403, "SignatureDoesNotMatch",
                       "The request signature we calculated does not match the signature "
                       "you provided.", details=canonical) from None


def _malformed(message: str) -> GcsError:
    return GcsError(400, "AuthorizationQueryParametersError", message)


def _signature_params(query: list[tuple[str, str]]) -> dict[str, str]:
    found: dict[str, str] = {}
    for name, value in query:
        if name in _SIGNATURE_PARAMS:
            if name in found:
                raise _malformed(f"{name} appears more than once")
            found[name] = value
    if "X-Goog-Signature" not in found:
        raise GcsError(403, "AccessDenied", "Anonymous caller does not have "
                       "storage.objects.create access: writes need a signed URL.")
    missing = [name for name in _SIGNATURE_PARAMS if name not in found]
    if missing:
        raise _malformed(f"missing query parameter(s) {', '.join(missing)}")
    return found


def _parse_credential(credential: str, date: str) -> tuple[str, str]:
    """``(client_email, credential scope)`` of ``email/date/region/storage/goog4_request``."""
    parts = credential.split("/")
    if len(parts) < 5 or not parts[0]:
        raise _malformed("X-Goog-Credential must be EMAIL/DATE/REGION/storage/goog4_request")
    datestamp, _region, service, terminator = parts[-4:]
    if datestamp != date[:8] or service != "storage" or terminator != "goog4_request":
        raise _malformed("X-Goog-Credential's scope does not match X-Goog-Date or the service")
    return "/".join(parts[:-4]), "/".join(parts[-4:])


def _check_validity(date: str, expires: str, now: float) -> None:
    try:
        signed_at = datetime.strptime(date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
        lifetime = int(expires)
    except ValueError:
        raise _malformed("X-Goog-Date or X-Goog-Expires is malformed") from None
    if not 1 <= lifetime <= MAX_SIGNATURE_EXPIRY_S:
        raise _malformed(f"X-Goog-Expires must be 1..{MAX_SIGNATURE_EXPIRY_S} seconds")
    if now > signed_at + lifetime:
        expired_at = formatdate(signed_at + lifetime, usegmt=True)
        raise GcsError(400, "ExpiredToken", "The provided token has expired.",
                       details=f"Request signature expired at: {expired_at}")
    if signed_at > now + MAX_FUTURE_SKEW_S:
        raise GcsError(403, "AccessDenied", "The request is not yet valid (X-Goog-Date is "
                       "in the future; check the clocks).")


def _parse_signed_headers(value: str) -> list[str]:
    names = value.split(";")
    if names != sorted(set(names)) or any(not n or n != n.lower() for n in names):
        raise _malformed("X-Goog-SignedHeaders must be sorted, unique, lowercase names")
    if "host" not in names:
        raise _malformed("the host header must be signed")
    if "x-goog-content-sha256" in names:
        raise _malformed("signed payload hashes (x-goog-content-sha256) are not supported "
                         "by the local bucket")
    return names


def _canonical_request(request: _Request, signed_headers: list[str]) -> str:
    """The canonical request of V4 signing (as ``google.cloud.storage._signing`` builds it)."""
    query = sorted(f"{_quote_param(k)}={_quote_param(v)}" for k, v in request.query
                   if k != "X-Goog-Signature")
    headers = []
    for name in signed_headers:
        values = request.headers.get(name)
        if values is None:
            raise GcsError(403, "SignatureDoesNotMatch",
                           f"The signed header {name!r} is missing from the request.")
        headers.append(f"{name}:{','.join(' '.join(v.split()) for v in values)}")
    return "\n".join([
        request.method,
        quote(request.path, safe="/~"),
        "&".join(query),
        "\n".join(headers) + "\n",
        ";".join(signed_headers),
        "UNSIGNED-PAYLOAD",
    ])


def _quote_param(value: str) -> str:
    return quote(value, safe="~")
