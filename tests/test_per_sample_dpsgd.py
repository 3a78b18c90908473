"""The torch.func / direct DP-SGD engine (``privacy.per_sample``) against Opacus, its reference.

One step on the same batch, the same parameters and the same noise generator state must give the
same per-record norms and the same clipped, noised gradient as Opacus; the audit canaries must go
in exactly as they do under Opacus; and a federation must record the same steps and ε either way.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from movielens_fixtures import write_ml100k

from fedrlhf_secure.privacy.dpsgd import AuditBlock, DPSGDSettings, RecordCanaries, make_private
from fedrlhf_secure.privacy.per_sample import Dense, FunctionalDPSGD
from fedrlhf_secure.tasks.movielens import MovieLensConfig, make_task
from fedrlhf_secure.tasks.movielens.feedback import KeyedHumanNoise
from fedrlhf_secure.tasks.movielens.model import build_policy
from fedrlhf_secure.tasks.movielens.train import (
    ShapedRewardCriterion,
    _adam,
    _head,
    private_shaped_rewards,
    record_gradients,
    train_epochs_dp,
)

SMALL = dict(user_dim=8, item_dim=8, genre_dim=4, hidden_dim=16, batch_size=8)


@pytest.fixture
def client_and_task(tmp_path):
    write_ml100k(tmp_path, n_users=12, n_items=40, per_user=20)
    task = make_task(MovieLensConfig(**SMALL), tmp_path, 0)
    return task.make_client(3), task


def _batch(client, task, size=14):
    data = client._dp_data
    idx = torch.arange(size)
    draws = KeyedHumanNoise(client._human_key, 0).draws(0, len(data))
    rewards = torch.from_numpy(private_shaped_rewards(data, idx.numpy(), client.feedback_profiles, draws))
    return data, idx, rewards


def _policy(task, client):
    return build_policy(task.initial_shared(), client._dp_user_rows, None, item_scale=task.config.dp_item_scale)


def _opacus_step(task, client, dp, idx, rewards, seed, mode):
    """One Opacus step on batch ``idx``: (per-record norms or None, {name: noisy gradient})."""
    data = client._dp_data
    policy = _policy(task, client)
    criterion = ShapedRewardCriterion(task.settings.objective, task.settings.temperature)
    module, opt, _, criterion = make_private(
        policy, _adam(policy, task.settings, personal=True, shared=True), len(data), dp, grad_sample_mode=mode, criterion=criterion
    )
    opt.generator = torch.Generator().manual_seed(seed)
    opt.zero_grad(set_to_none=True)
    criterion(module(data.user_pos[idx], data.item_pos[idx], data.genres[idx]), rewards).backward()
    norms = None
    if mode == "hooks":
        per_param = [p.grad_sample.reshape(len(idx), -1).norm(2, dim=-1) for p in opt.params]
        norms = torch.stack(per_param, dim=1).norm(2, dim=1)
    assert opt.pre_step()  # clip, accumulate, noise, scale: p.grad is the noisy mean
    grads = {name: p.grad.detach().clone() for name, p in policy.named_parameters()}
    module._close()
    return norms, grads


def _engine_step(task, client, dp, idx, rewards, seed, method):
    data = client._dp_data
    policy = _policy(task, client)
    engine = FunctionalDPSGD(
        _adam(policy, task.settings, personal=True, shared=True), len(data), dp, noise_generator=torch.Generator().manual_seed(seed)
    )
    grads, _ = record_gradients(policy, data, idx, rewards, task.settings, method=method)
    engine.noisy_gradients(grads, len(idx))
    return engine.last_norms, {name: p.grad.detach().clone() for name, p in policy.named_parameters()}


def test_the_record_function_is_the_modules_forward(client_and_task):
    client, task = client_and_task
    data, idx, _ = _batch(client, task)
    policy = _policy(task, client)
    dense = {k: v for k, v in policy.named_parameters() if not k.endswith("embedding.weight")}
    with torch.no_grad():
        z, _ = _head(
            dense,
            policy.user_embedding.weight[data.user_pos[idx]],
            policy.item_embedding.weight[data.item_pos[idx]],
            data.genres[idx],
            policy.item_scale,
        )
        torch.testing.assert_close(z, policy(data.user_pos[idx], data.item_pos[idx], data.genres[idx]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["direct", "functorch"])
@pytest.mark.parametrize("sigma", [0.0, 1.3])
def test_one_step_equals_opacus_on_the_same_batch_parameters_and_noise_draw(client_and_task, method, sigma):
    client, task = client_and_task
    data, idx, rewards = _batch(client, task)
    # a clip norm at the median record norm: about half the records are clipped, half are not
    norms, _ = _engine_step(task, client, DPSGDSettings(0.0, 1e9, 0.5), idx, rewards, 0, method)
    clip = float(norms.median())
    dp = DPSGDSettings(noise_multiplier=sigma, max_grad_norm=clip, sample_rate=0.5)
    ours_norms, ours = _engine_step(task, client, dp, idx, rewards, 11, method)
    assert 3 <= int((ours_norms > clip).sum()) <= len(idx) - 3
    for mode in ("hooks", "ghost"):
        theirs_norms, theirs = _opacus_step(task, client, dp, idx, rewards, 11, mode)
        if theirs_norms is not None:
            torch.testing.assert_close(ours_norms, theirs_norms, rtol=1e-5, atol=1e-7)
        assert ours.keys() == theirs.keys()
        for name in ours:
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=f"{mode} {name}")
    if sigma:  # the noise is really there, and it is Opacus' draw: another seed gives another gradient
        _, other = _engine_step(task, client, dp, idx, rewards, 12, method)
        assert not torch.allclose(other["item_embedding.weight"], ours["item_embedding.weight"], atol=1e-3)


def test_a_record_moves_the_clipped_sum_by_at_most_the_clip_norm_and_unclipped_by_much_more(client_and_task):
    """Replace one record of the batch by an outlier (a reward far off its rating): with C the sum
    moves by ≤ 2C (replace-one); the weakened engine (C = ∞, no clipping) lets it move further."""
    client, task = client_and_task
    data, idx, rewards = _batch(client, task)
    outlier = rewards.clone()
    outlier[0] = torch.tensor([-500.0, 500.0])

    def flat_sum(dp, r):
        policy = _policy(task, client)
        engine = FunctionalDPSGD(_adam(policy, task.settings, personal=True, shared=True), len(data), dp)
        grads, _ = record_gradients(policy, data, idx, r, task.settings)
        return torch.cat([s.reshape(-1) for s in engine.clipped_sums(grads, len(idx))])

    clip = 0.05
    moved = float((flat_sum(DPSGDSettings(0.0, clip, 0.5), outlier) - flat_sum(DPSGDSettings(0.0, clip, 0.5), rewards)).norm())
    assert 0.5 * clip < moved <= 2 * clip + 1e-6
    weakened = float((flat_sum(DPSGDSettings(0.0, math.inf, 0.5), outlier) - flat_sum(DPSGDSettings(0.0, math.inf, 0.5), rewards)).norm())
    assert weakened > 20 * clip


@pytest.mark.parametrize("engine", ["direct", "functorch"])
def test_a_fit_takes_int_one_over_q_steps_per_epoch_like_opacus(client_and_task, engine):
    client, task = client_and_task
    n = len(client._dp_data)
    for q in (1 / 3, 1 / 93):  # 1/(1/93) rounds below 93: Opacus takes 92 steps, so must we
        dp = DPSGDSettings(noise_multiplier=1.0, max_grad_norm=0.5, sample_rate=q, per_sample=engine)
        steps, _ = train_epochs_dp(
            _policy(task, client),
            client._dp_data,
            client.feedback_profiles,
            task.settings,
            2,
            dp,
            human=KeyedHumanNoise(client._human_key, 0),
        )
        opacus, _ = train_epochs_dp(
            _policy(task, client),
            client._dp_data,
            client.feedback_profiles,
            task.settings,
            2,
            dp,
            human=KeyedHumanNoise(client._human_key, 0),
            engine="opacus",
        )
        assert steps == opacus == 2 * int(1 / q)
    assert n > 0


# ------------------------------------------------------------------ the audit canaries, as under Opacus


def _linear_fit(block: AuditBlock, sigma: float, q: float, steps: int, n: int = 8) -> FunctionalDPSGD:
    """test_audit_record_canaries._linear_fit with this engine: a linear model, MSE, SGD."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(n, 3), torch.randn(n, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = FunctionalDPSGD(opt, n, DPSGDSettings(sigma, 0.5, q, audit_block=block))
    params = dict(model.named_parameters())

    def loss(p, xi, yi):
        return torch.nn.functional.mse_loss(functional_call(model, p, (xi[None],)), yi[None])

    for _ in range(steps):
        for idx in engine.epoch():
            grads = {}
            if len(idx):
                g = vmap(grad(loss), in_dims=(None, 0, 0))({k: v.detach() for k, v in params.items()}, x[idx], y[idx])
                grads = {params[k]: Dense(v) for k, v in g.items()}
            engine.step(grads, len(idx))
    return engine


