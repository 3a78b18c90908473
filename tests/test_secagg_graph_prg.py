"""The public masking graph (Harary, keyed permutation) and the AES-CTR mask expansion."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregation.secagg import prg
from aggregation.secagg.graph import neighbours, neighbours_of
from aggregation.secagg.prg import expand


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 60), st.integers(1, 70), st.integers(0, 5))
def test_graph_is_symmetric_has_degree_k_and_every_party_computes_the_same_one(n, k, rnd):
    session = os.urandom(16)
    ids = list(range(100, 100 + n))
    g = neighbours(session, rnd, ids, k)
    kk = min(k, n - 1)
    for c, peers in g.items():
        assert c not in peers
        assert all(c in g[p] for p in peers)
        assert kk <= len(peers) <= kk + 1  # odd k with odd n: one node gets the extra diameter edge
        assert neighbours_of(session, rnd, list(reversed(ids)), k, c) == peers
    if n % 2 == 0 or k % 2 == 0 or kk == n - 1:
        assert all(len(p) == kk for p in g.values())


def test_graph_changes_with_round_and_session():
    ids = list(range(200))
    s = os.urandom(16)
    a = neighbours(s, 0, ids, 8)
    assert a != neighbours(s, 1, ids, 8)
    assert a != neighbours(os.urandom(16), 0, ids, 8)
    assert a == neighbours(s, 0, ids, 8)


def test_mask_expansion_is_deterministic_per_seed_and_unrelated_across_seeds():
    seed = os.urandom(32)
    a = expand(seed, 10_000, np.uint32)
    assert np.array_equal(a, expand(seed, 10_000, np.uint32))
    b = expand(os.urandom(32), 10_000, np.uint32)
    assert np.mean(a == b) < 0.001
    wide = expand(seed, 5_000, np.uint64)
    assert wide.dtype == np.uint64 and wide.tobytes() == a.tobytes()  # same keystream, read as uint64
    assert 0.45 < (a >> np.uint32(31)).mean() < 0.55


def test_mask_expansion_refuses_short_seeds_and_other_dtypes():
    with pytest.raises(ValueError, match="32 bytes"):
        expand(b"\0" * 16, 10, np.uint32)
    with pytest.raises(ValueError, match="uint32 or uint64"):
        expand(b"\0" * 32, 10, np.int32)


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
@pytest.mark.parametrize("length", [1, 65_535, 65_536, 65_537, 100_001, 300_000])
def test_add_mask_in_pieces_equals_one_expanded_mask(dtype, length):
    """add_mask works in CHUNK_BYTES pieces; the sum must be exactly acc ± expand(seed) at every size."""
    seed = bytes(range(32))
    base = np.arange(length, dtype=dtype) * dtype(2654435761)
    mask = prg.expand(seed, length, dtype)
    plus, minus = base.copy(), base.copy()
    prg.add_mask(plus, seed, +1)
    prg.add_mask(minus, seed, -1)
    np.testing.assert_array_equal(plus, base + mask)
    np.testing.assert_array_equal(minus, base - mask)
