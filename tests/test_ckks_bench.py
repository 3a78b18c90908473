"""The CKKS benchmark's rows carry the fields ``fedrlhf bench aggregation`` tabulates, from a real round."""

import pytest

from fedrlhf_secure.bench.ckks import TABLE_HEADERS, measure, table_rows


def test_measure_returns_the_shipped_round_the_round_before_issue_12_and_nvflares_parameters():
    rows = measure(10, 5000, repeats=1)["rows"]  # the mask round is SecAgg+: 3 clients cannot hold its default bounds
    assert [r["mode"] for r in rows] == ["ckks", "ckks-before-issue-12", "ckks-nvflare-default"]
    for r in rows:
        assert r["n"] == 10 and r["d"] == 5000
        assert r["log_q"] <= r["log_q_bound_128"]
        assert r["bytes_up_per_client"] == pytest.approx(r["expansion_vs_float32"] * 4 * 5000)
        assert all(r[k] > 0 for k in ("encrypt_s_per_1e6", "aggregate_s_per_1e6", "decrypt_s_per_1e6", "round_s"))
    shipped, before, nvflare = rows
    # before issue 12 the clients released CKKS's own error; now the flooding noise dominates it
    assert before["rel_error"] < 1e-6 < shipped["rel_error"] < 0.05
    # the mask round adds its keys, shares and masked input (8 bytes per slot) to the upload
    assert before["expansion_vs_float32"] < shipped["expansion_vs_float32"] < 2 * before["expansion_vs_float32"]
    # the one-prime ciphertext is about half the size of NVFlare's two-prime one under the same protocol
    assert before["bytes_up_per_client"] < 0.6 * nvflare["bytes_up_per_client"] / 1.125
    assert all(len(row) == len(TABLE_HEADERS) for row in table_rows(rows))
