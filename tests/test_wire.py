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
