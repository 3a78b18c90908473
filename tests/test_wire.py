"""The one wire format: round trips, and every malformed frame is rejected before it is parsed."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregation import wire

header_values = st.one_of(st.integers(-(2**53), 2**53), st.text(max_size=20), st.booleans(), st.none())
dtypes = st.sampled_from([np.float32, np.float64, np.int64, np.uint32, np.uint8])


@st.composite
def frames(draw):
    kind = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz/-", min_size=1, max_size=30))
    header = draw(st.dictionaries(st.text(max_size=10), header_values, max_size=5))
    names = draw(st.lists(st.text(alphabet="abcdefgh/_0123456789", min_size=1, max_size=8), max_size=4, unique=True))
    tensors = {n: np.arange(draw(st.integers(0, 50)), dtype=draw(dtypes)) for n in names}
    return wire.Frame(kind, header, tensors)


@given(frames())
@settings(max_examples=150, deadline=None)
def test_every_frame_round_trips(frame):
    back = wire.decode(wire.encode(frame))
    assert back.kind == frame.kind and back.header == dict(frame.header)
    assert set(back.tensors) == set(frame.tensors)
    for k, v in frame.tensors.items():
        np.testing.assert_array_equal(back.tensors[k], v)
        assert back.tensors[k].dtype == v.dtype


@given(frames(), st.data())
@settings(max_examples=150, deadline=None)
def test_truncated_or_extended_frames_are_rejected(frame, data):
    raw = wire.encode(frame)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(wire.WireError):
        wire.decode(raw[:cut])
    with pytest.raises(wire.WireError):
        wire.decode(raw + b"\x00")


@given(st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_random_bytes_never_crash_the_decoder(blob):
    try:
        wire.decode(blob)
    except wire.WireError:
        pass


def test_a_forged_header_length_is_rejected_without_reading_past_the_frame():
    raw = bytearray(wire.encode(wire.Frame("x/y", {"a": 1})))
    struct.pack_into(">I", raw, 6 + 3, 2**31)
    with pytest.raises(wire.WireError, match="header length"):
        wire.decode(bytes(raw))


def test_wrong_kind_wrong_version_and_oversize_are_named():
    raw = wire.encode(wire.Frame("plain/update", {"round": 1}))
    with pytest.raises(wire.WireError, match="expected a secagg/x frame, got 'plain/update'"):
        wire.decode(raw, expect="secagg/x")
    bumped = raw[:4] + bytes([9]) + raw[5:]
    with pytest.raises(wire.WireError, match="unsupported wire version 9"):
        wire.decode(bumped)
    with pytest.raises(wire.WireError, match="limit 10"):
        wire.decode(raw, max_bytes=10)


def test_field_and_tensor_accessors_check_types_and_shapes():
    f = wire.decode(wire.encode(wire.Frame("k", {"round": True, "n": 3}, {"v": np.zeros(4, np.float32)})))
    with pytest.raises(wire.WireError, match="'round' must be int, got bool"):
        f.field("round", int)
    assert f.field("n", int) == 3
    with pytest.raises(wire.WireError, match="must be int64, got float32"):
        f.tensor("v", np.int64)
    with pytest.raises(wire.WireError, match=r"shape \(5,\)"):
        f.tensor("v", np.float32, (5,))
    with pytest.raises(wire.WireError, match="'missing' is missing"):
        f.field("missing", int)


def test_nothing_on_the_wire_is_unpickled():
    import pickle

    evil = pickle.dumps({"a": 1})
    with pytest.raises(wire.WireError):
        wire.decode(evil)


def _raw(header: str) -> bytes:
    kind, head = b"k", header.encode()
    return wire.MAGIC + struct.pack(">BB", wire.WIRE_VERSION, 1) + kind + struct.pack(">I", len(head)) + head + struct.pack(">I", 0)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3 * wire.MAX_HEADER_DEPTH), st.sampled_from("[{"), st.text(alphabet='[]{}"\\', max_size=8))
def test_header_depth_is_bounded_before_parsing_and_brackets_in_strings_do_not_count(depth, bracket, noise):
    value = "1"
    for _ in range(depth - 1):
        value = f"[{value}]" if bracket == "[" else f'{{"a":{value}}}'
    header = json.dumps({"s": noise})[:-1] + f',"v":{value}}}'
    if depth <= wire.MAX_HEADER_DEPTH:
        assert wire.decode(_raw(header)).header["s"] == noise
    else:
        with pytest.raises(wire.WireError, match="levels deep"):
            wire.decode(_raw(header))


@pytest.mark.parametrize("digits, ok", [(wire.MAX_INT_DIGITS, True), (wire.MAX_INT_DIGITS + 1, False), (5000, False)])
def test_header_integers_are_bounded_in_length(digits, ok):
    header = '{"n":-' + "9" * digits + "}"
    if ok:
        assert wire.decode(_raw(header)).header["n"] == -int("9" * digits)
    else:
        with pytest.raises(wire.WireError, match="digits"):
            wire.decode(_raw(header))


# ---------------------------------------------------------------- zero-copy safetensors payload (issue 16)


@given(frames())
@settings(max_examples=100, deadline=None)
def test_the_payload_is_safetensors_both_ways(frame):
    """Our writer's payload loads with the safetensors package, and its payload decodes with ours."""
    from safetensors.numpy import load, save

    raw = wire.encode(frame)
    klen = raw[5]
    hlen = struct.unpack_from(">I", raw, 6 + klen)[0]
    start = 6 + klen + 4 + hlen + 4
    if frame.tensors:
        theirs = load(raw[start:])
        assert set(theirs) == set(frame.tensors)
        for k, v in frame.tensors.items():
            np.testing.assert_array_equal(theirs[k], v)
            assert theirs[k].dtype == v.dtype
        payload = save(dict(frame.tensors))
        head = raw[: start - 4] + struct.pack(">I", len(payload)) + payload
        back = wire.decode(head)
        for k, v in frame.tensors.items():
            np.testing.assert_array_equal(back.tensors[k], v)
            assert back.tensors[k].dtype == v.dtype