def test_canaries_go_into_the_clipped_sum_before_the_noise_and_nothing_else_moves_the_block():
    start = np.array([0.0, 1.0, 0.0, 0.0], dtype=np.float32)
    block = AuditBlock(start, RecordCanaries(np.array([0, 2]), np.array([0.5, -0.5], dtype=np.float32)))
    _linear_fit(block, sigma=0.0, q=1.0, steps=3)
    assert block.steps == 3 and block.sampled == 6
    assert np.allclose(block.delta(), [-3 * 0.1 * 0.5 / 8, 0.0, 3 * 0.1 * 0.5 / 8, 0.0], atol=1e-7)
    noisy = AuditBlock(start, None)
    _linear_fit(noisy, sigma=1.0, q=1.0, steps=2)
    assert np.all(noisy.delta() != 0.0)


def test_canaries_are_poisson_sampled_at_the_plans_rate():
    block = AuditBlock(np.zeros(400, dtype=np.float32), RecordCanaries(np.arange(400), np.full(400, 0.5, dtype=np.float32)))
    engine = _linear_fit(block, sigma=0.0, q=0.25, steps=10, n=40)
    draws = 400 * block.steps
    assert block.steps == engine.steps == 40
    assert abs(block.sampled / draws - 0.25) < 4 * math.sqrt(0.25 * 0.75 / draws)


