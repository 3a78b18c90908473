"""The consistency-round frames: round trips, and any malformed frame is a ProtocolError (never
another exception, never an over-long list, an unsorted or foreign survivor set)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregation import wire
from aggregation.base import ProtocolError, RoundContext
from aggregation.secagg.messages import ConsistencyRequest, ConsistencySignature, UnmaskRequest

CTX = RoundContext(os.urandom(16), 4, tuple(range(3, 23)), 10)  # participants 3..22
DECODERS = [ConsistencyRequest, ConsistencySignature, UnmaskRequest]
ints = st.lists(st.integers(-(2**40), 2**40), max_size=40)


def _header(draw_kind, receiver=5):
    return {"session": CTX.session_id.hex(), "round": CTX.round, "receiver": receiver, "sender": receiver}


@given(st.binary(max_size=400), st.sampled_from(DECODERS))
@settings(max_examples=200, deadline=None)
def test_random_bytes_are_refused_as_protocol_errors(blob, cls):
    with pytest.raises(ProtocolError):
        cls.decode(blob, CTX, 5)


@given(
    st.sampled_from(DECODERS),
    st.dictionaries(
        st.sampled_from(["survivors", "signers", "signatures", "signature", "extra"]),
        st.one_of(
            ints.map(lambda v: np.array(v, dtype=np.int64)),
            st.binary(max_size=200).map(lambda b: np.frombuffer(b, np.uint8)),
            st.lists(st.floats(allow_nan=True), max_size=8).map(lambda v: np.array(v, dtype=np.float64)),
        ),
        max_size=4,
    ),
)
@settings(max_examples=300, deadline=None)
def test_structurally_valid_frames_with_arbitrary_tensors_decode_only_when_well_formed(cls, tensors):
    raw = wire.encode(wire.Frame(cls.KIND, _header(cls), tensors))
    try:
        msg = cls.decode(raw, CTX, 5)
    except ProtocolError:
        return
    if cls is ConsistencySignature:
        assert len(msg.signature) == 64
        return
    s = msg.survivors
    assert s.dtype == np.int64 and s.size <= len(CTX.participants)
    assert np.all(np.diff(s) > 0) and set(s.tolist()) <= set(CTX.participants)
    if cls is UnmaskRequest:
        assert msg.signatures.shape == (msg.signers.size, 64) and np.unique(msg.signers).size == msg.signers.size


@given(st.lists(st.sampled_from(CTX.participants), unique=True, max_size=20), st.data())
@settings(max_examples=100, deadline=None)
def test_well_formed_requests_round_trip(survivors, data):
    s = np.array(sorted(survivors), dtype=np.int64)
    assert np.array_equal(ConsistencyRequest.decode(ConsistencyRequest(s).encode(CTX, 7), CTX, 7).survivors, s)
    m = data.draw(st.integers(0, s.size))
    sigs = np.frombuffer(os.urandom(64 * m), np.uint8).reshape(m, 64)
    back = UnmaskRequest.decode(UnmaskRequest(s, s[:m], sigs).encode(CTX, 7), CTX, 7)
    assert np.array_equal(back.survivors, s) and np.array_equal(back.signers, s[:m]) and np.array_equal(back.signatures, sigs)


def test_unsorted_foreign_or_oversized_survivor_sets_are_refused_by_name():
    bad = [
        (np.array([5, 4], np.int64), "not sorted"),
        (np.array([4, 4], np.int64), "lists a client twice"),
        (np.array([0, 4], np.int64), "outside the round"),
        (np.arange(3, 40, dtype=np.int64), "at most 20"),
    ]
    for survivors, msg in bad:
        raw = wire.encode(wire.Frame(ConsistencyRequest.KIND, _header(None), {"survivors": survivors}))
        with pytest.raises(ProtocolError, match=msg):
            ConsistencyRequest.decode(raw, CTX, 5)
    sigs = np.zeros((2, 64), np.uint8)
    raw = UnmaskRequest(np.array([4, 5], np.int64), np.array([4], np.int64), sigs).encode(CTX, 5)
    with pytest.raises(ProtocolError, match="signatures"):
        UnmaskRequest.decode(raw, CTX, 5)
    with pytest.raises(ProtocolError, match="round 3, this is round 4"):
        ConsistencySignature.decode(
            ConsistencySignature(b"\0" * 64).encode(RoundContext(CTX.session_id, 3, CTX.participants, 10), 5), CTX, 5
        )
