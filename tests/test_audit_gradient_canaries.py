"""The ε gate with white-box gradient (Dirac) canaries: it can refute ε = 8, and it audits the run itself.

A run trained with ``privacy.audit_canaries: m`` carries m canaries ``s·C·e_c`` inserted after
clipping and before the noise, each kept by a secret coin written beside the run's ledger;
``fedrlhf audit RUN`` scores them on the released model. The positive control is a run whose noise
is switched off through the injected test source (:class:`broken_noise.SilentNoise`): claiming
ε = 8 it must fail (exit 1); the same run with honest noise must pass (exit 0).

Fast versions on a generated ML-100K fixture (40 users, 1,600 items, 16-dim item rows: 25,889
coordinates that carry a canary linearly); the default config on the real data is marked slow.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from broken_noise import SilentNoise
from movielens_fixtures import write_ml100k

from attacks import bounds
from attacks.audit import AuditSettings, audit_run
from fedrlhf_secure.cli import main
from fedrlhf_secure.config import config_from_dict, load_config
from fedrlhf_secure.configtypes import ConfigError, InputError
from fedrlhf_secure.federation.engine import RunOptions, run_federation
from fedrlhf_secure.federation.update import UpdateCodec
from fedrlhf_secure.privacy.canaries import (
    AUDIT_BLOCK,
    CANARY_DIR,
    GradientCanaries,
    build_canaries,
    linear_ranges,
    place_canaries,
    read_canaries,
)

CANARIES = 25_000


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ml-canaries")
    write_ml100k(root, n_users=40, n_items=1600, per_user=30)
    return root


def canary_config(m: int = CANARIES, epsilon: float = 8.0, **federation):
    return config_from_dict(
        {
            "seed": 0,
            "task": {"kind": "movielens", "split": "u1", "user_dim": 4, "item_dim": 16, "genre_dim": 4, "hidden_dim": 8},
            "federation": {"rounds": 2, "local_epochs": 1, "weighting": "uniform", "sparse_rows": "all", **federation},
            "privacy": {"mode": "client", "epsilon": epsilon, "delta": 1e-5, "clip_norm": 1.0, "audit_canaries": m},
        }
    )


def audit_cli(run_dir: Path, data: Path, *extra: str) -> int:
    return main(["audit", str(run_dir), "--data-dir", str(data), "--shadows", "0", "--no-progress", "--no-plots", *extra])


# ------------------------------------------------------------------ the ceiling and m sized to the claim


def test_one_run_ceiling_with_1000_canaries_cannot_reach_the_presets_epsilon():
    # Steinke et al. Thm 3.1/5.2 at δ = 1e-5, 95%: every guess right on 900 of 1000 canaries gives 5.68
    assert bounds.refutable_ceiling(1000, 1e-5) == pytest.approx(5.677, abs=0.01)
    assert bounds.refutable_ceiling(1000, 1e-5) < 8
    # the old 6-point grid with its Bonferroni price: 5.27, the figure the issue measured
    assert bounds.refutable_ceiling(1000, 1e-5, 0.95, bounds.DEFAULT_GUESS_FRACTIONS) == pytest.approx(5.269, abs=0.01)


def test_canaries_are_sized_to_the_claim():
    assert bounds.canaries_needed(8.0, 1e-5) == 20_000
    assert bounds.refutable_ceiling(20_000, 1e-5) > 8.0 > bounds.refutable_ceiling(15_000, 1e-5)
    assert bounds.canaries_needed(4.0, 1e-5) == 500
    # the δ term (2mδ) saturates the bound: no m on the ladder refutes ε = 9 at δ = 1e-5
    assert bounds.canaries_needed(9.0, 1e-5) is None


# ------------------------------------------------------------------ the pipeline step


def test_canary_placement_is_public_distinct_and_on_plain_mean_coordinates():
    p = place_canaries(500, [(0, 300), (700, 1000)], 1000, [5, 3, 9], 1.5, seed=7)
    q = place_canaries(500, [(0, 300), (700, 1000)], 1000, [9, 5, 3], 1.5, seed=7)
    assert np.array_equal(p.coordinates, q.coordinates) and np.array_equal(p.signs, q.signs)  # same on every host
    assert np.unique(p.coordinates).size == 500
    assert ((p.coordinates < 300) | (p.coordinates >= 700)).all()
    assert set(np.unique(p.signs)) == {-1, 1}
    assert np.array_equal(np.bincount(p.holders)[[3, 5, 9]], [167, 167, 166])


def test_a_kept_canary_adds_exactly_its_vector_to_its_holders_clipped_update():
    p = place_canaries(6, [(0, 10)], 10, [0, 1], 2.0, seed=1)
    coins = {0: np.array([True, False, True]), 1: np.array([False, False, False])}
    canaries = GradientCanaries(p, coins)
    clipped = np.full(10, 0.1, dtype=np.float32)
    out = canaries.insert(0, 1, clipped)
    mine = np.flatnonzero(p.holders == 0)
    expected = clipped.copy()
    expected[p.coordinates[mine[[0, 2]]]] += 2.0 * p.signs[mine[[0, 2]]]
    assert np.allclose(out, expected)
    assert np.array_equal(canaries.insert(1, 1, clipped), clipped)  # client 1 kept none
    assert np.array_equal(clipped, np.full(10, 0.1, dtype=np.float32))  # the input is not modified


def test_sparse_rows_averaged_by_touch_count_carry_no_canary(data):
    from fedrlhf_secure.federation.engine import build_task

    cfg = canary_config()
    task = build_task(cfg, data)
    spec = task.shared_spec()
    touched = linear_ranges(UpdateCodec(spec, "touched"))
    assert sum(b - a for a, b in touched) == spec.size - 1600 * 16  # the item table is divided by its touch counts
    assert linear_ranges(UpdateCodec(spec, "all")) == [(0, spec.size)]


def test_model_coordinates_need_room_and_the_audit_block_has_it(tmp_path, data):
    from dataclasses import replace

    from fedrlhf_secure.federation.engine import build_task

    cfg = canary_config()
    model = replace(cfg, privacy=replace(cfg.privacy, audit_coordinates="model"))
    plain = build_task(replace(cfg, privacy=replace(cfg.privacy, audit_canaries=0)), data).shared_spec()
    codec = UpdateCodec(plain, "all")
    huge = replace(model, privacy=replace(model.privacy, audit_canaries=codec.spec.size + 1))
    with pytest.raises(ConfigError, match="coordinates whose aggregate is a plain mean"):
        build_canaries(huge, [0, 1], [0, 1], codec, tmp_path / "ledger", False)
    # the audit block is sized to m: the task built for the config carries exactly m more coordinates
    big = replace(cfg, privacy=replace(cfg.privacy, audit_canaries=codec.spec.size + 1))
    spec = build_task(big, data).shared_spec()
    assert spec.size == plain.size + codec.spec.size + 1 and spec.names()[-1] == AUDIT_BLOCK
    # a codec without the block (a task not built by build_task) is refused, naming the key
    with pytest.raises(ConfigError, match="audit block"):
        build_canaries(big, [0, 1], [0, 1], codec, tmp_path / "ledger", False)


def test_coins_are_written_once_reused_on_resume_and_a_missing_coin_file_is_refused(tmp_path, data):
    from fedrlhf_secure.federation.engine import build_task

    cfg = canary_config(m=100)
    codec = UpdateCodec(build_task(cfg, data).shared_spec(), "all")
    # worker processes of a fresh run are set up as resuming (they open a ledger made before the fork)
    # and hold disjoint clients: each draws and writes its own clients' coins
    build_canaries(cfg, [0, 1, 2], [0, 2], codec, tmp_path / "ledger", True)
    build_canaries(cfg, [0, 1, 2], [1], codec, tmp_path / "ledger", True)
    assert sorted(p.name for p in (tmp_path / CANARY_DIR).glob("client-*.npz")) == ["client-0.npz", "client-1.npz", "client-2.npz"]
    first = build_canaries(cfg, [0, 1, 2], [0, 1, 2], codec, tmp_path / "ledger", False)
    again = build_canaries(cfg, [0, 1, 2], [0, 1, 2], codec, tmp_path / "ledger", True)
    vec = np.zeros(codec.dim, dtype=np.float32)
    for c in range(3):
        assert np.array_equal(first.insert(c, 1, vec), again.insert(c, 1, vec))
    (tmp_path / CANARY_DIR / "client-1.npz").unlink()
    (tmp_path / "ledger").mkdir()
    (tmp_path / "ledger" / "client-1.json").write_text("[]")  # client 1 has released updates
    with pytest.raises(InputError, match="client-1.npz"):
        build_canaries(cfg, [0, 1, 2], [0, 1, 2], codec, tmp_path / "ledger", True)


# ------------------------------------------------------------------ the gate, on the run itself


def test_broken_run_claiming_epsilon_8_fails_the_audit_of_its_own_canaries(data, tmp_path, capsys):
    run = run_federation(canary_config(), RunOptions(data_dir=data, out=tmp_path, progress=False, noise=SilentNoise()))
    placement, included = read_canaries(run)
    assert placement.size == CANARIES and 0.45 < included.mean() < 0.55
    code = audit_cli(run, data)
    out = capsys.readouterr().out
    report = json.loads((run / "audit.json").read_text())
    e = report["epsilon"]
    print(out)
    assert e["plan"]["kind"] == "run" and e["canary_kind"] == "gradient"
    assert report["claimed"]["epsilon"] == pytest.approx(8.0, abs=1e-6)
    assert e["ceiling"] == pytest.approx(bounds.refutable_ceiling(CANARIES, 1e-5), abs=1e-9) and e["ceiling"] > 8.0
    # no noise: every guess right, ε̂ at the ceiling
    assert e["one_run"]["correct"] == e["one_run"]["guesses"] == 2 * int(0.45 * CANARIES)
    assert e["estimate"] > 8.0
    assert report["verdict"] == "fail" and code == 1
    assert "largest ε it can refute: 8.1" in out  # announced before the audit ran
    assert f"ε̂ = {e['estimate']:.3f}" in out and "verdict: FAIL" in out


def test_honest_run_claiming_epsilon_8_passes_the_audit_of_its_own_canaries(data, tmp_path, capsys):
    run = run_federation(canary_config(), RunOptions(data_dir=data, out=tmp_path, progress=False))
    code = audit_cli(run, data)
    out = capsys.readouterr().out
    report = json.loads((run / "audit.json").read_text())
    e = report["epsilon"]
    print(out)
    assert e["ceiling"] > 8.0  # the audit could have failed it
    assert e["estimate"] <= 8.0
    # the canaries are visible through the noise (the audit measures something), but not beyond the claim
    assert e["score_means"]["included"] > e["score_means"]["excluded"]
    assert report["verdict"] == "pass" and code == 0
    assert "verdict: PASS" in out and "ε̂ = " in out


def test_re_run_mode_sizes_the_gradient_canaries_to_the_claim(data, tmp_path, capsys):
    cfg = canary_config(m=0, epsilon=4.0)
    run = run_federation(cfg, RunOptions(data_dir=data, out=tmp_path, progress=False, noise=SilentNoise()))
    assert not (run / CANARY_DIR).exists()
    report = audit_run(run, data, AuditSettings(num_shadows=0, plots=False), noise=SilentNoise())
    e = report["epsilon"]
    assert e["plan"] == {"kind": "gradient", "canaries": 500, "ceiling": e["ceiling"], "needed": 500, "powerful": True}
    assert e["estimate"] > 4.0 and report["verdict"] == "fail"


def test_an_audit_that_cannot_refute_the_claim_is_inconclusive_or_refused(data, tmp_path, capsys):
    run = run_federation(canary_config(m=1000), RunOptions(data_dir=data, out=tmp_path, progress=False, noise=SilentNoise()))
    assert audit_cli(run, data, "--require-power") == 2  # refused before any training
    captured = capsys.readouterr()
    assert "use at least 20000 canaries" in captured.err
    assert not (run / "audit.json").exists()
    code = audit_cli(run, data)
    captured = capsys.readouterr()
    report = json.loads((run / "audit.json").read_text())
    # even a run without noise cannot be failed at ε = 8 by 1000 canaries: every guess right gives 5.68
    assert report["epsilon"]["estimate"] == pytest.approx(bounds.refutable_ceiling(1000, 1e-5), abs=1e-6)
    assert report["verdict"] == "inconclusive" and code == 0
    assert "CANNOT refute" in captured.out and "INCONCLUSIVE" in captured.err


# ------------------------------------------------------------------ the default configs, real data (slow)


def _gate(run: Path, data: Path, capsys) -> tuple[int, dict, str]:
    code = audit_cli(run, data)
    out = capsys.readouterr().out
    print(out)
    return code, json.loads((run / "audit.json").read_text()), out


@pytest.mark.slow
@pytest.mark.parametrize("broken", [True, False], ids=["noise-off-fails", "honest-passes"])
def test_one_client_per_user_at_epsilon_8_client_level(shared_datasets, tmp_path, capsys, broken):
    """``configs/movielens.yaml --set privacy.mode=client --epsilon 8`` (943 clients, one per user),
    with ``privacy.audit_canaries: auto`` (20,000 at ε = 8, δ = 1e-5) in the audit block: with the
    canaries on the model's own coordinates even a noise-off run could not be failed here (the real
    updates are as large as a canary; docs/audits.md)."""
    cfg = load_config("configs/movielens.yaml", ["privacy.mode=client", "privacy.epsilon=8", "privacy.audit_canaries=auto"])
    run = run_federation(cfg, RunOptions(data_dir=shared_datasets, out=tmp_path, progress=False, noise=SilentNoise() if broken else None))
    code, report, out = _gate(run, shared_datasets, capsys)
    e = report["epsilon"]
    assert e["plan"]["kind"] == "run" and e["one_run"]["canaries"] == 20_000 and e["mechanism"] == "client"
    assert e["ceiling"] > 8.0 and math.isclose(report["claimed"]["epsilon"], 8.0, abs_tol=1e-6)
    assert "largest ε it can refute: 8.091" in out
    if broken:
        assert e["estimate"] > 8.0 and report["verdict"] == "fail" and code == 1
    else:
        assert e["estimate"] <= 8.0 and report["verdict"] == "pass" and code == 0


@pytest.mark.slow
@pytest.mark.parametrize("broken", [True, False], ids=["noise-off-fails", "honest-passes"])
def test_silos_main_job_at_epsilon_8_record_level(shared_datasets, tmp_path, capsys, broken):
    """The README's main job as configured (``configs/movielens-silos.yaml``: 19 silos, record-level
    DP-SGD, SecAgg+, ε = 8, δ = 1e-5, ``privacy.audit_canaries: auto``): the run carries 20,000
    Dirac canaries inside its DP-SGD steps and ``fedrlhf audit RUN`` audits that run."""
    cfg = load_config("configs/movielens-silos.yaml")
    assert (cfg.privacy.mode, cfg.privacy.epsilon, cfg.privacy.delta, cfg.aggregation.kind) == ("record", 8, 1e-5, "secagg")
    assert cfg.privacy.audit_canary_count() == 20_000
    run = run_federation(cfg, RunOptions(data_dir=shared_datasets, out=tmp_path, progress=False, noise=SilentNoise() if broken else None))
    code, report, out = _gate(run, shared_datasets, capsys)
    e = report["epsilon"]
    assert e["plan"]["kind"] == "run" and e["mechanism"] == "record" and e["ceiling"] > 8.0
    if broken:
        assert e["one_run"]["correct"] == e["one_run"]["guesses"]
        assert e["estimate"] > 8.0 and report["verdict"] == "fail" and code == 1
    else:
        assert e["estimate"] <= 8.0 and report["verdict"] == "pass" and code == 0
