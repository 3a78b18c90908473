"""The aggregation benchmark's machinery: Flower's SecAgg+ really aggregates, and the bench writes its outputs."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from fedrlhf_secure.bench import aggregation as bench
from fedrlhf_secure.bench.flower_secaggplus import available, run_flower_secaggplus


def test_flower_secaggplus_driven_in_process_returns_the_weighted_average():
    if available() is not None:
        pytest.skip(available())
    inputs = bench.make_inputs(6, 50)
    shifted = {c + 1: v for c, v in inputs.items()}
    r = run_flower_secaggplus(shifted, num_shares=5, threshold=3, drop_from_stage={2: 2}, clipping_range=1.0, max_weight=100.0)
    expected = bench.expected_average(inputs, [c for c in inputs if c != 1])
    assert np.abs(r.aggregate - expected).max() < 1e-3
    assert r.bytes_up[2] < r.bytes_up[3]  # the dropped node sent nothing from stage 2 on
    assert r.cpu_seconds_total > 0 and r.seconds_server > 0


def test_bench_writes_json_table_and_plot(tmp_path):
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(
        [
            "--n",
            "5",
            "--d",
            "40",
            "--dropout",
            "0",
            "0.2",
            "--no-targets",
            "--no-ckks",
            "--no-flower",
            "--json",
            str(tmp_path / "agg.json"),
            "--doc",
            str(tmp_path / "B.md"),
        ]
    )
    assert bench.run(args) == 0
    payload = json.loads((tmp_path / "agg.json").read_text())
    kinds = [(r["kind"], r["dropped"]) for r in payload["results"]]
    assert kinds == [
        ("plain", 0),
        ("secagg", 0),
        ("secagg-no-consistency", 0),
        ("plain", 1),
        ("secagg", 1),
        ("secagg-no-consistency", 1),
    ]
    with_round = [r for r in payload["results"] if r["kind"] == "secagg"]
    assert all(r["client_stage_seconds_median"]["consistency check"] > 0 for r in with_round)
    base = [r for r in payload["results"] if r["kind"] == "secagg-no-consistency"]
    assert all(b["bytes_down_per_client"] < w["bytes_down_per_client"] for b, w in zip(base, with_round, strict=True))
    for r in payload["results"]:
        assert r["max_abs_error_of_average"] < 1e-4
        assert set(r["client_stage_seconds_median"]) <= set(bench.STAGES) | {"update"}
    doc = (tmp_path / "B.md").read_text()
    assert "<!-- bench:aggregation -->" in doc and "| grid dropout=0.2 k=auto | secagg | 5 | 40 |" in doc
    assert "Flower comparison disabled" in doc
    assert (tmp_path / "agg.png").stat().st_size > 1000
