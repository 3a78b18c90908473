"""``fedrlhf bench scale`` end to end on a generated fixture: every size completes a round, strict JSON, a plot."""

from __future__ import annotations

import json

import pytest
from movielens_fixtures import write_ml100k

from fedrlhf_secure.cli import main

TINY = """seed: 0
task: {kind: movielens, split: u1, user_dim: 4, item_dim: 4, genre_dim: 2, hidden_dim: 8, personal_epochs: 1}
federation: {rounds: 1, local_epochs: 1, min_clients: 2}
aggregation: {kind: plain}
privacy: {mode: none}
baselines: []
"""


def test_bench_scale_times_each_size_fits_the_growth_and_writes_strict_json_and_a_plot(tmp_path, monkeypatch):
    write_ml100k(tmp_path, n_users=10, n_items=30, per_user=12)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    monkeypatch.setattr("fedrlhf_secure.federation.engine.IN_PROCESS_HOST_CLIENTS", 16)  # 40 clients: 3 in-process hosts
    out, png, doc = tmp_path / "scale.json", tmp_path / "scale.png", tmp_path / "B.md"
    args = ["bench", "scale", "--config", str(cfg), "--data-dir", str(tmp_path), "--clients", "40", "8", "--json", str(out)]
    assert main([*args, "--plot", str(png), "--doc", str(doc), "--real-users"]) == 0
    result = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    rows = result["rows"]
    assert [r["clients"] for r in rows] == [8, 40]  # sorted
    assert [r["in_process_hosts"] for r in rows] == [1, 3]
    assert [r["users"] for r in rows] == ["real", "resampled"]  # the fixture has 10 real users
    for r in rows:
        assert r["round_cpu_seconds_median"] > 0 and len(r["round_cpu_seconds"]) == 1
        assert r["cpu_seconds_per_1000_clients"] == pytest.approx(r["round_cpu_seconds_median"] / r["clients"] * 1000)
        assert 0.0 <= r["heldout_accuracy"] <= 1.0
    assert rows[1]["records"] > rows[0]["records"]
    assert result["growth"]["loglog_exponent"] is not None
    assert result["target"]["largest_clients"] == 40
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<!-- bench:scale -->" in doc.read_text() and "CPU s per 1,000 clients" in doc.read_text()
