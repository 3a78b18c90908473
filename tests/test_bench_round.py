"""``fedrlhf bench round``'s summary: medians per cell and the same-run ratios (the timing itself is not a test)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from fedrlhf_secure.bench.round import render, summarise


def sample(cpu: float, acc: float = 0.71) -> dict:
    return {
        "cpu_seconds": cpu,
        "wall_seconds": 3 * cpu,
        "load_before": 1.0,
        "load_after": 2.0,
        "clients": 943,
        "rounds": 5,
        "seconds_per_round_median": cpu / 5,
        "seconds_fit_median": cpu / 10,
        "seconds_aggregation_median": 0.0,
        "seconds_eval_median": 0.1,
        "heldout_accuracy": acc,
        "bytes_up_per_client": 1.0,
        "bytes_down_per_client": 1.0,
    }


def test_summary_takes_medians_and_the_ratios_against_plain_and_the_baseline_tree(tmp_path, capsys):
    samples = {
        ("this", "plain"): [sample(20.0), sample(24.0), sample(22.0)],
        ("baseline", "plain"): [sample(90.0), sample(110.0), sample(100.0)],
        ("this", "secagg"): [sample(33.0), sample(30.0), sample(36.0)],
    }
    args = argparse.Namespace(config="configs/movielens.yaml", overrides=["federation.rounds=5"])
    payload = summarise(samples, {"this": Path("."), "baseline": Path("/base")}, args)
    by = {(r["tree"], r["aggregation"]): r for r in payload["results"]}
    assert by[("this", "plain")]["median"]["cpu_seconds"] == 22.0
    assert by[("this", "plain")]["baseline_cpu_over_this"] == pytest.approx(100.0 / 22.0)
    assert by[("this", "secagg")]["cpu_vs_plain"] == pytest.approx(33.0 / 22.0)
    assert by[("this", "secagg")]["baseline_cpu_over_this"] is None  # no baseline secagg cell
    assert by[("baseline", "plain")]["baseline_cpu_over_this"] is None
    json.dumps(payload, allow_nan=False)
    doc = tmp_path / "B.md"
    render(payload, doc)
    text = doc.read_text()
    assert "<!-- bench:round -->" in text and "--set federation.rounds=5" in text and "| this | plain | 943 | 5 | 3 | 22 |" in text
