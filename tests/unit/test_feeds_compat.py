"""Feeds against what kachery's own JavaScript daemon signs and writes, byte for byte.

The vectors were made with node from the daemon's code (``Subfeed.appendMessages`` and
``crypto/signatures.ts``: ``stringifyDeterministicWithSortedKeys``, Ed25519 over the SHA-1
digest) and the TEST key (seed 00 01 .. 1f), timestamps 1700000000000 + i. The messages were
read by ``JSON.parse`` from what a Python client posts (``json.dumps`` of Python ints), and
the daemon writes ``JSON.stringify(signedMessage)`` to the bucket. The tests need no node.
"""

from __future__ import annotations

import errno
import json

import pytest
import trio

from kachery_fs.canonical import canonical_json
from kachery_fs.errors import InvalidInput
from kachery_fs.feeds import (
    FeedFiles,
    FeedStore,
    message_line,
    parse_feed_uri,
    parse_line,
    sign_message,
    subfeed_hash,
    verify_messages,
)
from kachery_fs.identity import NodeKey
from kachery_fs.protocol import feed_prefix

TEST_KEY = NodeKey.from_seed(bytes(range(32)))
T0 = 1_700_000_000_000

# -- whole numbers beyond 2**53 --------------------------------------------------------------

#: What the Python client posted to the daemon, message by message.
POSTED = [
    {"i": 0},
    {"i": 1},
    {"big": 10**17},
    {"ids": [2**53 + 1, 2**64 - 1, -(2**60)]},
    {"e": 10**21, "f": 123456789012345678901234, "g": 10**21 - 1},
]

#: The canonical body the daemon signed for each (JS numbers: doubles, Number::toString).
JS_BODIES = [
    '{"message":{"i":0},"messageNumber":0,"timestamp":1700000000000}',
    ('{"message":{"i":1},"messageNumber":1,'
     '"previousSignature":"1c568b10ba60aa148d32a92fb3a2c63d8e38e2398ed41fda87411e5231f'
     '7665cb5e328d6cf6a6ae599b7e7bd03acfad7bce61f776e8f9954c15aad5a8e315e05",'
     '"timestamp":1700000000001}'),
    ('{"message":{"big":100000000000000000},"messageNumber":2,'
     '"previousSignature":"0a48cb16d9ab7a7db8097a682356f1180987b3cfec1954f2a0e4621418e'
     '759e7212e6d7e4419b6555600ddb77d01b490f339878bec84268416398abab9851805",'
     '"timestamp":1700000000002}'),
    ('{"message":{"ids":[9007199254740992,18446744073709552000,-1152921504606847000]},'
     '"messageNumber":3,'
     '"previousSignature":"ca2659d995bae82a22e2990d1210fe262b84ca9900ebfb207bc7ccd0373'
     '017acff7b4f8ec2a0d5ff4d99f2ec86bfe198bf3f2c760f83c9a025d5691ec0761b01",'
     '"timestamp":1700000000003}'),
    ('{"message":{"e":1e+21,"f":1.2345678901234569e+23,"g":1e+21},"messageNumber":4,'
     '"previousSignature":"bb39562e14a9f7c00ac03e62b86093e760c3e10b5d1c0b2e00c39565979'
     'eaa29c42619eac33f7d83b9abfd616534ba6af445fd13e37d3dcc662c739fa727b107",'
     '"timestamp":1700000000004}'),
]

