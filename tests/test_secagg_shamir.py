"""Shamir sharing over GF(2^61 - 1): known answers, field arithmetic, any-t-of-n reconstruction."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregation.secagg import shamir

P = shamir.P
u64 = lambda xs: np.array(xs, dtype=np.uint64)  # noqa: E731


def test_known_answer_small_polynomial():
    # f(x) = 5 + 3x + 7x^2: f(1) = 15, f(2) = 39, f(3) = 77
    xs = u64([[1, 2, 3]])
    shares = u64([[[15], [39], [77]]])
    assert shamir.reconstruct(xs, shares).tolist() == [[5]]
    # and from the points in another order
    assert shamir.reconstruct(u64([[3, 1, 2]]), u64([[[77], [15], [39]]])).tolist() == [[5]]


def test_known_answer_near_the_modulus():
    # f(x) = (p - 1) + (p - 2) x over GF(p): f(1) = p - 3, f(2) = p - 5 (computed with Python ints)
    a0, a1 = P - 1, P - 2
    ys = [(a0 + a1 * x) % P for x in (1, 2)]
    assert ys == [P - 3, P - 5]
    assert shamir.reconstruct(u64([[1, 2]]), u64([[[ys[0]], [ys[1]]]])).tolist() == [[P - 1]]


def test_known_answer_lagrange_coefficients():
    # points 1, 2, 3: l_j(0) = 3, -3, 1
    lam = shamir.lagrange_at_zero(u64([[1, 2, 3]]))
    assert lam.tolist() == [[3, P - 3, 1]]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, P - 1), st.integers(0, P - 1)), min_size=1, max_size=50))
def test_mulmod_matches_python_integers(pairs):
    a = u64([p[0] for p in pairs])
    b = u64([p[1] for p in pairs])
    assert shamir.mulmod(a, b).tolist() == [(x * y) % P for x, y in pairs]


@settings(max_examples=50, deadline=None)
@given(st.integers(1, P - 1))
def test_inverse_times_value_is_one(a):
    assert int(shamir.mulmod(u64([a]), shamir.invmod(u64([a])))[0]) == 1


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(0, 12), st.data())
def test_any_t_shares_reconstruct_every_secret(t, extra, data):
    n = t + extra
    secret = os.urandom(64)
    elements = shamir.bytes_to_elements(secret)
    ids = data.draw(st.lists(st.integers(0, 10**9), min_size=n, max_size=n, unique=True))
    xs = u64(ids) + np.uint64(1)
    shares = shamir.split(elements, xs, t)
    pick = data.draw(st.permutations(range(n)))[:t]
    rec = shamir.reconstruct(xs[pick][None, :], shares[pick][None, :, :])[0]
    assert shamir.elements_to_bytes(rec, 64) == secret


def test_fewer_than_t_shares_give_a_wrong_secret():
    secret = os.urandom(32)
    el = shamir.bytes_to_elements(secret)
    xs = u64([1, 2, 3, 4, 5])
    shares = shamir.split(el, xs, 4)
    rec = shamir.reconstruct(xs[None, :3], shares[None, :3])[0]
    assert not np.array_equal(rec, el)


def test_batched_reconstruction_of_many_groups_at_once():
    secrets = [os.urandom(32) for _ in range(40)]
    xs_all, ys_all = [], []
    for s in secrets:
        xs = u64(np.random.default_rng(len(xs_all)).choice(1000, 5, replace=False) + 1)
        sh = shamir.split(shamir.bytes_to_elements(s), xs, 3)
        xs_all.append(xs[:3])
        ys_all.append(sh[:3])
    rec = shamir.reconstruct(np.stack(xs_all), np.stack(ys_all))
    assert [shamir.elements_to_bytes(r, 32) for r in rec] == secrets


def test_bytes_round_trip_and_padding_check():
    data = os.urandom(32)
    el = shamir.bytes_to_elements(data)
    assert el.shape == (5,) and np.all(el < np.uint64(1 << 56))
    assert shamir.elements_to_bytes(el, 32) == data
    with pytest.raises(ValueError, match="padding"):
        shamir.elements_to_bytes(el, 31)
    with pytest.raises(ValueError, match="not a valid secret chunk"):
        shamir.elements_to_bytes(u64([1 << 60]), 7)


def test_invalid_points_and_thresholds_are_refused():
    el = shamir.bytes_to_elements(b"x" * 7)
    with pytest.raises(ValueError, match="distinct non-zero"):
        shamir.split(el, u64([0, 1, 2]), 2)
    with pytest.raises(ValueError, match="distinct non-zero"):
        shamir.split(el, u64([1, 1, 2]), 2)
    with pytest.raises(ValueError, match="cannot meet threshold"):
        shamir.split(el, u64([1, 2]), 3)
    with pytest.raises(ValueError, match="distinct"):
        shamir.reconstruct(u64([[1, 1]]), np.zeros((1, 2, 1), np.uint64))
    with pytest.raises(ZeroDivisionError):
        shamir.invmod(u64([0]))
