"""``bench dp --utility`` under masking: the Skellam headroom it reserves must satisfy the privacy check."""

from __future__ import annotations

import re

from fedrlhf_secure.bench.dp import _headroom
from fedrlhf_secure.config import config_from_dict
from fedrlhf_secure.federation.aggregators import build_aggregator
from fedrlhf_secure.privacy.factory import check_noise_headroom, integer_domain


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
