"""Wire formats against kachery's published test vectors (reference: kachery.md §1.2, §1.3,
§3.1, §5, §6), byte for byte."""

import hashlib
import os
import stat

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kachery_fs.canonical import canonical_json, canonical_sha1
from kachery_fs.errors import InvalidInput, NotFound, PermissionDenied
from kachery_fs.identity import NodeKey, is_node_id, verify_signature
from kachery_fs.uris import format_uri, is_sha1, normalize_sha1, parse_uri, pathify

TEST_SEED = bytes(range(32))
TEST_NODE_ID = "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"
HELLO = "943a702d06f34599aee1f8da8ef9f7296031d699"  # sha1("Hello, world!")


# -- canonical JSON (§1.3) ---------------------------------------------------------------

def test_canonical_json_vector():
    obj = {"a": 1.0, "b": 1.5, "n": None, "nested": {"z": {"q": 1}, "a": 2}, "u": "é"}
    assert canonical_json(obj) == '{"a":1,"b":1.5,"n":null,"nested":{"a":2,"z":{"q":1}},"u":"é"}'
    assert canonical_sha1(obj) == "efaab04bd4d292d3fd8d1f64f181adc336057dc8"


@pytest.mark.parametrize("value, js", [
    (1e-7, "1e-7"), (1.5e-7, "1.5e-7"), (0.000001, "0.000001"), (0.001, "0.001"),
    (123.456, "123.456"), (-2.5, "-2.5"), (1e21, "1e+21"), (1.5e22, "1.5e+22"),
    (1e20, "100000000000000000000"), (2.0**53, "9007199254740992"), (0.1, "0.1"),
    (-0.0, "0"), (5e-324, "5e-324"), (1.7976931348623157e308, "1.7976931348623157e+308"),
])
def test_canonical_numbers_format_as_javascript(value, js):
    assert canonical_json(value) == js


def test_canonical_keys_sort_in_utf16_order():
    # U+FF5E sorts after U+1F600 in UTF-16 code units (surrogates are 0xD83D...), before
    # it in code points: JavaScript sorts by code units.
    assert canonical_json({"\uff5e": 1, "\U0001f600": 2}) == '{"😀":2,"～":1}'


# Python reads a JSON integer exactly; JavaScript reads it as the nearest double (ties to
# even) and prints that (vectors from node: JSON.stringify(JSON.parse(text))).
@pytest.mark.parametrize("value, js", [
    (2**53 - 1, "9007199254740991"), (2**53, "9007199254740992"),
    (2**53 + 1, "9007199254740992"), (-(2**53) - 1, "-9007199254740992"),
    (10**17, "100000000000000000"), (2**60, "1152921504606847000"),
    (2**64 - 1, "18446744073709552000"), (-(10**20), "-100000000000000000000"),
    (10**21 - 1, "1e+21"), (10**21, "1e+21"), (123456789012345678901234, "1.2345678901234569e+23"),
    pytest.param(2**1024 - 2**971, "1.7976931348623157e+308", id="largest-double"),
])
def test_canonical_integers_beyond_2_53_format_as_javascript_reads_them(value, js):
    assert canonical_json(value) == js
    assert canonical_json({"n": [value]}) == '{"n":[' + js + ']}'


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), {1: 2}, object(), 2**1024])
def test_canonical_rejects_what_json_cannot_carry(bad):
    with pytest.raises(InvalidInput):
        canonical_json(bad)


def test_file_key_hash_vector():  # §1.2
    assert canonical_sha1({"sha1": HELLO}) == "55cafe3497996b9d451e640c83378edd7d7a2108"


def test_task_hash_vector():  # §6
    obj = {"functionId": "echo_immediate.2", "kwargs": {"a": "hello world"}}
    assert canonical_sha1(obj) == "a4238a526e436c220b637882d4b24818fa9b702a"


# -- identities and signatures (§3.1, §5) ------------------------------------------------

def test_node_id_and_pem_vector():
    key = NodeKey.from_seed(TEST_SEED)
    assert key.node_id == TEST_NODE_ID
    assert key.public_pem().splitlines()[1] == "MCowBQYDK2VwAyEAA6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="
    assert key.private_pem().splitlines()[0] == "-----BEGIN PRIVATE KEY-----"
    assert NodeKey.from_private_pem(key.private_pem()).node_id == TEST_NODE_ID