#: The bucket objects ``<prefix>/<i>`` the daemon wrote (``JSON.stringify``).
JS_BUCKET = [
    ('{"body":{"message":{"i":0},"messageNumber":0,"timestamp":1700000000000},'
     '"signature":"1c568b10ba60aa148d32a92fb3a2c63d8e38e2398ed41fda87411e5231f7665cb5e'
     '328d6cf6a6ae599b7e7bd03acfad7bce61f776e8f9954c15aad5a8e315e05"}'),
    ('{"body":{"message":{"i":1},'
     '"previousSignature":"1c568b10ba60aa148d32a92fb3a2c63d8e38e2398ed41fda87411e5231f'
     '7665cb5e328d6cf6a6ae599b7e7bd03acfad7bce61f776e8f9954c15aad5a8e315e05",'
     '"messageNumber":1,"timestamp":1700000000001},'
     '"signature":"0a48cb16d9ab7a7db8097a682356f1180987b3cfec1954f2a0e4621418e759e7212'
     'e6d7e4419b6555600ddb77d01b490f339878bec84268416398abab9851805"}'),
    ('{"body":{"message":{"big":100000000000000000},'
     '"previousSignature":"0a48cb16d9ab7a7db8097a682356f1180987b3cfec1954f2a0e4621418e'
     '759e7212e6d7e4419b6555600ddb77d01b490f339878bec84268416398abab9851805",'
     '"messageNumber":2,"timestamp":1700000000002},'
     '"signature":"ca2659d995bae82a22e2990d1210fe262b84ca9900ebfb207bc7ccd0373017acff7'
     'b4f8ec2a0d5ff4d99f2ec86bfe198bf3f2c760f83c9a025d5691ec0761b01"}'),
    ('{"body":{"message":{"ids":[9007199254740992,18446744073709552000,'
     '-1152921504606847000]},'
     '"previousSignature":"ca2659d995bae82a22e2990d1210fe262b84ca9900ebfb207bc7ccd0373'
     '017acff7b4f8ec2a0d5ff4d99f2ec86bfe198bf3f2c760f83c9a025d5691ec0761b01",'
     '"messageNumber":3,"timestamp":1700000000003},'
     '"signature":"bb39562e14a9f7c00ac03e62b86093e760c3e10b5d1c0b2e00c39565979eaa29c42'
     '619eac33f7d83b9abfd616534ba6af445fd13e37d3dcc662c739fa727b107"}'),
    ('{"body":{"message":{"e":1e+21,"f":1.2345678901234569e+23,"g":1e+21},'
     '"previousSignature":"bb39562e14a9f7c00ac03e62b86093e760c3e10b5d1c0b2e00c39565979'
     'eaa29c42619eac33f7d83b9abfd616534ba6af445fd13e37d3dcc662c739fa727b107",'
     '"messageNumber":4,"timestamp":1700000000004},'
     '"signature":"755befceb7ef2e3824c83207f11367db980b151c19e7bf9bae8a00d8ffdf6d8244f'
     '49bdb114e1968792bdef9e8a7d8c29739e6a4bbe3ae67cbd66a93676fae0d"}'),
]


def test_a_daemon_signed_subfeed_with_large_whole_numbers_verifies_entirely(tmp_path):
    received = [json.loads(text) for text in JS_BUCKET]
    # JSON.stringify printed 1e17 as plain digits: Python reads them as an int
    assert received[2]["body"]["message"] == {"big": 10**17}
    assert isinstance(received[4]["body"]["message"]["e"], float)
    check = verify_messages(TEST_KEY.node_id, received)
    assert check.problem is None
    assert len(check.valid) == 5
    for signed, body in zip(received, JS_BODIES, strict=True):
        assert canonical_json(signed["body"]) == body
    with FeedStore(tmp_path / "feeds.db") as store:
        h = subfeed_hash("big")
        assert store.add_signed(TEST_KEY.node_id, h, received, 0) == (5, None)
        lines = b"".join(message_line(m) for m in store.messages(TEST_KEY.node_id, h))
    assert lines.splitlines() == [
        b'{"i":0}', b'{"i":1}', b'{"big":100000000000000000}',
        b'{"ids":[9007199254740992,18446744073709552000,-1152921504606847000]}',
        b'{"e":1e+21,"f":1.2345678901234569e+23,"g":1e+21}']


def test_messages_with_large_whole_numbers_are_signed_as_the_daemon_signs_them(tmp_path):
    prev = None
    for i, (value, body, text) in enumerate(zip(POSTED, JS_BODIES, JS_BUCKET, strict=True)):
        signed = sign_message(TEST_KEY, value, message_number=i, previous_signature=prev,
                              timestamp=T0 + i)
        assert canonical_json(signed["body"]) == body
        assert signed["signature"] == json.loads(text)["signature"]
        prev = signed["signature"]
    # the stored copy holds the numbers as a JS reader holds them
    assert signed["body"]["message"]["g"] == 1e21
    # through the store, and from lines written in the mount
    with FeedStore(tmp_path / "feeds.db") as store:
        fid = store.create_feed()
        out = store.append(fid, "s", [parse_line(b'{"n": 9007199254740993}'), {"m": -10**17}])
        assert [m["body"]["message"] for m in out] == [{"n": 2**53}, {"m": -10**17}]
        assert verify_messages(fid, store.messages(fid, subfeed_hash("s"))).ok
        assert message_line(out[1]) == b'{"m":-100000000000000000}\n'


def test_whole_numbers_beyond_the_range_of_doubles_are_refused(tmp_path):
    with pytest.raises(InvalidInput, match="range"):
        parse_line(b'{"n": 1' + b"0" * 400 + b'}')
    with FeedStore(tmp_path / "feeds.db") as store:
        fid = store.create_feed()
        with pytest.raises(InvalidInput, match="range"):
            store.append(fid, "s", [{"n": 2**1024}])
        assert store.count(fid, subfeed_hash("s")) == 0


# -- messages are JSON objects or arrays -----------------------------------------------------

SCALARS = [42, 1.5, "text", True, None]


