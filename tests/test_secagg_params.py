"""Choosing k, t and the consistency quorum from stated colluder / dropout bounds: known answers,
exact hypergeometric tails checked by hand, refusals that name the numbers, and the CLI."""

from __future__ import annotations

import math

import pytest

from aggregation.secagg import ParameterError, SecAggConfig, build, secagg_parameters
from aggregation.secagg.params import log2_dropout_failure, log2_partition_failure, log2_privacy_failure, quorum
from fedrlhf_secure.cli import main as cli


@pytest.mark.parametrize(
    ("n", "k", "t", "q", "c", "d"),
    [
        (10, 6, 4, 6, 1, 1),
        (100, 32, 17, 56, 10, 10),
        (1000, 58, 30, 551, 100, 100),
        (10000, 68, 35, 5501, 1000, 1000),
    ],
)
def test_default_bounds_give_these_parameters(n, k, t, q, c, d):
    """γ = δ = 0.1, every failure probability <= 2^-40 (the table in docs/masking.md)."""
    p = secagg_parameters(n)
    assert (p.k, p.t, p.quorum, p.colluders, p.dropouts) == (k, t, q, c, d)
    assert p.log2_failure <= -40


def test_the_smallest_degree_is_taken_and_one_less_would_fail():
    p = secagg_parameters(1000)
    for k in (p.k - 2,):  # even degrees are tried in order: the previous one cannot meet 2^-40 for any t
        assert all(max(log2_privacy_failure(1000, 100, k, t), log2_dropout_failure(1000, 100, k, t)) > -40 for t in range(1, k + 1))


def test_hypergeometric_tails_match_a_hand_computation():
    # n = 20, 2 colluders, k = 4: P[both colluders are neighbours] = C(17, 2) / C(19, 4) = 136 / 3876
    assert log2_privacy_failure(20, 2, 4, 2) == pytest.approx(math.log2(20 * 136 / 3876))
    assert log2_privacy_failure(20, 2, 4, 3) == -math.inf  # only 2 colluders exist
    # keeping t = 3 of 4 neighbours fails when both dropouts are neighbours: the same number
    assert log2_dropout_failure(20, 2, 4, 3) == pytest.approx(math.log2(20 * 136 / 3876))
    # 3 given ring positions all among 4 removed of 20: C(17, 1) / C(20, 4)
    assert log2_partition_failure(20, 4, 6) == pytest.approx(math.log2(20 * 17 / 4845))
    assert log2_partition_failure(20, 4, 19) == -math.inf  # the complete graph never splits
    assert quorum(1000, 100) == 551  # two sets' quorums share > 100 signers


def test_n_1000_with_the_old_degree_7_is_refused_before_the_round_with_the_numbers():
    with pytest.raises(ParameterError, match=r"n=1000 with colluders <= 100 and dropouts <= 100 .*k=7"):
        build(SecAggConfig(neighbours=7), list(range(1000)), 0)
    assert build(SecAggConfig(), list(range(1000)), 0).config.parameters(1000).k == 58


def test_bounds_no_graph_can_hold_are_refused_naming_the_quorum():
    with pytest.raises(ParameterError, match=r"quorum 8 exceeds the 7 clients left after 3 dropouts"):
        secagg_parameters(10, colluders=0.5, dropouts=0.3)


def test_an_explicit_threshold_gets_the_smallest_degree_that_holds_it():
    p = SecAggConfig(threshold=30).parameters(1000)
    assert p.t == 30 and p.k <= 58 and p.log2_failure <= -40
    with pytest.raises(ParameterError, match="t=20 colluding neighbours"):
        SecAggConfig(threshold=20).parameters(1000)  # too low for 10% colluders at any degree that survives dropouts
    with pytest.raises(ParameterError, match="t=2"):
        SecAggConfig(threshold=2).parameters(1000)  # 2 colluding neighbours are certain somewhere


def test_cli_prints_the_parameters_and_exits_2_when_a_size_cannot_hold(capsys):
    assert cli(["secagg-params", "--clients", "100", "1000"]) == 0
    out = capsys.readouterr().out
    assert "  32  " in out.replace("\t", " ") or " 32 " in out
    assert "551" in out and "2^-44.3" in out
    assert cli(["secagg-params", "--clients", "1000", "--set", "aggregation.neighbours=7"]) == 2
    assert "cannot hold" in capsys.readouterr().out
