"""The CKKS benchmark's rows carry the fields ``fedrlhf bench aggregation`` tabulates, from a real round."""

import pytest

from fedrlhf_secure.bench.ckks import TABLE_HEADERS, measure, table_rows


def test_measure_returns_one_row_per_parameter_set_with_a_correct_aggregate():
    rows = measure(3, 5000, repeats=1)["rows"]
    assert [r["mode"] for r in rows] == ["ckks", "ckks-nvflare-default"]
    for r in rows:
        assert r["n"] == 3 and r["d"] == 5000
        assert r["rel_error"] < 1e-4
        assert r["log_q"] <= r["log_q_bound_128"]
        assert r["bytes_up_per_client"] == pytest.approx(r["expansion_vs_float32"] * 4 * 5000)
        assert all(r[k] > 0 for k in ("encrypt_s_per_1e6", "aggregate_s_per_1e6", "decrypt_s_per_1e6", "round_s"))
    # the one-prime default ciphertext is about half the size of NVFlare's two-prime one
    assert rows[0]["bytes_up_per_client"] < 0.6 * rows[1]["bytes_up_per_client"]
    assert all(len(row) == len(TABLE_HEADERS) for row in table_rows(rows))