def test_a_decoded_tensor_is_a_read_only_view_of_the_frame():
    raw = wire.encode(wire.Frame("k", {}, {"v": np.arange(100_001, dtype=np.uint32)}))
    v = wire.decode(raw).tensors["v"]
    assert not v.flags.writeable and not v.flags.owndata
    assert np.shares_memory(v, np.frombuffer(raw, dtype=np.uint8))
    np.testing.assert_array_equal(v, np.arange(100_001, dtype=np.uint32))


def _with_tensor_header(entries: dict, body: bytes) -> bytes:
    head = json.dumps(entries).encode()
    payload = struct.pack("<Q", len(head)) + head + body
    return (
        wire.MAGIC
        + struct.pack(">BB", wire.WIRE_VERSION, 1)
        + b"k"
        + struct.pack(">I", 2)
        + b"{}"
        + struct.pack(">I", len(payload))
        + payload
    )


@pytest.mark.parametrize(
    "entries, body, match",
    [
        ({"a": {"dtype": "U32", "shape": [3], "data_offsets": [0, 12]}}, b"\0" * 8, "outside the 8 bytes"),
        ({"a": {"dtype": "U32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "shape"),
        ({"a": {"dtype": "U32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "non-negative"),
        ({"a": {"dtype": "U32", "shape": [2.0], "data_offsets": [0, 8]}}, b"\0" * 8, "non-negative"),
        ({"a": {"dtype": "U32", "shape": [True, 2], "data_offsets": [0, 8]}}, b"\0" * 8, "non-negative"),
        ({"a": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8, "does not carry"),
        ({"a": {"dtype": "U32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, "after the last tensor"),
        (
            {"a": {"dtype": "U32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "U32", "shape": [1], "data_offsets": [4, 8]}},
            b"\0" * 8,
            "gap or overlap",
        ),
        ({"a": {"dtype": "U32", "shape": [1], "data_offsets": [0, 4], "x": 1}}, b"\0" * 4, "exactly dtype"),
        ({"__metadata__": {"a": 1}}, b"", "__metadata__"),
    ],
)
def test_a_forged_tensor_header_is_refused_before_any_view_is_made(entries, body, match):
    with pytest.raises(wire.WireError, match=match):
        wire.decode(_with_tensor_header(entries, body))


def test_a_tensor_header_length_past_the_payload_and_duplicate_names_are_refused():
    raw = bytearray(_with_tensor_header({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\0"))
    start = len(raw) - 1 - len(json.dumps({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}})) - 8
    struct.pack_into("<Q", raw, start, 2**63)
    with pytest.raises(wire.WireError, match="header length"):
        wire.decode(bytes(raw))
    dup = '{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'
    payload = struct.pack("<Q", len(dup)) + dup.encode() + b"\0"
    frame = (
        wire.MAGIC
        + struct.pack(">BB", wire.WIRE_VERSION, 1)
        + b"k"
        + struct.pack(">I", 2)
        + b"{}"
        + struct.pack(">I", len(payload))
        + payload
    )
    with pytest.raises(wire.WireError, match="same key twice"):
        wire.decode(frame)
