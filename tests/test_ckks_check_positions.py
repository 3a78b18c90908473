"""The secret check-slot positions (aggregation/ckks/masking.py) are memoised per process: same values, no shared state."""

from __future__ import annotations

import numpy as np

from aggregation.ckks import masking
from aggregation.secagg import prg


def _direct(key: bytes, session: bytes, rnd: int, slots: int, checks: int) -> np.ndarray:
    values = prg.expand(masking._seed(key, masking.LABEL_POSITIONS, session, rnd, slots), slots, np.uint64)
    return np.sort(np.argsort(values, kind="stable")[:checks])


def test_memoised_positions_equal_the_prf_permutation_and_differ_per_key_and_round():
    key, other, session = bytes(range(32)), bytes(32), b"s" * 16
    first = masking.check_positions(key, session, 3, 5000, 64)
    again = masking.check_positions(key, session, 3, 5000, 64)
    np.testing.assert_array_equal(first, _direct(key, session, 3, 5000, 64))
    np.testing.assert_array_equal(again, first)
    assert first.size == 64 and np.all(np.diff(first) > 0) and first.max() < 5000
    assert not np.array_equal(masking.check_positions(other, session, 3, 5000, 64), first)
    assert not np.array_equal(masking.check_positions(key, session, 4, 5000, 64), first)


def test_a_caller_that_changes_its_positions_does_not_change_the_next_clients():
    key, session = bytes(range(1, 33)), b"t" * 16
    mine = masking.check_positions(key, session, 0, 3000, 32)
    expected = mine.copy()
    mine[:] = 0
    np.testing.assert_array_equal(masking.check_positions(key, session, 0, 3000, 32), expected)