def test_the_block_gets_the_same_noisy_gradient_under_both_engines():
    """Block last in the optimizer, so its noise is the last draw of a step under both engines (Opacus
    hooks: ghost clipping mis-broadcasts the (n, 1) per-sample MSE of this toy model)."""
    torch.manual_seed(0)
    n = 6
    x, y = torch.randn(n, 3), torch.randn(n, 1)
    out = {}
    for name in ("opacus", "direct"):
        torch.manual_seed(1)
        model = torch.nn.Linear(3, 1)
        block = AuditBlock(np.zeros(5, dtype=np.float32), None)
        dp = DPSGDSettings(0.7, 0.5, 1.0, audit_block=block)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if name == "opacus":
            module, dp_opt, _, criterion = make_private(model, opt, n, dp, grad_sample_mode="hooks", criterion=torch.nn.MSELoss())
            dp_opt.generator = torch.Generator().manual_seed(5)
            dp_opt.zero_grad(set_to_none=True)
            criterion(module(x), y).backward()
            dp_opt.step()
        else:
            from torch.func import functional_call, grad, vmap

            engine = FunctionalDPSGD(opt, n, dp, noise_generator=torch.Generator().manual_seed(5))
            params = dict(model.named_parameters())

            def loss(p, xi, yi, model=model):
                return torch.nn.functional.mse_loss(functional_call(model, p, (xi[None],)), yi[None])

            g = vmap(grad(loss), in_dims=(None, 0, 0))({k: v.detach() for k, v in params.items()}, x, y)
            engine.step({params[k]: Dense(v) for k, v in g.items()}, n)
        out[name] = (block.delta(), model.weight.detach().clone())
    np.testing.assert_allclose(out["direct"][0], out["opacus"][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out["direct"][1], out["opacus"][1], rtol=1e-5, atol=1e-6)
    assert np.all(out["direct"][0] != 0.0)


# ------------------------------------------------------------------ the switch and the ledger


def test_an_unknown_engine_is_refused_at_the_boundary():
    from fedrlhf_secure.config import config_from_dict
    from fedrlhf_secure.configtypes import ConfigError

    with pytest.raises(ConfigError, match="per_sample"):
        config_from_dict({"seed": 0, "task": {"kind": "movielens"}, "privacy": {"mode": "record", "epsilon": 8, "per_sample": "numpy"}})
    assert config_from_dict({"seed": 0, "task": {"kind": "movielens"}}).privacy.per_sample == "direct"


def test_both_engines_leave_the_same_ledger_steps_and_epsilon(shared_datasets, tmp_path):
    from fedrlhf_secure.config import load_config
    from fedrlhf_secure.federation.engine import RunOptions, run_federation
    from fedrlhf_secure.privacy.ledger import read_ledger

    spent = {}
    for engine in ("direct", "opacus"):
        overrides = ["task.num_clients=4", "privacy.mode=record", "privacy.epsilon=4", f"privacy.per_sample={engine}"]
        run = run_federation(
            load_config("configs/movielens-tiny.yaml", overrides),
            RunOptions(data_dir=shared_datasets, out=tmp_path / engine, progress=False),
        )
        _, entries = read_ledger(run / "ledger")
        spent[engine] = {
            c: [(e.round, e.steps, e.sample_rate, e.noise_multiplier, round(e.epsilon_after, 9)) for e in es] for c, es in entries.items()
        }
    assert spent["direct"] == spent["opacus"]
    assert sum(len(v) for v in spent["direct"].values()) == 8  # 4 clients x 2 rounds
    assert all(steps >= 1 and 0 < eps <= 4.0 for rows in spent["direct"].values() for _, steps, _, _, eps in rows)