def test_signature_vector():
    key = NodeKey.from_seed(TEST_SEED)
    body = {"type": "getNodeConfig", "nodeId": TEST_NODE_ID, "ownerId": "user@example.org"}
    assert canonical_json(body) == (
        f'{{"nodeId":"{TEST_NODE_ID}","ownerId":"user@example.org","type":"getNodeConfig"}}')
    assert canonical_sha1(body) == "a030cfca175c49ec18435e67855626c67df44f81"
    sig = key.sign(body)
    assert sig == ("e0be30dd53a9941ecccababc3d5d744f52fef160b60fd64c0b6764652bc4ddb2"
                   "6475acc5853a5698f764e317273b408ef6c0d0590ac54b1f076b1c338952bc0d")
    assert verify_signature(body, sig, TEST_NODE_ID)


def test_feed_message_vector():
    key = NodeKey.from_seed(TEST_SEED)
    body0 = {"message": {"n": 1, "p": 2}, "messageNumber": 0, "timestamp": 1700000000000}
    assert canonical_json(body0) == (
        '{"message":{"n":1,"p":2},"messageNumber":0,"timestamp":1700000000000}')
    sig0 = key.sign(body0)
    assert sig0.startswith("72591fbf") and sig0.endswith("bb09")


def test_verify_rejects_tampering_and_garbage():
    key, other = NodeKey.from_seed(TEST_SEED), NodeKey.generate()
    body = {"x": 1}
    sig = key.sign(body)
    assert not verify_signature({"x": 2}, sig, key.node_id)
    assert not verify_signature(body, sig, other.node_id)
    assert not verify_signature(body, sig[:-2] + "00", key.node_id)
    for bad_sig in (None, 7, "zz" * 64, sig[:-1]):
        assert not verify_signature(body, bad_sig, key.node_id)
    for bad_id in (None, "", "00" * 32, key.node_id.upper(), "ab"):
        assert not verify_signature(body, sig, bad_id)
    assert not verify_signature({"bad": float("nan")}, sig, key.node_id)


def test_verify_accepts_legacy_scheme():
    key = NodeKey.generate()
    body = {"legacy": True}
    legacy_sig = key._key.sign(canonical_json(body).encode()).hex()
    assert verify_signature(body, legacy_sig, key.node_id)


def test_is_node_id():
    assert is_node_id(TEST_NODE_ID)
    assert not is_node_id(TEST_NODE_ID.upper())
    assert not is_node_id(TEST_NODE_ID[:-1])
    assert not is_node_id(None)


def test_key_files_round_trip_and_permissions(tmp_path):
    key = NodeKey.generate()
    key.save(tmp_path)
    assert stat.S_IMODE((tmp_path / "private.pem").stat().st_mode) == 0o600
    assert NodeKey.load(tmp_path).node_id == key.node_id
    # The public file is kachery's format, one base64 line.
    lines = (tmp_path / "public.pem").read_text().splitlines()
    assert lines[0] == "-----BEGIN PUBLIC KEY-----" and len(lines) == 3
    os.chmod(tmp_path / "private.pem", 0o644)
    with pytest.raises(PermissionDenied, match="chmod 600"):
        NodeKey.load(tmp_path)
    with pytest.raises(NotFound):
        NodeKey.load(tmp_path / "nowhere")


@pytest.mark.parametrize("text", ["", "garbage", "-----BEGIN PRIVATE KEY-----\n!!\n-----END PRIVATE KEY-----",
                                  NodeKey.generate().public_pem()])
def test_bad_private_pem(text):
    with pytest.raises(InvalidInput):
        NodeKey.from_private_pem(text)


# -- URIs (§1.1) -------------------------------------------------------------------------

