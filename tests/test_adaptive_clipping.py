"""Adaptive quantile clipping (Andrew, Thakkar, McMahan & Ramaswamy 2021) at client level (issue 13).

What must hold: C follows the target quantile of the update norms; the clipped-count bit leaves a
client only inside the clipped, noised vector (a plan that forgets to noise it is caught); the pair
(update at z_Δ, count at σ_b) is accounted as the fixed-clip mechanism at z; a resumed run
continues with the C it had; nonsense settings are refused naming the key.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from broken_noise import SilentNoise
from crash_points import SimulatedCrash, crash_after
from toy_task import toy_config

from fedrlhf_secure.config import config_from_dict
from fedrlhf_secure.configtypes import ConfigError
from fedrlhf_secure.federation.engine import RunOptions, resume_federation, run_federation
from fedrlhf_secure.privacy.adaptive_clipping import AdaptiveClipConfig, ClipSchedule, CountRelease, update_noise_multiplier
from fedrlhf_secure.privacy.budget import PrivacyViolation
from fedrlhf_secure.privacy.client_level import ClientLevelPlan, share_divisor
from fedrlhf_secure.privacy.ledger import PrivacyLedger, read_ledger
from fedrlhf_secure.privacy.noise import NoiseSource
from fedrlhf_secure.privacy.plan import Release
from fedrlhf_secure.privacy.replay import ReleaseStore

ROOT = Path(__file__).resolve().parents[1]
CLIENT = {"mode": "client", "epsilon": 4.0, "delta": 1e-3, "clip_norm": 1.0, "noise": "distributed", "accountant": "rdp"}
ADAPTIVE = {"target_quantile": 0.5, "lr": 0.5, "count_noise": 2.0}


def _config(privacy, aggregation=None, **fed):
    raw = toy_config(**{"rounds": 3, "weighting": "uniform", "sparse_rows": "all", **fed})
    raw["task"]["kind"] = "toy-dp"
    raw["privacy"] = privacy
    if aggregation:
        raw["aggregation"] = aggregation
    return config_from_dict(raw)


# ---------------------------------------------------------------------------------------------- the mechanism's numbers
def test_update_multiplier_makes_the_pair_cost_what_z_alone_does():
    """Theorem 1 of Andrew et al.: z⁻² = z_Δ⁻² + (2σ_b)⁻²."""
    assert update_noise_multiplier(1.0, 1.0) == pytest.approx(1 / math.sqrt(0.75), rel=1e-12)
    z, sb = 2.7, 47.15
    zd = update_noise_multiplier(z, sb)
    assert zd**-2 + (2 * sb) ** -2 == pytest.approx(z**-2, rel=1e-12)
    assert 1 < zd / z < 1.0005  # σ_b = 943/20: the count costs 0.04% more update noise
    with pytest.raises(ValueError, match="count_noise=1 is too small.*needs count_noise > z/2 = 1.35"):
        update_noise_multiplier(2.7, 1.0)


def test_augmented_vector_is_the_fixed_clip_mechanism_at_z():
    """[clip_C(Δ), α(b − ½)] has norm ≤ C_aug and noise z·C_aug is z_Δ·C on Δ and σ_b on the bit."""
    s = ClipSchedule(1.3, AdaptiveClipConfig(0.5, 0.2, 3.0), z=1.1)
    c = 1.3
    alpha = s.count_scale(c)
    assert math.hypot(c, alpha / 2) == pytest.approx(s.augmented_clip(c), rel=1e-12)
    assert s.z * s.augmented_clip(c) == pytest.approx(s.z_update * c, rel=1e-12)
    assert s.z * s.augmented_clip(c) / alpha == pytest.approx(3.0, rel=1e-12)
    assert s.bit_coordinate(1.29, c) == pytest.approx(alpha / 2) and s.bit_coordinate(1.31, c) == pytest.approx(-alpha / 2)


@pytest.mark.parametrize("gamma", [0.3, 0.5, 0.8])
def test_clip_norm_converges_to_the_target_quantile_of_generated_update_norms(gamma):
    """200 clients a round, log-normal norms (median e ≈ 2.72), C_0 = 0.1: after 150 rounds the share of
    norms under C is γ ± 0.06 and C sits near the γ-quantile of the norm distribution."""
    rng = np.random.default_rng(7)
    s = ClipSchedule(0.1, AdaptiveClipConfig(gamma, 0.2, 10.0), z=1.0)
    noise = NoiseSource()
    shares = []
    for r in range(150):
        c = s.clip_for(r)
        norms = np.exp(rng.normal(1.0, 0.5, 200))
        released = sum(s.bit_coordinate(n, c) for n in norms) + float(noise.gaussian(s.z * s.augmented_clip(c), 1)[0])
        s.observe(CountRelease(r, released, 200))
        if r >= 100:
            shares.append(float(np.mean(norms <= c)))
    assert abs(np.mean(shares) - gamma) < 0.06
    quantile = math.exp(1.0 + 0.5 * _probit(gamma))
    assert s.clip_for(150) == pytest.approx(quantile, rel=0.25)


def _probit(p: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(p)


def test_clip_norm_stays_within_the_bounds_the_headroom_check_uses():
    """b̄ is clamped to [0, 1]: every count at its extreme moves C by exp(±η·…) a round, no more."""
    s = ClipSchedule(1.0, AdaptiveClipConfig(0.5, 0.4, 5.0), z=1.0)
    for r in range(5):
        s.observe(CountRelease(r, -1e9, 10))  # 'nobody fits' beyond any noise: b̄ clamped to 0
    assert s.clip_for(5) == pytest.approx(s.max_clip(5)) == pytest.approx(math.exp(0.4 * 0.5 * 5))


def test_a_host_refuses_a_count_history_that_rewrites_what_it_was_told():
    s = ClipSchedule(1.0, AdaptiveClipConfig(), z=1.0)
    s.adopt([CountRelease(0, 3.0, 10)], before=1)
    s.adopt([CountRelease(0, 3.0, 10), CountRelease(1, -2.0, 10)], before=2)
    with pytest.raises(ValueError, match="differs from what this participant was told"):
        s.adopt([CountRelease(0, 9.0, 10), CountRelease(1, -2.0, 10)], before=2)
    with pytest.raises(ValueError, match="sent before round 1 ran"):
        s.adopt([CountRelease(1, 0.0, 10)], before=1)
    with pytest.raises(ValueError, match="contributors must be a positive integer"):
        CountRelease.parse([0, 1.0, 0])


# ---------------------------------------------------------------------------------------------- never in plaintext
def _plan(tmp: Path, cls=ClientLevelPlan) -> ClientLevelPlan:
    return cls(
        rounds=3,
        clip_norm=1.0,
        noise="distributed",
        budget=8.0,
        delta=1e-5,
        accountant="rdp",
        noise_multiplier=None,
        survivor_fraction=1.0,
        min_clients=2,
        integer=None,
        ledger=PrivacyLedger(tmp / "ledger", {"mode": "client"}, resume=False),
        releases=ReleaseStore(tmp / "releases"),
        noise_source=NoiseSource(),
        adaptive=AdaptiveClipConfig(0.5, 0.2, 5.0),
    )


class CountInTheClear(ClientLevelPlan):
    """Weakened on purpose: noises the update but leaves the count slot as the client wrote it."""

    def add_noise(self, client_id, round, clipped, weight):
        noisy = super().add_noise(client_id, round, clipped, weight).vector.copy()
        noisy[-1] = clipped[-1]
        return Release(noisy, 1.0)


def assert_count_slot_noised(plan: ClientLevelPlan, participants: int = 101) -> None:
    """What a server holding one client's release could read of its bit: nothing beyond the share noise.
    Releases of an update that fits (b = 1) must put the slot at α/2 + N(0, σ_b²α²/k), never exactly α/2."""
    plan.begin_round(0, participants)
    clip = plan.round_clip(0)
    alpha = plan.schedule.count_scale(clip)
    update = np.zeros(50, np.float32)
    update[:49] = 0.01  # norm 0.07 < C: b = 1
    slots = np.array([plan.add_noise(c, 0, plan.clip(update), 1.0).vector[-1] for c in range(400)], dtype=np.float64)
    exact = np.isclose(slots, alpha / 2, rtol=0, atol=1e-6 * alpha)
    assert not exact.any(), f"{int(exact.sum())} of {slots.size} releases carry the clipped-count bit exactly"
    want = plan.schedule.config.count_noise * alpha / math.sqrt(share_divisor(participants))
    assert np.std(slots) == pytest.approx(want, rel=0.15)
    assert np.mean(slots) == pytest.approx(alpha / 2, abs=4 * want / math.sqrt(slots.size))


def test_the_count_bit_leaves_a_client_only_with_its_noise_share(tmp_path):
    assert_count_slot_noised(_plan(tmp_path))


def test_a_plan_that_sends_the_count_bit_in_the_clear_is_caught(tmp_path):
    with pytest.raises(AssertionError, match="carry the clipped-count bit exactly"):
        assert_count_slot_noised(_plan(tmp_path, CountInTheClear))


def test_a_fixed_clip_plan_refuses_counts_from_the_server(tmp_path):
    plan = _plan(tmp_path)
    plan.schedule = None
    with pytest.raises(PrivacyViolation, match="clip norm is fixed"):
        plan.observe_counts(1, [CountRelease(0, 1.0, 3)])


def test_no_count_or_bit_reaches_the_server_in_a_frame_of_its_own(tmp_path):
    """The only client → server bytes that depend on the bit are the noised vector's: the fit summary
    (plaintext header) carries no count, no norm and no clip field."""
    seen: list[bytes] = []

    def hook(sender: int, receiver: int, data: bytes) -> None:
        if receiver == -1:
            seen.append(bytes(data))

    run_federation(_config({**CLIENT, "adaptive_clip": ADAPTIVE}), RunOptions(out=tmp_path, progress=False, hook=hook))
    assert seen
    for frame in seen:
        for word in (b"clip", b"count", b"norm", b"fraction"):
            assert word not in frame


# ---------------------------------------------------------------------------------------------- accounting, resume, config
def _entries(run: Path):
    _, entries = read_ledger(run / "ledger")
    return entries


def test_the_ledger_charges_the_adaptive_pair_exactly_the_fixed_clip_mechanism_at_z(tmp_path):
    fixed = _entries(run_federation(_config(CLIENT), RunOptions(out=tmp_path / "fixed", progress=False)))
    adaptive_run = run_federation(_config({**CLIENT, "adaptive_clip": ADAPTIVE}), RunOptions(out=tmp_path / "ada", progress=False))
    adaptive = _entries(adaptive_run)
    assert sorted(fixed) == sorted(adaptive)
    for c in fixed:
        assert [(e.round, e.mechanism, e.noise_multiplier, e.epsilon_after) for e in adaptive[c]] == [
            (e.round, e.mechanism, e.noise_multiplier, e.epsilon_after) for e in fixed[c]
        ]
        for e in adaptive[c]:
            z, zd, sb = e.noise_multiplier, e.params["update_noise_multiplier"], e.params["count_noise"]
            assert zd**-2 + (2 * sb) ** -2 == pytest.approx(z**-2, rel=1e-9)
            assert e.sensitivity == pytest.approx(e.params["clip_norm"] * zd / z, rel=1e-9)  # C_aug
    summary = json.loads((adaptive_run / "summary.json").read_text())["privacy"]
    assert 0 < summary["epsilon_spent_max"] <= 4.0
    assert [e.params["clip_norm"] for e in adaptive[min(adaptive)]] == pytest.approx(summary["clip_norms"][:3], rel=1e-12)


def test_a_resumed_run_continues_with_the_clip_norm_it_had(tmp_path):
    """Silent noise makes the counts deterministic: the resumed run's C_t must equal the straight run's."""
    config = _config({**CLIENT, "adaptive_clip": ADAPTIVE}, rounds=4)
    straight = run_federation(config, RunOptions(out=tmp_path / "a", progress=False, noise=SilentNoise()))
    with pytest.raises(SimulatedCrash):
        run_federation(config, RunOptions(out=tmp_path / "b", progress=False, noise=SilentNoise(), on_commit=crash_after(4 * 2 + 1)))
    (partial,) = (tmp_path / "b").glob("*.partial")
    resumed = resume_federation(partial, RunOptions(progress=False, noise=SilentNoise()))
    clips = json.loads((straight / "summary.json").read_text())["privacy"]["clip_norms"]
    assert json.loads((resumed / "summary.json").read_text())["privacy"]["clip_norms"] == clips
    assert len(set(np.round(clips, 9))) > 1  # C did move
    for es in _entries(resumed).values():
        assert [e.params["clip_norm"] for e in es] == pytest.approx(clips[:4], rel=1e-12)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("privacy.adaptive_clip.target_quantile=1.5", "privacy.adaptive_clip.target_quantile"),
        ("privacy.adaptive_clip.lr=-1", "privacy.adaptive_clip.lr"),
        ("privacy.adaptive_clip.count_noise=0.1", "privacy.adaptive_clip.count_noise"),
        ("privacy.adaptive_clip.quantile=0.5", "privacy.adaptive_clip.quantile"),
    ],
)
def test_nonsense_adaptive_clip_settings_exit_2_naming_the_key(tmp_path, capsys, override, key):
    from movielens_fixtures import write_ml100k

    from fedrlhf_secure.cli import main

    data = write_ml100k(tmp_path / "ml", n_users=8, n_items=40, per_user=20).parent

    sets = ["task.num_clients=8", "privacy.mode=client", "privacy.epsilon=8", "federation.weighting=uniform", override]
    code = main(
        [
            "run",
            str(ROOT / "configs" / "movielens-tiny.yaml"),
            "--out",
            str(tmp_path / "out"),
            "--data-dir",
            str(data),
            *[f"--set={o}" for o in sets],
        ]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert key in err and "Traceback" not in err


def test_adaptive_clipping_is_refused_where_the_server_cannot_read_the_count(tmp_path):
    with pytest.raises(ConfigError, match="privacy.adaptive_clip: adaptive clipping needs the released count"):
        run_federation(_config({**CLIENT, "adaptive_clip": ADAPTIVE}, {"kind": "ckks"}), RunOptions(out=tmp_path, progress=False))
    with pytest.raises(ConfigError, match="privacy.adaptive_clip is for client-level DP"):
        _config({"mode": "record", "epsilon": 4.0, "delta": 1e-2, "adaptive_clip": ADAPTIVE})
