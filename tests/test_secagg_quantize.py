"""Fixed-point encoding and the headroom check: never a wrapped (wrong) sum, always a clear refusal."""

from __future__ import annotations

import numpy as np
import pytest

from aggregation.secagg import HeadroomError, SecAggConfig
from aggregation.secagg.quantize import plan


def test_auto_picks_32_bits_when_the_headroom_allows_and_64_when_it_does_not():
    small = plan(clip=1.0, levels="auto", bits="auto", max_weight=100.0, weight_resolution=1 / 1024, max_clients=100)
    assert small.bits == 32 and small.levels == 1 << 17
    assert 100 * (100 * small.levels) < 2**31
    big = plan(clip=1.0, levels="auto", bits="auto", max_weight=1e6, weight_resolution=1.0, max_clients=10_000)
    assert big.bits == 64 and big.levels >= 1 << 10


def test_movielens_defaults_plan_without_wrapping():
    q = SecAggConfig().quantizer(943)  # ml-100k: 943 users, raw example counts as weights
    assert q.bits == 32 and q.levels == 2048 and q.max_weight == 1000.0
    assert 943 * (1000 * q.levels) <= 2**31 - 1


def test_a_configuration_that_could_wrap_is_refused_naming_the_numbers():
    with pytest.raises(HeadroomError, match=r"1000 clients x \(max_weight 1000 x levels 65536.*2\^31 - 1"):
        plan(clip=1.0, levels=65536, bits=32, max_weight=1000.0, weight_resolution=1.0, max_clients=1000)


def test_a_weight_above_max_weight_is_refused_not_wrapped():
    q = SecAggConfig(max_weight=10.0, bits=32).quantizer(4)
    with pytest.raises(HeadroomError, match="weight 11 exceeds aggregation.max_weight=10"):
        q.encode(np.zeros(3), 11.0)


def test_sum_at_the_edge_of_the_headroom_is_exact():
    # every client at max_weight with every coordinate at the clip bound: the worst case
    n = 1000
    q = SecAggConfig(max_weight=700.0, bits=32).quantizer(n)
    enc = [q.encode(np.full(4, sign * 1.0), 700.0) for sign in [1] * n]
    total = np.zeros(5, dtype=q.dtype)
    for e in enc:
        total += e
    s, w = q.decode(total)
    assert w == 700.0 * n
    np.testing.assert_allclose(s, np.full(4, 700.0 * n), rtol=1e-6)
    enc = [q.encode(np.full(4, -1.0), 700.0) for _ in range(n)]
    total = np.zeros(5, dtype=q.dtype)
    for e in enc:
        total += e
    s, _ = q.decode(total)
    np.testing.assert_allclose(s, np.full(4, -700.0 * n), rtol=1e-6)


def test_stochastic_rounding_is_unbiased():
    q = SecAggConfig(levels=4, clip_range=1.0, max_weight=1.0).quantizer(2)
    x = np.full(200_000, 0.3)  # 0.3 * 4 = 1.2 units: rounds to 1 or 2
    enc = q.encode(x, 1.0, rng=np.random.default_rng(0))
    units = enc[:-1].view(np.int32)
    assert set(np.unique(units)) == {1, 2}
    assert abs(units.mean() / q.scale - 0.3) < 0.005


def test_values_outside_the_clip_range_are_clipped():
    q = SecAggConfig(clip_range=0.5, max_weight=2.0).quantizer(2)
    s, w = q.decode(q.encode(np.array([3.0, -3.0, 0.25]), 2.0))
    np.testing.assert_allclose(s, [1.0, -1.0, 0.5], atol=2 / q.scale)
    assert w == 2.0


def test_integer_noise_is_added_and_bounded():
    q = SecAggConfig(max_weight=1.0, levels=1024, noise_bound=5000, bits=32).quantizer(10)
    noise = np.array([7, -3, 0], dtype=np.int64)
    enc = q.encode(np.zeros(3), 1.0, integer_noise=noise)
    assert enc[:-1].view(np.int32).tolist() == [7, -3, 0]
    too_big = np.array([q.client_bound, 0, 0], dtype=np.int64)
    with pytest.raises(HeadroomError, match="could wrap"):
        q.encode(np.zeros(3), 1.0, integer_noise=too_big)
    with pytest.raises(ValueError, match="int64 of shape"):
        q.encode(np.zeros(3), 1.0, integer_noise=np.zeros(3, np.int32))


def test_bad_inputs_are_refused_clearly():
    q = SecAggConfig().quantizer(3)
    with pytest.raises(ValueError, match="NaN or infinity"):
        q.encode(np.array([np.nan]), 1.0)
    with pytest.raises(ValueError, match="non-negative"):
        q.encode(np.zeros(2), -1.0)
    for bad, msg in [
        ({"bits": 16}, "bits must be"),
        ({"clip_range": 0.0}, "clip_range"),
        ({"neighbours": 3, "threshold": 4}, "exceeds neighbours"),
        ({"colluders": 1.0}, "must be fractions"),
        ({"dropouts": -0.1}, "must be fractions"),
        ({"failure_exponent": 0}, "failure_exponent"),
        ({"weight_resolution": 0.0}, "weight_resolution"),
    ]:
        with pytest.raises(ValueError, match=msg):
            SecAggConfig(**bad)


@pytest.mark.parametrize("frac", [0.001, 0.25, 0.5, 0.999])
def test_keystream_coins_round_up_with_the_fractional_part_across_pieces(frac):
    """Unbiased to within sampling error at several fractions, on a vector spanning many cache pieces."""
    from aggregation.secagg import quantize

    q = SecAggConfig(levels=4, clip_range=1.0, max_weight=1.0).quantizer(2)
    n = 5 * quantize._PIECE + 123
    x = np.full(n, (1 + frac) / 4)  # 1 + frac units
    units = q.encode(x, 1.0)[:-1].view(np.int32)
    assert set(np.unique(units)) <= {1, 2}
    up = float((units == 2).mean())
    assert abs(up - frac) < 5 * np.sqrt(frac * (1 - frac) / n) + 1e-9
    # the keystream continues across pieces (never restarts): no two pieces repeat the same coins
    pieces = [units[i : i + quantize._PIECE] for i in range(0, n - quantize._PIECE, quantize._PIECE)]
    assert all(abs(float((p == 2).mean()) - frac) < 5 * np.sqrt(frac * (1 - frac) / p.size) + 1e-9 for p in pieces)


def test_the_coins_are_the_aes_ctr_keystream_of_the_coin_key():
    from aggregation.secagg import prg

    q = SecAggConfig(levels=4, clip_range=1.0, max_weight=1.0).quantizer(2)
    x = np.full(70_000, 0.3)  # 1.2 units
    key = bytes(range(32))
    a, b = q.encode(x, 1.0, coin_key=key), q.encode(x, 1.0, coin_key=key)
    np.testing.assert_array_equal(a, b)
    u = prg.expand(key, x.size, np.uint32).astype(np.float64) * 2.0**-32
    expected = np.floor(1.2 * np.ones(x.size) + u).astype(np.int32)
    np.testing.assert_array_equal(a[:-1].view(np.int32), expected)
    assert not np.array_equal(q.encode(x, 1.0), a)  # the default key is fresh from os.urandom
