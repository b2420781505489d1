"""Feeds: message signing and verification, the local feed store, lines and feed:// URIs."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import stat

import pytest

from kachery_fs.canonical import canonical_json
from kachery_fs.errors import InvalidInput, NotFound, PermissionDenied
from kachery_fs.feeds import (
    MAX_MESSAGE_CHARS,
    FeedStore,
    FeedUri,
    format_feed_uri,
    message_line,
    parse_feed_uri,
    parse_line,
    sign_message,
    subfeed_hash,
    verify_messages,
)
from kachery_fs.identity import NodeKey, verify_signature

TEST_KEY = NodeKey.from_seed(bytes(range(32)))
TEST_ID = "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"
T0 = 1_700_000_000_000


def chain(key: NodeKey, values, *, start: int = 0, prev: str | None = None) -> list[dict]:
    """Signed messages ``start, start+1, ...`` of ``values``, as the owner would make them."""
    out = []
    for i, value in enumerate(values):
        out.append(sign_message(key, value, message_number=start + i, previous_signature=prev,
                                timestamp=T0 + start + i))
        prev = out[-1]["signature"]
    return out


def resign(key: NodeKey, body: dict) -> dict:
    return {"body": body, "signature": key.sign(body)}


# -- the reference vector and message construction ----------------------------------------


def test_reference_vector():
    assert TEST_KEY.node_id == TEST_ID
    m0 = sign_message(TEST_KEY, {"n": 1, "p": 2}, message_number=0, previous_signature=None,
                      timestamp=T0)
    assert canonical_json(m0["body"]) == (
        '{"message":{"n":1,"p":2},"messageNumber":0,"timestamp":1700000000000}')
    sig0 = m0["signature"]
    assert sig0.startswith("72591fbf") and sig0.endswith("bb09") and len(sig0) == 128
    assert verify_signature(m0["body"], sig0, TEST_ID)
    m1 = sign_message(TEST_KEY, {"n": 2}, message_number=1, previous_signature=sig0,
                      timestamp=T0 + 1)
    assert m1["body"]["previousSignature"] == sig0
    assert "previousSignature" not in m0["body"]  # omitted, never null
    assert verify_messages(TEST_ID, [m0, m1]) == ([m0, m1], None)


def test_sign_message_arguments():
    with pytest.raises(InvalidInput):
        sign_message(TEST_KEY, {"n": 1}, message_number=1, previous_signature=None)
    with pytest.raises(InvalidInput):
        sign_message(TEST_KEY, {"n": 1}, message_number=0, previous_signature="ab" * 64)
    with pytest.raises(InvalidInput):
        sign_message(TEST_KEY, [object()], message_number=0, previous_signature=None)
    with pytest.raises(InvalidInput):
        sign_message(TEST_KEY, {"n": 1}, message_number=0, previous_signature=None,
                     metaData=[1])
    value = {"a": [1.0, "é"]}
    m = sign_message(TEST_KEY, value, message_number=0, previous_signature=None,
                     metaData={"k": "v"})
    value["a"].append(2)  # the signed copy is independent of the caller's object
    assert m["body"]["message"] == {"a": [1, "é"]} and m["body"]["metaData"] == {"k": "v"}
    assert isinstance(m["body"]["timestamp"], int)
    assert verify_messages(TEST_ID, [m]).ok
    # a message is a JSON object or array, any one
    assert verify_messages(TEST_ID, chain(TEST_KEY, [{}, [], [1], {"a": None}, [[]]])).ok


# -- verification -----------------------------------------------------------------------


def test_tampered_message_keeps_valid_prefix():
    msgs = chain(TEST_KEY, [{"i": i} for i in range(5)])
    bad = copy.deepcopy(msgs)
    bad[2]["body"]["message"]["i"] = 99
    valid, problem = verify_messages(TEST_ID, bad)
    assert valid == msgs[:2]
    assert problem.startswith("message 2:") and "signature" in problem
    bad = copy.deepcopy(msgs)
    bad[3]["signature"] = "0" * 128
    assert verify_messages(TEST_ID, bad) == (msgs[:3], verify_messages(TEST_ID, bad).problem)
    assert "message 3" in verify_messages(TEST_ID, bad).problem


def test_long_runs_are_checked_on_threads_with_the_same_outcome():
    from kachery_fs.feeds import messages

    n = messages.PARALLEL_VERIFY_MIN + 100
    msgs = chain(TEST_KEY, [{"i": i} for i in range(n)])
    assert verify_messages(TEST_ID, msgs) == (msgs, None)
    bad = copy.deepcopy(msgs)
    bad[n // 2]["body"]["message"]["i"] = -1
    bad[n - 3] = "garbage"
    valid, problem = verify_messages(TEST_ID, bad)
    assert valid == msgs[:n // 2]
    assert problem.startswith(f"message {n // 2}:") and "signature" in problem


def test_wrong_numbering():
    msgs = chain(TEST_KEY, [{"m": "a"}, {"m": "b"}, {"m": "c"}])
    body = dict(msgs[1]["body"], messageNumber=5)
    check = verify_messages(TEST_ID, [msgs[0], resign(TEST_KEY, body), msgs[2]])
    assert check.valid == msgs[:1] and "messageNumber" in check.problem
    # a correct run checked at the wrong start position
    check = verify_messages(TEST_ID, msgs, start=1, previous_signature="ab" * 64)
    assert check.valid == [] and "message 1" in check.problem
    # a run that starts later, with the previous signature known or not
    check = verify_messages(TEST_ID, msgs[1:], start=1, previous_signature=msgs[0]["signature"])
    assert check == (msgs[1:], None)
    assert verify_messages(TEST_ID, msgs[1:], start=1) == (msgs[1:], None)
    assert verify_messages(TEST_ID, msgs[2:], start=1).problem is not None


def test_chain_links():
    msgs = chain(TEST_KEY, [{"m": "a"}, {"m": "b"}, {"m": "c"}])
    body = dict(msgs[1]["body"])
    del body["previousSignature"]
    check = verify_messages(TEST_ID, [msgs[0], resign(TEST_KEY, body)])
    assert check.valid == msgs[:1] and "previousSignature is missing" in check.problem
    # properly signed, but chained to something else
    body = dict(msgs[2]["body"], previousSignature="cd" * 64)
    check = verify_messages(TEST_ID, [*msgs[:2], resign(TEST_KEY, body)])
    assert check.valid == msgs[:2] and "does not match" in check.problem
    # message 0 must not have one
    body = dict(msgs[0]["body"], previousSignature="cd" * 64)
    check = verify_messages(TEST_ID, [resign(TEST_KEY, body)])
    assert check.valid == [] and "first message" in check.problem
    # reordered messages
    assert verify_messages(TEST_ID, [msgs[0], msgs[2], msgs[1]]).valid == msgs[:1]
    # the first link of a later run is checked when the previous signature is given
    check = verify_messages(TEST_ID, msgs[1:], start=1, previous_signature="ef" * 64)
    assert check.valid == [] and "does not match" in check.problem


def test_signature_by_another_key():
    other = NodeKey.generate()
    forged = chain(other, [{"m": "a"}, {"m": "b"}])
    check = verify_messages(TEST_ID, forged)
    assert check.valid == [] and "signature" in check.problem
    assert verify_messages(other.node_id, forged).ok
    # one forged message in a good chain
    good = chain(TEST_KEY, [{"m": "a"}, {"m": "b"}, {"m": "c"}])
    body = dict(good[1]["body"], message={"m": "B"})
    check = verify_messages(TEST_ID, [good[0], resign(other, body), good[2]])
    assert check.valid == good[:1] and "signature" in check.problem


def _deep(n: int):
    v: list = []
    for _ in range(n):
        v = [v]
    return v


GOOD = chain(TEST_KEY, [{"m": "x"}])[0]
GARBAGE = [
    None, 5, "x", [], [GOOD], True,
    {}, {"body": GOOD["body"]}, {"signature": GOOD["signature"]},
    dict(GOOD, extra=1),
    {"body": None, "signature": GOOD["signature"]},
    {"body": [], "signature": GOOD["signature"]},
    {"body": GOOD["body"], "signature": 5},
    {"body": GOOD["body"], "signature": "zz" * 64},
    {"body": GOOD["body"], "signature": GOOD["signature"][:-2]},
    {"body": {"message": 1}, "signature": GOOD["signature"]},
    {"body": dict(GOOD["body"], other=1), "signature": GOOD["signature"]},
    {"body": dict(GOOD["body"], messageNumber=False), "signature": GOOD["signature"]},
    {"body": dict(GOOD["body"], messageNumber="0"), "signature": GOOD["signature"]},
    {"body": dict(GOOD["body"], messageNumber=0.0), "signature": GOOD["signature"]},
    {"body": dict(GOOD["body"], timestamp=1.5), "signature": GOOD["signature"]},
    {"body": dict(GOOD["body"], timestamp=-1), "signature": GOOD["signature"]},
    {"body": dict(GOOD["body"], timestamp=None), "signature": GOOD["signature"]},
    {"body": dict(GOOD["body"], metaData=[]), "signature": GOOD["signature"]},
    {"body": dict(GOOD["body"], message=float("nan")), "signature": GOOD["signature"]},
    {"body": dict(GOOD["body"], message=2**60), "signature": GOOD["signature"]},
    {"body": dict(GOOD["body"], message=object()), "signature": GOOD["signature"]},
    {"body": dict(GOOD["body"], message="\ud800"), "signature": GOOD["signature"]},
    {"body": dict(GOOD["body"], message=_deep(100_000)), "signature": GOOD["signature"]},
    {"body": dict(GOOD["body"], message="x" * MAX_MESSAGE_CHARS), "signature": GOOD["signature"]},
    {1: 2, "body": GOOD["body"]},
]


@pytest.mark.parametrize("garbage", GARBAGE, ids=range(len(GARBAGE)))
def test_garbage_shapes_never_raise(garbage):
    check = verify_messages(TEST_ID, [garbage, GOOD])
    assert check.valid == [] and check.problem.startswith("message 0:")
    # after a valid message too
    msgs = chain(TEST_KEY, [{"m": "a"}])
    check = verify_messages(TEST_ID, [msgs[0], garbage])
    assert check.valid == msgs and check.problem.startswith("message 1:")


@pytest.mark.parametrize("messages", [None, 5, "abc", {"body": 1}, b"x"])
def test_garbage_sequences_never_raise(messages):
    check = verify_messages(TEST_ID, messages)
    assert check.valid == [] and check.problem


def test_bad_feed_id_or_start():
    msgs = chain(TEST_KEY, [{"m": "a"}])
    for feed_id in (None, "", "xyz", TEST_ID.upper(), TEST_ID[:-1], 5):
        check = verify_messages(feed_id, msgs)
        assert check.valid == [] and "feed id" in check.problem
    assert verify_messages(TEST_ID, msgs, start=-1).problem
    assert verify_messages(TEST_ID, msgs, start="0").problem
    assert verify_messages(TEST_ID, []) == ([], None)


# -- subfeed names, URIs, lines -------------------------------------------------------------


def test_subfeed_hash_rules():
    assert subfeed_hash("primes") == "80d9cc061689dbc521aba6b35235f29de63d8349"
    assert subfeed_hash("é") == hashlib.sha1("é".encode()).hexdigest()
    h = "80D9CC061689DBC521ABA6B35235F29DE63D8349"
    assert subfeed_hash("~" + h) == h  # as written (kachery's rule)
    assert subfeed_hash("~" + h.lower()) == h.lower() == subfeed_hash("primes")
    for bad in ("~", "~abc", "~" + h + "0", "~" + "g" * 40, 5, None, {"a": 1}):
        with pytest.raises(InvalidInput):
            subfeed_hash(bad)


def test_feed_uris():
    h = subfeed_hash("primes")
    assert format_feed_uri(TEST_ID) == f"feed://{TEST_ID}"
    assert format_feed_uri(TEST_ID, "primes") == f"feed://{TEST_ID}/primes"
    assert format_feed_uri(TEST_ID, "~" + h) == f"feed://{TEST_ID}/~{h}"
    assert format_feed_uri(TEST_ID, "a b/c?d") == f"feed://{TEST_ID}/a%20b%2Fc%3Fd"
    for name in ("primes", "a b/c?d", "é#%", "~" + h, "~" + h.upper()):
        uri = parse_feed_uri(format_feed_uri(TEST_ID, name))
        assert uri == FeedUri(TEST_ID, name)
        assert uri.subfeed_hash == subfeed_hash(name)
        assert str(uri) == format_feed_uri(TEST_ID, name)
    assert parse_feed_uri(f"feed://{TEST_ID}") == FeedUri(TEST_ID)
    assert parse_feed_uri(f"feed://{TEST_ID}/").subfeed is None
    assert parse_feed_uri(TEST_ID.upper()) == FeedUri(TEST_ID)
    assert parse_feed_uri(f"FEED://{TEST_ID.upper()}/x").feed_id == TEST_ID
    # as kachery's clients write them: unquoted slashes, a query string
    assert parse_feed_uri(f"feed://{TEST_ID}/a/b?position=3") == FeedUri(TEST_ID, "a/b")
    assert parse_feed_uri(f"feed://{TEST_ID}/~{h}").subfeed_hash == h
    assert FeedUri(TEST_ID).subfeed_hash is None
    for bad in ("", "feed://", "feed://abc/x", f"sha1://{h}", f"feed://{TEST_ID}/~abc",
                f"feed://{TEST_ID}/%ff", None):
        with pytest.raises(InvalidInput):
            parse_feed_uri(bad)
    with pytest.raises(InvalidInput):
        format_feed_uri("abc")
    with pytest.raises(InvalidInput):
        format_feed_uri(TEST_ID, "~nothash")


def test_message_line_and_parse_line():
    m = chain(TEST_KEY, [{"b": 1, "a": "é\n", "c": 1.0}])[0]
    line = message_line(m)
    assert line == '{"a":"é\\n","b":1,"c":1}\n'.encode()
    assert line.count(b"\n") == 1
    assert parse_line(line) == {"a": "é\n", "b": 1, "c": 1}
    assert parse_line(b'{"x": 1}\n') == {"x": 1}
    assert parse_line(b'  [1, 2]  ') == [1, 2]
    assert parse_line(b"{}\r\n") == {}
    for bad in (b"", b"\n", b"   \n", b"{", b'{"a":1}{"b":2}', b"1 2", b"1\n2\n", b'{"a":\n1}',
                b"NaN", b"[Infinity]", b"\xff\xfe", b"abc", b"[1" + b"0" * 309 + b"]",
                b"[" + b"1" * 5000 + b"]",
                b'["\\ud800"]', b"[" * 100_000 + b"]" * 100_000,
                b'["' + b"x" * MAX_MESSAGE_CHARS + b'"]',
                b"null", b'"s"', b"42", b"true", b"1.5\n"):
        with pytest.raises(InvalidInput):
            parse_line(bad)
    with pytest.raises(InvalidInput):
        parse_line("text, not bytes")
    with pytest.raises(InvalidInput):
        message_line({"signature": "x"})


# -- the local store --------------------------------------------------------------------------


def test_store_file_mode_and_feeds(tmp_path):
    old = os.umask(0)
    try:
        store = FeedStore(tmp_path / "state" / "feeds.db")
    finally:
        os.umask(old)
    with store:
        fid = store.create_feed(label="lab")
        store.append(fid, "s", [{"n": 1}])
        assert stat.S_IMODE((tmp_path / "state" / "feeds.db").stat().st_mode) == 0o600
        wal = tmp_path / "state" / "feeds.db-wal"
        if wal.exists():
            assert stat.S_IMODE(wal.stat().st_mode) & 0o077 == 0
        info = store.feeds()
        assert [(f.feed_id, f.label, f.owned) for f in info] == [(fid, "lab", True)]
        assert store.feed(fid).owned and store.owned(fid)
        assert not store.owned(TEST_ID) and not store.owned("junk")
        assert store.key(fid).node_id == fid
        with pytest.raises(NotFound):
            store.key(TEST_ID)
        store.add_feed(TEST_ID, label="remote")
        assert not store.owned(TEST_ID)
        assert store.feed(TEST_ID).label == "remote"
        with pytest.raises(PermissionDenied):
            store.key(TEST_ID)
        assert {f.feed_id for f in store.feeds()} == {fid, TEST_ID}
        with pytest.raises(NotFound):
            store.feed("ab" * 32)
    # the key survives a reopen, and an existing file with loose permissions is tightened
    os.chmod(tmp_path / "state" / "feeds.db", 0o644)
    with FeedStore(tmp_path / "state" / "feeds.db") as store:
        assert stat.S_IMODE((tmp_path / "state" / "feeds.db").stat().st_mode) == 0o600
        assert store.owned(fid)
        signed = store.append(fid, "s", [{"n": 2}])
        assert signed[0]["body"]["messageNumber"] == 1
        assert verify_messages(fid, store.messages(fid, subfeed_hash("s"))).ok


def test_append_read_and_subfeeds(tmp_path):
    with FeedStore(tmp_path / "feeds.db") as store:
        fid = store.create_feed()
        h = subfeed_hash("main")
        assert store.count(fid, h) == 0 and store.messages(fid, h) == []
        assert store.append(fid, "main", []) == []
        signed = store.append(fid, "main", [{"a": 1}, ["two"], [3]], metaData={"by": "test"})
        assert [s["body"]["message"] for s in signed] == [{"a": 1}, ["two"], [3]]
        assert all(s["body"]["metaData"] == {"by": "test"} for s in signed)
        more = store.append(fid, "main", [[4]])
        assert more[0]["body"]["previousSignature"] == signed[-1]["signature"]
        stored = store.messages(fid, h)
        assert stored == signed + more and store.count(fid, h) == 4
        assert verify_messages(fid, stored).ok
        assert store.messages(fid, h, 1, 3) == signed[1:3]
        assert store.messages(fid, h.upper()) == []  # another subfeed (kachery's rule)
        assert store.messages(fid, h, 3) == more and store.messages(fid, h, 9) == []
        # by hash first (name unknown), then by name: the name is remembered
        other = subfeed_hash("other")
        store.append(fid, "~" + other, [{"m": "x"}])
        assert [(s.name, s.subfeed_hash, s.count) for s in store.subfeeds(fid)] == [
            ("main", h, 4), (None, other, 1)]
        store.append(fid, "other", [{"m": "y"}])
        assert [(s.name, s.count) for s in store.subfeeds(fid)] == [("main", 4), ("other", 2)]
        assert store.subfeeds(TEST_ID) == []
        # only the owner appends
        store.add_feed(TEST_ID)
        with pytest.raises(PermissionDenied):
            store.append(TEST_ID, "main", [[1]])
        with pytest.raises(NotFound):
            store.append("ab" * 32, "main", [[1]])
        for bad in (("zz", "main", [[1]]), (fid, "~zz", [[1]]), (fid, "main", "not a list"),
                    (fid, "main", [[object()]]), (fid, "main", [[float("inf")]])):
            with pytest.raises(InvalidInput):
                store.append(*bad)
        with pytest.raises(InvalidInput):
            store.append(fid, "main", [[1]], metaData=[1])
        with pytest.raises(InvalidInput):
            store.messages(fid, h, -1)
        assert store.count(fid, h) == 4


def test_message_size_limit(tmp_path):
    with FeedStore(tmp_path / "feeds.db") as store:
        fid = store.create_feed()
        h = subfeed_hash("s")
        # a string of n characters in an array has n + 4 characters of JSON
        store.append(fid, "s", [["x" * (MAX_MESSAGE_CHARS - 5)]])
        with pytest.raises(InvalidInput, match="too large"):
            store.append(fid, "s", [["x" * (MAX_MESSAGE_CHARS - 4)]])
        # characters are counted as JavaScript counts them (UTF-16 code units)
        store.append(fid, "s", [["😀" * ((MAX_MESSAGE_CHARS - 5) // 2)]])
        with pytest.raises(InvalidInput, match="too large"):
            store.append(fid, "s", [["😀" * ((MAX_MESSAGE_CHARS - 3) // 2)]])
        # one oversized message in a batch: nothing of the batch is appended
        with pytest.raises(InvalidInput):
            store.append(fid, "s", [["ok"], {"big": "x" * MAX_MESSAGE_CHARS}])
        with pytest.raises(InvalidInput):
            store.append(fid, "s", [["ok"]], metaData={"big": "x" * MAX_MESSAGE_CHARS})
        with pytest.raises(InvalidInput, match="surrogate"):
            store.append(fid, "s", [["\ud800"]])
        assert store.count(fid, h) == 2
        assert verify_messages(fid, store.messages(fid, h)).ok


def test_add_signed_received_messages(tmp_path):
    key = NodeKey.generate()
    fid = key.node_id
    h = subfeed_hash("obs")
    msgs = chain(key, [{"i": i} for i in range(10)])
    with FeedStore(tmp_path / "feeds.db") as store:
        # in pieces, with overlap, and known by hash until the name is given
        assert store.add_signed(fid, h, msgs[:4], 0) == (4, None)
        assert not store.owned(fid) and store.feed(fid).owned is False
        assert [(s.name, s.count) for s in store.subfeeds(fid)] == [(None, 4)]
        assert store.add_signed(fid, h, msgs[2:7], 2, name="obs") == (3, None)
        assert store.add_signed(fid, h, msgs[7:], 7) == (3, None)
        assert store.add_signed(fid, h, msgs, 0) == (0, None)  # all already here
        assert store.messages(fid, h) == msgs
        assert [(s.name, s.count) for s in store.subfeeds(fid)] == [("obs", 10)]
        with pytest.raises(PermissionDenied):
            store.append(fid, "obs", [[1]])

    with FeedStore(tmp_path / "other.db") as store:
        # a tampered message: the valid prefix is stored, the problem reported
        bad = copy.deepcopy(msgs)
        bad[6]["body"]["message"]["i"] = -1
        added, problem = store.add_signed(fid, h, bad, 0)
        assert added == 6 and problem.startswith("message 6:")
        assert store.messages(fid, h) == msgs[:6]
        # the good copy continues the chain later
        assert store.add_signed(fid, h, msgs[6:], 6) == (4, None)
        assert verify_messages(fid, store.messages(fid, h)) == (msgs, None)

    with FeedStore(tmp_path / "third.db") as store:
        # a run beyond the local end (a gap) adds nothing
        added, problem = store.add_signed(fid, h, msgs[3:], 3)
        assert added == 0 and "gap" in problem
        assert store.count(fid, h) == 0
        # signed by another key
        forged = chain(NodeKey.generate(), [{"m": "x"}])
        added, problem = store.add_signed(fid, h, forged, 0)
        assert added == 0 and "signature" in problem
        assert store.feeds() == [] and store.subfeeds(fid) == []  # garbage leaves no trace
        assert store.add_signed(fid, h, [], 0, name="obs") == (0, None)  # known, empty
        assert [(s.name, s.count) for s in store.subfeeds(fid)] == [("obs", 0)]
        # a fork: validly signed by the owner, but different from what is stored
        store.add_signed(fid, h, msgs[:5], 0)
        fork = chain(key, [{"m": "other"}], start=3, prev=msgs[2]["signature"])
        added, problem = store.add_signed(fid, h, fork, 3)
        assert added == 0 and "fork" in problem
        # a run that does not chain to the stored message before it
        stray = chain(key, [{"m": "later"}], start=5, prev="ab" * 64)
        added, problem = store.add_signed(fid, h, stray, 5)
        assert added == 0 and "previousSignature" in problem
        # garbage data never raises
        for garbage in (None, "x", [None], [{"body": 1}], {"a": 1}):
            added, problem = store.add_signed(fid, h, garbage, 5)
            assert added == 0 and problem
        assert store.messages(fid, h) == msgs[:5]
        # bad arguments do raise
        for args in (("zz", h, msgs, 0), (fid, "zz", msgs, 0), (fid, h, msgs, -1)):
            with pytest.raises(InvalidInput):
                store.add_signed(*args)
        with pytest.raises(InvalidInput):
            store.add_signed(fid, h, msgs, 0, name="not obs")


def test_ten_thousand_messages(tmp_path):
    with FeedStore(tmp_path / "feeds.db") as store:
        fid = store.create_feed()
        h = subfeed_hash("big")
        for batch in range(10):
            store.append(fid, "big", [{"n": batch * 1000 + i} for i in range(1000)])
        assert store.count(fid, h) == 10_000
        msgs = store.messages(fid, h)
    assert len(msgs) == 10_000
    assert verify_messages(fid, msgs) == (msgs, None)
    lines = b"".join(message_line(m) for m in msgs).splitlines()
    assert [json.loads(x)["n"] for x in lines] == list(range(10_000))
    with FeedStore(tmp_path / "copy.db") as other:
        assert other.add_signed(fid, h, msgs, 0) == (10_000, None)
        assert other.messages(fid, h, 9_990) == msgs[9_990:]