def test_scalar_messages_are_refused_wherever_messages_are_written(tmp_path):
    # daemon kacheryTypes.ts: isSignedSubfeedMessage requires body.message to be an object
    for value in SCALARS:
        with pytest.raises(InvalidInput, match="must be a JSON object or array"):
            sign_message(TEST_KEY, value, message_number=0, previous_signature=None)
        with pytest.raises(InvalidInput, match="must be a JSON object or array"):
            parse_line(json.dumps(value).encode() + b"\n")
    with pytest.raises(InvalidInput) as info:
        parse_line(b"42\n")
    assert str(info.value) == ("a feed message must be a JSON object or array, as kachery"
                               ' requires, not a number (42): wrap it, e.g. {"value": 42}')
    with FeedStore(tmp_path / "feeds.db") as store:
        fid = store.create_feed()
        for value in SCALARS:
            with pytest.raises(InvalidInput, match="must be a JSON object or array"):
                store.append(fid, "s", [value])
        with pytest.raises(InvalidInput, match="message 1 of the batch"):
            store.append(fid, "s", [{"a": 1}, "two"])
        assert store.count(fid, subfeed_hash("s")) == 0  # all or nothing
        assert len(store.append(fid, "s", [{}, [], [1, "two"]])) == 3


def test_received_scalar_messages_stay_readable():
    # written by an earlier kachery-fs, before the rule: kept, not cut short
    body = {"message": 42, "messageNumber": 0, "timestamp": T0}
    signed = {"body": body, "signature": TEST_KEY.sign(body)}
    assert verify_messages(TEST_KEY.node_id, [signed]).ok
    assert message_line(signed) == b"42\n"


def test_the_mount_answers_einval_to_a_scalar_line_and_logs_why(tmp_path, caplog):
    pyfuse3 = pytest.importorskip("pyfuse3")
    from kachery_fs.fs.errno_map import fuse_errors

    files = FeedFiles(None, None, FeedStore(tmp_path / "feeds.db"), None, nursery=None)
    fid = files.store.create_feed()

    async def write():
        with fuse_errors("write"):
            await files.append_lines("ch", fid, "s", b'{"a": 1}\n42\n')

    try:
        with pytest.raises(pyfuse3.FUSEError) as info:
            trio.run(write)
        assert info.value.errno == errno.EINVAL
        assert files.store.count(fid, subfeed_hash("s")) == 0
    finally:
        files.close()
    [record] = [r for r in caplog.records if r.name == "kachery_fs.fs.errno_map"]
    assert record.getMessage() == (
        f"write: feed {fid[:12]}… subfeed 's': nothing appended: line 2 of the write: a feed"
        " message must be a JSON object or array, as kachery requires, not a number (42):"
        ' wrap it, e.g. {"value": 42}')


# -- subfeed names ~<hash> -------------------------------------------------------------------

PRIMES = "80d9cc061689dbc521aba6b35235f29de63d8349"  # sha1("primes")
UPPER = PRIMES.upper()


def test_a_subfeed_named_by_an_upper_case_hash_keeps_it():
    # kachery_client._feeds._subfeed_hash: subfeed_name[1:]; the daemon's isSubfeedHash takes
    # either case and keys the database and the bucket by the hash as given
    assert subfeed_hash("~" + UPPER) == UPPER
    assert subfeed_hash("~" + PRIMES) == PRIMES == subfeed_hash("primes")
    uri = parse_feed_uri(f"feed://{TEST_KEY.node_id}/~{UPPER}")
    assert uri.subfeed == "~" + UPPER and uri.subfeed_hash == UPPER
    assert str(uri) == f"feed://{TEST_KEY.node_id}/~{UPPER}"
    # the bucket prefix a daemon reads and writes for it
    assert feed_prefix("lab", TEST_KEY.node_id, uri.subfeed_hash).endswith(
        f"/subfeeds/80/D9/CC/{UPPER}")


def test_the_store_and_the_mount_keep_an_upper_case_subfeed_hash(tmp_path):
    with FeedStore(tmp_path / "feeds.db") as store:
        fid = store.create_feed()
        store.append(fid, "~" + UPPER, [{"n": 1}])
        store.append(fid, "primes", [{"n": 2}, {"n": 3}])
        assert store.count(fid, UPPER) == 1 and store.count(fid, PRIMES) == 2
        assert sorted((s.subfeed_hash, s.name, s.count) for s in store.subfeeds(fid)) == [
            (UPPER, None, 1), (PRIMES, "primes", 2)]
        # received under the upper-case hash: stored there
        other = NodeKey.generate()
        signed = [sign_message(other, {"n": 1}, message_number=0, previous_signature=None)]
        assert store.add_signed(other.node_id, UPPER, signed, 0) == (1, None)
        assert store.messages(other.node_id, UPPER) == signed
        assert store.count(other.node_id, PRIMES) == 0
    files = FeedFiles(None, None, FeedStore(tmp_path / "feeds.db"), None, nursery=None)
    try:
        assert files.subfeed_names(fid) == ["primes", "~" + UPPER]
        assert files.subfeed_names(other.node_id) == ["~" + UPPER]
        assert files.content(fid, "~" + UPPER) == b'{"n":1}\n'
        assert files.content(fid, "~" + PRIMES) == b'{"n":2}\n{"n":3}\n'
    finally:
        files.close()
