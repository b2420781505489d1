"""Canonical JSON, byte-compatible with kachery's JavaScript canonicalizer.

kachery signs ``sha1(canonicalJSON(payload))`` where canonical JSON is what
``JSON.stringify(obj, allKeysSorted)`` gives in JavaScript (reference: kachery.md §1.3):
compact separators, keys sorted in UTF-16 code-unit order at every level, raw UTF-8 (no
``\\uXXXX`` escapes for non-ASCII), and JavaScript number formatting (``1.0`` is ``1``,
``1e-7`` not ``1e-07``). Python's ``json.dumps(sort_keys=True)`` differs on all four.

JavaScript numbers are doubles, and Python reads a JSON integer of any size as an exact
``int``: an integer beyond 2**53 is written as JavaScript would print it after reading it
(:func:`_js_int`), so a message a kachery daemon signed with ``1e17`` in it, which it wrote
as ``100000000000000000``, verifies here, and our signatures verify there.
"""

from __future__ import annotations

import hashlib
import json
import math
from decimal import Decimal

from .errors import InvalidInput

#: JavaScript numbers are doubles: integers beyond this are rounded by a JS reader.
MAX_SAFE_INTEGER = 2**53 - 1

_encode_str = json.JSONEncoder(ensure_ascii=False).encode


def _js_float(x: float) -> str:
    """ECMAScript Number::toString for a finite double."""
    if x == 0:
        return "0"
    if x.is_integer() and abs(x) <= MAX_SAFE_INTEGER:
        return str(int(x))
    sign = "-" if x < 0 else ""
    # repr gives the shortest round-tripping digits, as JS does; only the layout differs.
    t = Decimal(repr(abs(x))).as_tuple()
    digits = "".join(map(str, t.digits))
    assert isinstance(t.exponent, int)  # x is finite: never "n", "N" or "F"
    exp = t.exponent + (len(digits) - len(digits.rstrip("0")))
    digits = digits.strip("0") if digits.lstrip("0") else "0"
    # value = 0.<digits> * 10**n  (k and n as in the ECMAScript spec)
    n = len(digits) + exp
    k = len(digits)
    if k <= n <= 21:
        out = digits + "0" * (n - k)
    elif 0 < n <= 21:
        out = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        out = "0." + "0" * (-n) + digits
    else:
        e = n - 1
        mant = digits if k == 1 else digits[0] + "." + digits[1:]
        out = f"{mant}e{'+' if e >= 0 else '-'}{abs(e)}"
    return sign + out


def _js_int(n: int) -> str:
    """What JavaScript prints for the integer ``n`` read from JSON text.

    A JS reader holds every number as a double: ``JSON.parse`` rounds ``n`` to the nearest
    one (ties to even, as ``float(n)`` does), and ``JSON.stringify`` prints that double:
    plain digits below 1e21 (``10**17`` is ``100000000000000000``, ``2**60`` is
    ``1152921504606847000``), exponent form from 1e21 on (``10**21`` is ``1e+21``). That
    text is what a kachery daemon signed, so it is what we verify and sign.
    """
    try:
        x = float(n)
    except OverflowError:  # JS reads it as Infinity, which JSON.stringify prints as null
        raise InvalidInput("an integer beyond the range of JSON numbers (doubles, at most"
                           " about 1.8e308) has no JavaScript value") from None
    return _js_float(x)


def _utf16_key(s: str) -> bytes:
    return s.encode("utf-16-be", "surrogatepass")


def _write(obj, out: list[str]) -> None:
    if obj is None:
        out.append("null")
    elif obj is True:
        out.append("true")
    elif obj is False:
        out.append("false")
    elif isinstance(obj, str):
        out.append(_encode_str(obj))
    elif isinstance(obj, int):
        if -MAX_SAFE_INTEGER <= obj <= MAX_SAFE_INTEGER:
            out.append(str(obj))
        else:
            out.append(_js_int(obj))
    elif isinstance(obj, float):
        if not math.isfinite(obj):
            raise InvalidInput(f"{obj!r} has no JSON representation")
        out.append(_js_float(obj))
    elif isinstance(obj, dict):
        for key in obj:
            if not isinstance(key, str):
                raise InvalidInput(f"JSON object keys must be strings, not {key!r}")
        out.append("{")
        first = True
        for key in sorted(obj, key=_utf16_key):
            if not first:
                out.append(",")
            first = False
            out.append(_encode_str(key))
            out.append(":")
            _write(obj[key], out)
        out.append("}")
    elif isinstance(obj, (list, tuple)):
        out.append("[")
        for i, item in enumerate(obj):
            if i:
                out.append(",")
            _write(item, out)
        out.append("]")
    else:
        raise InvalidInput(f"{type(obj).__name__} has no JSON representation")


def _plain(obj) -> bool:
    """True when ``json.dumps(sort_keys=True)`` gives the canonical text: no floats (JS
    number formatting), no integers beyond JS's safe range, and only string keys below
    U+10000 (where code-point order is UTF-16 order)."""
    t = type(obj)
    if t is str or obj is None or t is bool:
        return True
    if t is int:
        return -MAX_SAFE_INTEGER <= obj <= MAX_SAFE_INTEGER
    if t is dict:
        for k, v in obj.items():
            if type(k) is not str or (k and max(k) >= "\U00010000") or not _plain(v):
                return False
        return True
    if t is list or t is tuple:
        return all(_plain(v) for v in obj)
    return False


_dumps = json.JSONEncoder(ensure_ascii=False, sort_keys=True, separators=(",", ":"),
                          allow_nan=False).encode


def canonical_json(obj) -> str:
    """The canonical JSON text of ``obj`` (encode as UTF-8 before hashing)."""
    if _plain(obj):  # the common case, in C
        return _dumps(obj)
    out: list[str] = []
    _write(obj, out)
    return "".join(out)


def canonical_bytes(obj) -> bytes:
    return canonical_json(obj).encode("utf-8", "surrogatepass")


def canonical_sha1(obj) -> str:
    """``sha1(canonicalJSON(obj))`` as lower-case hex: kachery's object hash."""
    return hashlib.sha1(canonical_bytes(obj)).hexdigest()
