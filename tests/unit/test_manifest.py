"""Kachery manifests (reference: kachery.md §1.4), byte for byte."""

from __future__ import annotations

import hashlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kachery_fs.errors import IntegrityError
from kachery_fs.manifest import CHUNK_SIZE, Manifest, ManifestBuilder, manifest_of

ZEROS = 45_000_000


def test_the_reference_vector_of_45_million_zero_bytes():
    block = bytes(1 << 20)
    blocks = [block] * (ZEROS // len(block)) + [bytes(ZEROS % len(block))]
    sha1, manifest = manifest_of(blocks)
    assert sha1 == "bae479b185f44d623de8c7ee6e9a41961fd411f9"
    assert manifest is not None and manifest.size == ZEROS and manifest.sha1 == sha1
    assert [(c.start, c.end) for c in manifest.chunks] == [
        (0, 20_000_000), (20_000_000, 40_000_000), (40_000_000, 45_000_000)]
    first, second, last = (c.sha1 for c in manifest.chunks)
    assert first == second and first.startswith("59cc614a") and first.endswith("8c96")
    assert last.startswith("95775c45") and last.endswith("58a4")
    assert manifest.hash == "16c2995c8d00a8861fdd81187e2fb231240d5083"
    assert manifest.to_bytes().startswith(b'{"size":45000000,"sha1":"bae479b1')
    assert Manifest.parse(manifest.to_bytes(), sha1=sha1) == manifest


def test_a_file_of_one_chunk_or_less_has_no_manifest():
    assert manifest_of([bytes(CHUNK_SIZE)]) == (hashlib.sha1(bytes(CHUNK_SIZE)).hexdigest(),
                                                 None)
    assert manifest_of([]) == (hashlib.sha1(b"").hexdigest(), None)


def test_the_builder_gives_the_same_manifest_however_the_bytes_arrive():
    data = bytes(range(256)) * (CHUNK_SIZE // 256 + 3)  # a little over one chunk
    whole = manifest_of([data])
    assert manifest_of([data[i:i + 7_777_777] for i in range(0, len(data), 7_777_777)]) == whole
    builder = ManifestBuilder()
    builder.update(memoryview(data)[:CHUNK_SIZE])
    builder.update(memoryview(data)[CHUNK_SIZE:])
    assert builder.finish() == whole
    assert whole[1] is not None and whole[1].chunks[1].sha1 == hashlib.sha1(
        data[CHUNK_SIZE:]).hexdigest()


def _doc(size=ZEROS, sha1="a" * 40, chunks=None):
    if chunks is None:
        chunks = [{"start": s, "end": min(s + CHUNK_SIZE, size), "sha1": "b" * 40}
                  for s in range(0, size, CHUNK_SIZE)]
    return json.dumps({"size": size, "sha1": sha1, "chunks": chunks}).encode()


@pytest.mark.parametrize("data, why", [
    (b"not json", "not JSON"),
    (b"[]", "not a JSON object"),
    (json.dumps({"size": ZEROS, "sha1": "a" * 40}).encode(), "needs size, sha1 and chunks"),
    (_doc(size=-1), "needs size"),
    (_doc(size=True), "needs size"),
    (_doc(sha1="nope"), "needs size"),
    (_doc(size=CHUNK_SIZE, chunks=[{"start": 0, "end": CHUNK_SIZE, "sha1": "b" * 40}]),
     "more than 20,000,000 bytes"),
    (_doc(chunks=[{"start": 0, "end": ZEROS, "sha1": "b" * 40}]), "has 3 chunks, not 1"),
    (_doc(chunks=[{"start": 0, "end": 20_000_000, "sha1": "b" * 40},
                  {"start": 20_000_000, "end": 39_000_000, "sha1": "b" * 40},
                  {"start": 39_000_000, "end": ZEROS, "sha1": "b" * 40}]),
     "chunk 1 of the manifest is not bytes 20,000,000 to 40,000,000"),
    (_doc(chunks=[{"start": 0, "end": 20_000_000, "sha1": "b" * 40},
                  {"start": 20_000_000, "end": 40_000_000, "sha1": "x"},
                  {"start": 40_000_000, "end": ZEROS, "sha1": "b" * 40}]), "chunk 1"),
    (_doc(size=10 ** 18, chunks=[]), "chunks, not 0"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
])
def test_a_malformed_manifest_is_refused(data, why):
    with pytest.raises(IntegrityError, match=why):
        Manifest.parse(data)


def test_a_manifest_of_another_file_is_refused():
    with pytest.raises(IntegrityError, match="not of sha1://cccc"):
        Manifest.parse(_doc(), sha1="c" * 40)
    assert Manifest.parse(_doc(), sha1="A" * 40).sha1 == "a" * 40


@given(size=st.integers(CHUNK_SIZE + 1, 10 * CHUNK_SIZE), offset=st.integers(0, 11 * CHUNK_SIZE),
       length=st.integers(0, 3 * CHUNK_SIZE))
def test_chunk_indexes_are_exactly_the_chunks_a_read_overlaps(size, offset, length):
    manifest = Manifest.parse(_doc(size=size))
    touched = manifest.chunk_indexes(offset, length)
    end = min(offset + length, size)
    expected = [i for i, c in enumerate(manifest.chunks)
                if offset < end and c.start < end and offset < c.end]
    assert list(touched) == expected