@pytest.mark.parametrize("text, label", [
    (f"sha1://{HELLO}", None),
    (HELLO, None),
    (HELLO.upper(), None),
    (f"SHA1://{HELLO.upper()}", None),
    (f"sha1://{HELLO}/hello.txt", "hello.txt"),
    (f"sha1://{HELLO}.txt", None),
    (f"sha1://{HELLO}?label=a%20b.txt", "a b.txt"),
    (f"sha1://{HELLO}/x/y.bin?manifest={'0' * 40}", "y.bin"),
    (f"  sha1://{HELLO}\n", None),
    (f"sha1://{HELLO}/a%20b.txt", "a b.txt"),
    # kachery 2: kachery:<zone>:sha1:<hash>[:<URL-quoted label>]; its default zone is ""
    (f"kachery::sha1:{HELLO}:test_content.txt", "test_content.txt"),
    (f"kachery:scratch:sha1:{HELLO}", None),
    (f"kachery:scratch:sha1:{HELLO}:", None),
    (f"KACHERY:scratch:SHA1:{HELLO.upper()}:a%20b%3Ac.txt", "a b:c.txt"),
    (f"kachery::sha1:{HELLO}:a:b", "a:b"),
])
def test_parse_uri_is_lenient(text, label):
    uri = parse_uri(text)
    assert uri.sha1 == HELLO
    assert uri.label == label


@pytest.mark.parametrize("text", ["", "sha1://", f"sha1://{HELLO[:-1]}", f"md5://{HELLO}",
                                  "sha1://" + "g" * 40, f"feed://{HELLO}", HELLO + "0",
                                  "kachery:", "kachery:z:sha1", f"kachery::md5:{HELLO}",
                                  f"kachery::sha1:{HELLO[:-1]}", f"kachery:sha1:{HELLO}",
                                  f"kachery-feed://{HELLO}"])
def test_parse_uri_rejects(text):
    with pytest.raises(InvalidInput):
        parse_uri(text)


def test_kachery2_uris_keep_their_zone_and_are_read_by_hash():
    uri = parse_uri(f"kachery:scratch:sha1:{HELLO}:x.txt")
    assert (uri.zone, uri.sha1, uri.manifest) == ("scratch", HELLO, None)
    assert str(uri) == f"sha1://{HELLO}?label=x.txt"
    assert parse_uri(f"kachery::sha1:{HELLO}").zone == ""
    assert parse_uri(f"sha1://{HELLO}").zone is None


def test_a_manifest_in_a_uri_is_checked():
    assert parse_uri(f"sha1://{HELLO}?manifest={HELLO.upper()}").manifest == HELLO
    with pytest.raises(InvalidInput, match="manifest="):
        parse_uri(f"sha1://{HELLO}?manifest=xyz").manifest  # noqa: B018


def test_format_uri():
    assert format_uri(HELLO.upper()) == f"sha1://{HELLO}"
    assert format_uri(HELLO, "my file?.txt") == f"sha1://{HELLO}?label=my%20file%3F.txt"
    assert parse_uri(format_uri(HELLO, "a/b&c=d")).label == "a/b&c=d"


def test_format_uri_with_a_manifest_is_kacherys_form():
    m = "16c2995c8d00a8861fdd81187e2fb231240d5083"
    uri = format_uri(HELLO, "zeros.bin", manifest=m.upper())
    assert uri == f"sha1://{HELLO}/zeros.bin?manifest={m}"
    parsed = parse_uri(uri)
    assert (parsed.sha1, parsed.label, parsed.query["manifest"]) == (HELLO, "zeros.bin", m)
    assert format_uri(HELLO, "a b", manifest=m) == f"sha1://{HELLO}/a%20b?manifest={m}"
    assert format_uri(HELLO, manifest=m) == f"sha1://{HELLO}?manifest={m}"
    with pytest.raises(InvalidInput):
        format_uri("nothex")


def test_hash_helpers():
    assert hashlib.sha1(b"Hello, world!").hexdigest() == HELLO
    assert is_sha1(HELLO) and is_sha1(HELLO.upper()) and not is_sha1(HELLO + "a")
    assert normalize_sha1(HELLO.upper()) == HELLO
    assert pathify(HELLO) == f"94/3a/70/{HELLO}"


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)


@given(_json_values)
def test_the_fast_path_gives_the_same_text_as_the_js_algorithm(value):
    from kachery_fs.canonical import _write

    out: list[str] = []
    _write(value, out)
    assert canonical_json(value) == "".join(out)
