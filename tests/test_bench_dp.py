"""``bench dp --utility`` under masking: the Skellam headroom it reserves must satisfy the privacy check."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from fedrlhf_secure.bench.dp import _headroom
from fedrlhf_secure.config import config_from_dict
from fedrlhf_secure.federation.aggregators import build_aggregator
from fedrlhf_secure.privacy.factory import check_noise_headroom, integer_domain

ROOT = Path(__file__).resolve().parents[1]


def test_the_reserved_noise_bound_passes_the_headroom_check_it_was_derived_from():
    raw = {
        "task": {"kind": "movielens", "num_clients": 20},
        "federation": {"rounds": 5, "weighting": "uniform", "min_clients": 2},
        "aggregation": {"kind": "secagg"},
        "privacy": {"mode": "client", "epsilon": 8.0, "delta": 1e-5, "clip_norm": 1.0, "noise": "distributed"},
    }
    overrides = _headroom(config_from_dict(raw))
    assert overrides[0] == "aggregation.bits=64"
    bound = int(re.fullmatch(r"aggregation.noise_bound=(\d+)", overrides[1]).group(1))
    assert bound > 0
    raw["aggregation"].update(bits=64, noise_bound=bound)
    cfg = config_from_dict(raw)
    check_noise_headroom(cfg, integer_domain(build_aggregator(cfg, list(range(20)))))  # raises if too small


def test_with_adaptive_clipping_the_reserved_bound_covers_the_largest_clip_the_run_can_reach():
    """The Skellam shares are sized for C_aug of each round; C_t can grow to C_0·e^{η·γ·rounds}."""
    raw = {
        "task": {"kind": "movielens", "num_clients": 20},
        "federation": {"rounds": 5, "weighting": "uniform", "min_clients": 2},
        "aggregation": {"kind": "secagg"},
        "privacy": {"mode": "client", "epsilon": 8.0, "delta": 1e-5, "clip_norm": 1.0, "noise": "distributed"},
    }
    fixed = int(_headroom(config_from_dict(raw))[1].split("=")[1])
    raw["privacy"]["adaptive_clip"] = {"target_quantile": 0.5, "lr": 0.2, "count_noise": 47.15}
    adaptive = int(_headroom(config_from_dict(raw))[1].split("=")[1])
    # e^{0.2·0.5·5} = 1.6487 times the fixed-clip bound, times z_Δ/z = 1.00046 (within ceil rounding)
    assert adaptive / fixed == pytest.approx(math.exp(0.5) * 1.00046, rel=1e-3)


def test_grid_variants_resolve_to_their_mode_levers_and_overrides():
    from fedrlhf_secure.bench.dp import ADAPTIVE_CLIP, USER_LEVEL_LEVERS, VARIANTS, _run_overrides, parse_variant
    from fedrlhf_secure.config import load_config

    out = _run_overrides("client-adaptive", 8.0, "plain", 1e-5)
    assert "privacy.mode=client" in out and set(USER_LEVEL_LEVERS["client"] + ADAPTIVE_CLIP) <= set(out)
    cfg = load_config(ROOT / "configs" / "movielens.yaml", out)
    assert cfg.privacy.adaptive_clip.count_noise == 47.15 and cfg.federation.touch_scale == 0.1
    label, variant = parse_variant("record-dist=record:privacy.accountant=rdp; privacy.batch_size=32")
    assert (label, variant) == ("record-dist", ("record", ["privacy.accountant=rdp", "privacy.batch_size=32"]))
    out = _run_overrides("record-dist", 8.0, "secagg", 1e-5, variants={**VARIANTS, label: variant})
    assert out[-2:] == ["privacy.accountant=rdp", "privacy.batch_size=32"] and "privacy.mode=record" in out
    for bad in ("x=central", "=record", "x=record:privacy.noise"):
        with pytest.raises(ValueError, match="--variant"):
            parse_variant(bad)


def test_merged_grids_give_one_table_and_a_plot_with_both_baselines(tmp_path, capsys):
    import argparse
    import json

    from fedrlhf_secure.bench.dp import _merged, _report

    def row(agg, mode, eps, acc):
        return {
            "aggregation": agg,
            "mode": mode,
            "epsilon_target": eps,
            "epsilon_spent": 7.99 if mode != "none" else None,
            "heldout_accuracy": acc,
            "majority_accuracy": 0.562,
            "rounds": 5,
            "clients": 943,
            "seconds": 1.0,
            "overrides": [],
        }

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"results": [row("plain", "client", 8.0, 0.70), row("plain", "none", None, 0.71)]}))
    b.write_text(json.dumps({"results": [row("plain", "client-adaptive", 8.0, 0.69), row("plain", "client", 8.0, 0.701)]}))
    results = _merged([a, b])
    assert sorted((r["mode"], r["heldout_accuracy"]) for r in results) == [("client", 0.701), ("client-adaptive", 0.69), ("none", 0.71)]
    args = argparse.Namespace(
        config="c.yaml",
        overrides=[],
        delta=1e-5,
        aggregations=["plain"],
        modes=["client", "client-adaptive"],
        levers=True,
        clients=None,
        json=tmp_path / "m.json",
        doc=None,
        section=None,
    )
    assert _report(args, [], results) == 0
    out = capsys.readouterr().out
    assert "| plain | client | 0.701 | 0.71 | 0.562 |" in out and "| plain | client-adaptive | 0.69 | 0.71 | 0.562 |" in out
    assert (tmp_path / "m.png").stat().st_size > 10_000
