"""``fedrlhf bench overhead``: MovieLens secagg / plain and ckks / plain beside the crypto floor."""

from __future__ import annotations

import json

import pytest
from movielens_fixtures import write_ml100k

from aggregation.secagg import SecAggConfig
from fedrlhf_secure.bench.overhead import TARGETS, ckks_shape, secagg_shape, summarise
from fedrlhf_secure.cli import main

TINY = """seed: 0
task: {kind: movielens, split: u1, user_dim: 4, item_dim: 4, genre_dim: 2, hidden_dim: 8, personal_epochs: 1}
federation: {rounds: 1, local_epochs: 1, min_clients: 2}
aggregation: {kind: plain}
privacy: {mode: none}
baselines: []
"""


def test_the_default_movielens_round_shape_is_32_bit_with_the_auto_parameters_of_943_clients():
    shape = secagg_shape(SecAggConfig(), 60403, 943)
    assert shape == {"elements": 60404, "ring_bits": 32, "k": 58, "t": 30, "quorum": 520}


def test_the_ckks_mask_round_is_64_bit_over_the_payload_and_its_check_slots():
    from aggregation.ckks.params import CKKSConfig

    shape = ckks_shape(CKKSConfig(), 60403, 100)
    assert shape["ring_bits"] == 64
    assert shape["elements"] > 60404 and shape["ciphertexts"] == -(-shape["elements"] // 2048)
    assert (shape["k"], shape["t"], shape["quorum"]) == (32, 17, 56)


PRIMITIVES = ("x25519_keygen", "x25519_agree", "hkdf", "aes_gcm_share", "keystream_mask", "add_mask", "rounding_pass")
UNIT = {f"unit_{name}": 1e-3 for name in (*PRIMITIVES, "ed25519_sign", "ed25519_verify")}


def test_summary_divides_by_the_plain_round_of_the_same_size_and_adds_the_floor():
    rnd = {"dim": 10, "load_before": 1.0, "load_after": 2.0, "heldout_accuracy": 0.5}
    payload = {
        "rounds": [
            {**rnd, "kind": "plain", "clients": 8, "cpu_seconds": 2.0},
            {**rnd, "kind": "plain", "clients": 8, "cpu_seconds": 4.0},
            {**rnd, "kind": "plain", "clients": 8, "cpu_seconds": 3.0},
            {**rnd, "kind": "secagg", "clients": 8, "cpu_seconds": 9.0, "elements": 11, "ring_bits": 32, "k": 6, "t": 4, "quorum": 6},
        ],
        "floors": {
            "secagg-8": {"total": 5.0, "ed25519_verify": 4.0, "load": 1.5, "k": 6, "quorum": 6, **UNIT},
            "secagg-100": {"total": 50.0, "ed25519_verify": 40.0, "load": 1.5},
        },
    }
    rows = {(r["kind"], r["clients"]): r for r in summarise(payload)}
    secagg = rows[("secagg", 8)]
    assert secagg["plain_cpu_seconds"] == 3.0  # the median of the three plain rounds
    assert secagg["ratio_to_plain"] == pytest.approx(3.0)
    assert secagg["floor_cpu_seconds"] == pytest.approx(8.0)  # plain 3 + crypto 5
    assert secagg["floor_ratio_to_plain"] == pytest.approx(8.0 / 3.0)
    assert secagg["ours_to_floor"] == pytest.approx(9.0 / 8.0)
    # without signatures, 8 clients, k = 6, none dropped, 1 ms per operation: 16 key pairs; 8 x 6 share + 8 x 6 mask
    # agreements and as many derivations; 48 share seals + 48 opens; 8 x (6 + 2) + 8 keystreams; 8 x 7 + 16 adds; 8 roundings
    bare = (16 + 96 + 96 + 96 + 72 + 72 + 8) * 1e-3
    assert secagg["floor_without_defences_cpu_seconds"] == pytest.approx(3.0 + bare)
    assert secagg["target_possible"] is (8.0 / 3.0 <= TARGETS["secagg"])
    floor_only = rows[("secagg", 100)]  # no protocol round and no plain round at that size: the crypto floor alone
    assert floor_only["cpu_seconds"] is None and floor_only["runs"] == 0
    assert floor_only["crypto_floor_cpu_seconds"] == 50.0 and "ours_to_floor" not in floor_only


def test_bench_overhead_runs_each_kind_and_writes_strict_json_and_its_section(tmp_path):
    write_ml100k(tmp_path, n_users=10, n_items=30, per_user=12)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    out, doc = tmp_path / "overhead.json", tmp_path / "B.md"
    args = ["bench", "overhead", "--config", str(cfg), "--data-dir", str(tmp_path), "--clients", "8", "--repeats", "1"]
    assert main([*args, "--kinds", "plain", "secagg", "--json", str(out), "--doc", str(doc)]) == 0
    result = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    rows = {(r["kind"], r["clients"]): r for r in result["summary"]}
    secagg = rows[("secagg", 8)]
    assert secagg["ring_bits"] == 32 and secagg["elements"] == secagg["dim"] + 1
    assert secagg["cpu_seconds"] > 0 and secagg["plain_cpu_seconds"] > 0
    assert secagg["crypto_floor_cpu_seconds"] > 0 and secagg["ed25519_verify_cpu_seconds"] > 0
    assert secagg["ratio_to_plain"] == pytest.approx(secagg["cpu_seconds"] / secagg["plain_cpu_seconds"])
    text = doc.read_text()
    assert "<!-- bench:overhead -->" in text and "floor × plain" in text
