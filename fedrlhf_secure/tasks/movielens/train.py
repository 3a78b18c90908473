"""Local RLHF on a client's ratings: the policy is pushed towards the shaped reward ``R_k = R0 + λ_k H_k``.

**Which update, and why.** With two actions the policy's expected shaped reward in a state is
``J(s) = π(high|s) R_k(s, high) + π(low|s) R_k(s, low)`` and can be optimised exactly, with no
sampling of actions; we use its entropy-regularised form (the objective of RLHF: reward minus
``β·KL(π || π_0)`` to a uniform reference policy ``π_0``). Its maximiser is known in closed form,
``π*(high|s) = σ((R_k(s, high) - R_k(s, low)) / β)`` (the Boltzmann policy of the shaped reward),
and each step moves ``π_θ`` towards it by minimising ``KL(π* || π_θ)`` (the reward-weighted
projection of AWR/MPO, Peters & Schaal 2007; Peng et al. 2019). Compared with the plain
expected-reward gradient ``∂J/∂z = π(1-π)(R_high - R_low)`` (``objective: expected_reward``, also
available), the projection's gradient ``π - π*`` does not vanish once the policy is confident, so it
fits in the few local steps a federated round allows. Measured on u1 (943 clients, 5 rounds × 5
local epochs, same settings otherwise): held-out accuracy after rounds 1-5 was 0.645 / 0.646 / 0.666 /
0.688 / 0.706 with ``expected_reward`` against 0.654 / 0.703 / 0.710 / 0.713 / 0.713 with
``kl_regularised``. A Q-learning target would need a value head and bootstrapping that a one-step
(bandit) task does not have. The shaped reward still matters: ``λ_k H_k`` moves the target ``π*``
per record (a 1-star record is pushed harder towards "low" than a 3-star one), and a test checks
that ``λ = 0`` and ``λ > 0`` give different updates.

**Local schedule.** See :func:`train_epochs`: the personal embedding is first fitted to the received
global model, then the shared parameters are trained with it fixed (FedRep, Collins et al. 2021).

Two loops: :func:`train_epochs` (plain mini-batch Adam, the fast path) and :func:`train_epochs_dp`
(DP-SGD: per-sample clipping and Gaussian noise with Poisson sampling, by the ``torch.func`` engine
of :mod:`fedrlhf_secure.privacy.per_sample` or by Opacus; see its docstring).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F

from ...privacy.dpsgd import make_private
from .feedback import REFERENCE_RATING, FeedbackProfile, KeyedHumanNoise, human_signal, private_human_signal, reward_table
from .model import PreferencePolicy

if TYPE_CHECKING:
    from ...privacy.dpsgd import DPSGDSettings

Objective = Literal["kl_regularised", "expected_reward"]


@dataclass(frozen=True)
class TrainSettings:
    lr: float
    weight_decay: float
    batch_size: int
    objective: Objective
    temperature: float
    user_lr: float
    item_lr: float
    personal_epochs: int


@dataclass
class LocalData:
    """One learner's training records, as positions in its policy's tables."""

    user_pos: torch.Tensor  # (N,) int64
    item_pos: torch.Tensor  # (N,) int64
    genres: torch.Tensor  # (N, G) float32
    ratings: np.ndarray  # (N,) float32
    labels: np.ndarray  # (N,) float32
    profile_index: np.ndarray  # (N,) int: which feedback profile (human) each record belongs to
    user_key: np.ndarray  # (N,) int: which user each record belongs to (pairwise comparisons stay within a user)

    def __len__(self) -> int:
        return len(self.ratings)


def policy_loss(logits: torch.Tensor, rewards: torch.Tensor, objective: Objective, temperature: float) -> torch.Tensor:
    """Per-record loss whose gradient ascends the shaped reward (see the module docstring).

    ``rewards`` is (N, 2): ``R_k(s, low)``, ``R_k(s, high)``."""
    if objective == "expected_reward":
        p_high = torch.sigmoid(logits)
        return -(p_high * rewards[:, 1] + (1.0 - p_high) * rewards[:, 0])
    target = torch.sigmoid((rewards[:, 1] - rewards[:, 0]) / temperature)
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none")


def shaped_rewards(data: LocalData, idx: np.ndarray, profiles: ProfileTable, rng: np.random.Generator) -> np.ndarray:
    """``R_k(s, a)`` for the batch ``idx`` of ``data``, each record shaped by its own user's
    simulated human and ``λ_k`` (vectorised: one numpy pass per batch). Not for DP: the pairwise
    comparisons and the generator couple the records of a batch (:func:`private_shaped_rewards`)."""
    k = data.profile_index[idx]
    ratings = data.ratings[idx]
    signal = human_signal(ratings, data.user_key[idx], profiles.noise_std[k], profiles.flip_prob[k], rng)
    return reward_table(data.labels[idx], signal, profiles.lam[k])


def private_shaped_rewards(data: LocalData, idx: np.ndarray, profiles: ProfileTable, draws: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """``R_k(s, a)`` for the batch ``idx`` under record-level DP: each record's reward is a function
    of that record and its own keyed draws (``draws`` = :meth:`KeyedHumanNoise.draws` for the whole
    client, indexed here by record position) and of nothing else."""
    k = data.profile_index[idx]
    normal, uniform = draws
    signal = private_human_signal(data.ratings[idx], profiles.noise_std[k], profiles.flip_prob[k], normal[idx], uniform[idx])
    return reward_table(data.labels[idx], signal, profiles.lam[k])


@dataclass(frozen=True)
class ProfileTable:
    """The feedback profiles of a learner's humans as arrays indexed by ``LocalData.profile_index``."""

    lam: np.ndarray
    noise_std: np.ndarray
    flip_prob: np.ndarray

    @classmethod
    def of(cls, profiles: list[FeedbackProfile]) -> ProfileTable:
        return cls(
            np.array([p.lam for p in profiles], dtype=np.float32),
            np.array([p.noise_std for p in profiles], dtype=np.float64),
            np.array([p.flip_prob for p in profiles], dtype=np.float64),
        )


def _adam(policy: PreferencePolicy, settings: TrainSettings, *, personal: bool, shared: bool) -> torch.optim.Optimizer:
    """Adam, fresh each fit (its moments are local state and never leave the client), with one
    learning rate per kind of parameter: ``user_lr`` for the personal user embedding, ``item_lr``
    for the item rows, ``lr`` for the dense shared layers (which every client moves, so they drift
    most between aggregations and get the smallest step). Parameters not trained are frozen."""
    user, item = policy.user_embedding.weight, policy.item_embedding.weight
    dense = [p for p in policy.parameters() if p is not user and p is not item]
    groups = []
    if shared:
        groups += [{"params": dense, "lr": settings.lr}, {"params": [item], "lr": settings.item_lr / policy.item_scale}]
    if personal:
        groups.append({"params": [user], "lr": settings.user_lr})
    for p in policy.parameters():
        p.requires_grad_(False)
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    return torch.optim.Adam(groups, lr=settings.lr, weight_decay=settings.weight_decay)


@dataclass(frozen=True)
class Phase:
    """The mini-batches of ``epochs`` shuffled passes over a learner's records and each record's
    shaped reward, drawn before any training (the simulated human never looks at the model, so the
    draws do not depend on it): ``idx`` and ``rewards`` are the steps' batches concatenated,
    ``sizes`` the batch size of each step. The per-client loop and the vectorised one
    (:mod:`.batched`) train on the same :class:`Phase`, so they see identical data and rewards."""

    idx: np.ndarray  # (sum of sizes,) int64 record positions
    rewards: np.ndarray  # (sum of sizes, 2) float32: R_k(s, low), R_k(s, high)
    sizes: np.ndarray  # (steps,) int64
    steps_per_epoch: int

    @property
    def steps(self) -> int:
        return len(self.sizes)


def draw_phase(data: LocalData, profiles: ProfileTable, batch_size: int, epochs: int, rng: np.random.Generator) -> Phase:
    """The batches and shaped rewards of ``epochs`` passes, consuming ``rng`` exactly as a loop of
    :func:`shaped_rewards` calls over the shuffled batches would (per epoch a permutation; per batch
    the direct feedback's normals, then, for batches of two or more, the pairwise shuffle's uniforms
    and one flip uniform per pair), so the rewards are bit-identical to that loop's
    (``tests/test_movielens_batched.py`` checks it). Only the draws are made batch by batch; the
    feedback arithmetic runs once over the whole phase, with pairs formed within (batch, user)."""
    n = len(data)
    single_user = n == 0 or int(data.user_key.min()) == int(data.user_key.max())
    idx_parts, normal_parts, shuffle_parts, flip_parts, sizes = [], [], [], [], []
    for _ in range(epochs):
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            b = len(idx)
            idx_parts.append(idx)
            sizes.append(b)
            normal_parts.append(rng.standard_normal(b))
            if b >= 2:
                if single_user:
                    pairs = b // 2
                else:
                    pairs = int((np.unique(data.user_key[idx], return_counts=True)[1] // 2).sum())
                shuffle_parts.append(rng.random(b))
                flip_parts.append(rng.random(pairs))
    sizes_arr = np.asarray(sizes, dtype=np.int64)
    steps_per_epoch = -(-n // batch_size) if n else 0
    if not idx_parts:
        return Phase(np.zeros(0, np.int64), np.zeros((0, 2), np.float32), sizes_arr, steps_per_epoch)
    idx = np.concatenate(idx_parts).astype(np.int64)
    k = data.profile_index[idx]
    ratings = np.asarray(data.ratings[idx], dtype=np.float32)
    flip_prob = profiles.flip_prob[k]
    # direct feedback (feedback.direct_feedback, elementwise, so the same numbers over the concatenation)
    direct = ((ratings - REFERENCE_RATING) / 2.0 + np.concatenate(normal_parts) * profiles.noise_std[k]).astype(np.float32)
    # pairwise comparisons (feedback.pairwise_feedback, batch by batch): records of batches of >= 2
    step = np.repeat(np.arange(len(sizes_arr)), sizes_arr)
    paired = np.repeat(sizes_arr >= 2, sizes_arr)
    pair = np.zeros(len(idx), dtype=np.float32)
    pos = np.flatnonzero(paired)
    if len(pos):
        shuffle = np.concatenate(shuffle_parts)
        flip_u = np.concatenate(flip_parts)
        groups = np.asarray(data.user_key)[idx[pos]]
        order = pos[np.lexsort((shuffle, groups, step[pos]))]  # within each batch: by user, then shuffled
        key_step, key_group = step[order], np.asarray(data.user_key)[idx[order]]
        same_next = np.r_[(key_step[1:] == key_step[:-1]) & (key_group[1:] == key_group[:-1]), False]
        group_start = np.flatnonzero(np.r_[True, ~same_next[:-1]])
        rank = np.arange(len(order)) - np.repeat(group_start, np.diff(np.r_[group_start, len(order)]))
        first = np.flatnonzero((rank % 2 == 0) & same_next)
        a, b = order[first], order[first + 1]
        pref = np.sign(ratings[a] - ratings[b])
        pref = np.where(flip_u < flip_prob[a], -pref, pref)
        pair[a] = pref
        pair[b] = -pref
    signal = 0.5 * (direct + pair)
    rewards = reward_table(data.labels[idx], signal, profiles.lam[k])
    return Phase(idx, rewards, sizes_arr, steps_per_epoch)


def _run_epochs(policy, optimizer, data, profiles, settings, epochs, rng) -> tuple[int, float]:
    """``epochs`` shuffled passes (drawn by :func:`draw_phase`); returns (steps, mean loss of the last pass)."""
    phase = draw_phase(data, profiles, settings.batch_size, epochs, rng)
    losses = []
    ends = np.cumsum(phase.sizes)
    for step, (end, size) in enumerate(zip(ends, phase.sizes, strict=True)):
        tidx = torch.from_numpy(phase.idx[end - size : end])
        logits = policy(data.user_pos[tidx], data.item_pos[tidx], data.genres[tidx])
        loss = policy_loss(logits, torch.from_numpy(phase.rewards[end - size : end]), settings.objective, settings.temperature).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= phase.steps - phase.steps_per_epoch:
            losses.append(loss.detach())
    return phase.steps, float(torch.stack(losses).mean()) if losses else float("nan")


def train_epochs(
    policy: PreferencePolicy,
    data: LocalData,
    profiles: ProfileTable,
    settings: TrainSettings,
    epochs: int,
    rng: np.random.Generator,
    *,
    schedule: Literal["alternating", "joint"] = "alternating",
) -> int:
    """Mini-batch Adam on the shaped-reward objective; returns the number of optimiser steps.

    ``alternating`` (federated clients, local-only baseline): ``personal_epochs`` on the personal
    user embedding with the received shared parameters frozen, then ``epochs`` on the shared
    parameters with the user embedding frozen (FedRep, Collins et al. 2021). The personal
    embedding is thus fitted to the *global* model, and after aggregation it is off only by the
    averaged drift instead of by this client's own drift; training both jointly left held-out
    accuracy on u1 at ~0.69-0.70 instead of ~0.71. ``joint`` (the centralized baseline, which has
    no aggregation): all parameters together for ``epochs``.

    Returns (optimiser steps, mean loss of the last epoch)."""
    if schedule == "joint":
        steps, loss = _run_epochs(policy, _adam(policy, settings, personal=True, shared=True), data, profiles, settings, epochs, rng)
    else:
        steps = fit_personal(policy, data, profiles, settings, rng)
        shared_steps, loss = _run_epochs(
            policy, _adam(policy, settings, personal=False, shared=True), data, profiles, settings, epochs, rng
        )
        steps += shared_steps
    for p in policy.parameters():
        p.requires_grad_(True)
    return steps, loss


def fit_personal(
    policy: PreferencePolicy, data: LocalData, profiles: ProfileTable, settings: TrainSettings, rng: np.random.Generator
) -> int:
    """``settings.personal_epochs`` of Adam on the personal user embedding alone, the shared
    parameters frozen at the received global model (the first phase of FedRep); returns the steps.
    The shared parameters come out unchanged."""
    steps, _ = _run_epochs(
        policy, _adam(policy, settings, personal=True, shared=False), data, profiles, settings, settings.personal_epochs, rng
    )
    for p in policy.parameters():
        p.requires_grad_(True)
    return steps


class ShapedRewardCriterion(torch.nn.Module):
    """:func:`policy_loss` as a criterion with a ``reduction`` attribute, the form Opacus' ghost
    clipping wraps (it switches ``reduction`` to ``"none"`` to get one loss per record)."""

    def __init__(self, objective: Objective, temperature: float) -> None:
        super().__init__()
        self.objective, self.temperature, self.reduction = objective, temperature, "mean"

    def forward(self, logits: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
        loss = policy_loss(logits, rewards, self.objective, self.temperature)
        return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[self.reduction]


def _head(dense: Mapping[str, torch.Tensor], user_rows: torch.Tensor, item_rows: torch.Tensor, genres: torch.Tensor, item_scale: float):
    """:meth:`PreferencePolicy.forward` after its two lookups, on the records' own user and item rows
    (stored units) and the dense layers' parameters ``dense`` (by module parameter name). Returns
    the logits and each linear layer's (input, output), the factors of its per-sample weight
    gradients. ``tests/test_per_sample_dpsgd.py`` checks the logits equal the module's."""
    pg = F.linear(genres, dense["genre_projection.weight"], dense["genre_projection.bias"])
    items = item_rows * item_scale if item_scale != 1.0 else item_rows
    x = torch.cat([user_rows, items, pg], dim=-1)
    ph = F.linear(x, dense["hidden.weight"], dense["hidden.bias"])
    h = torch.relu(ph)
    z = F.linear(h, dense["out.weight"], dense["out.bias"])
    return z.squeeze(-1), ((genres, pg), (x, ph), (h, z))


def record_gradients(
    policy: PreferencePolicy,
    data: LocalData,
    idx: torch.Tensor,
    rewards: torch.Tensor,
    settings: TrainSettings,
    *,
    method: Literal["direct", "functorch"] = "direct",
):
    """Each record's gradient of its own loss, for :class:`~fedrlhf_secure.privacy.per_sample.FunctionalDPSGD`;
    returns (per-sample gradients by parameter, mean loss of the batch).

    ``functorch``: ``torch.func.vmap(grad(loss))`` over the records, with respect to the dense
    layers and the record's own user and item rows. ``direct`` (default, ~7× cheaper per step on
    this model): one backward pass of the batch's summed loss to each linear layer's output and to
    the looked-up rows; every term of the sum depends on one record (the layers act row by row),
    so the gradient at record i's row is record i's own, and a linear weight's per-sample gradient
    is that output gradient times the layer's input (:class:`~fedrlhf_secure.privacy.per_sample.Outer`,
    what Opacus' ``nn.Linear`` grad sampler computes). Either way the embedding tables' gradients
    come back as the one row each record reads (:class:`~fedrlhf_secure.privacy.per_sample.Rows`)."""
    from ...privacy.per_sample import Dense, Outer, Rows

    named = dict(policy.named_parameters())
    users, items = data.user_pos[idx], data.item_pos[idx]
    user_rows = policy.user_embedding.weight.detach()[users]
    item_rows = policy.item_embedding.weight.detach()[items]
    genres = data.genres[idx]
    out: dict[torch.Tensor, object] = {}
    if method == "functorch":
        from torch.func import grad_and_value, vmap

        dense = {k: v.detach() for k, v in named.items() if not k.endswith("embedding.weight")}

        def loss(dense, user_row, item_row, genre_row, reward):
            z, _ = _head(dense, user_row, item_row, genre_row, policy.item_scale)
            return policy_loss(z.reshape(1), reward.reshape(1, 2), settings.objective, settings.temperature)[0]

        (g_dense, g_user, g_item), losses = vmap(grad_and_value(loss, argnums=(0, 1, 2)), in_dims=(None, 0, 0, 0, 0))(
            dense, user_rows, item_rows, genres, rewards
        )
        out.update({named[k]: Dense(g) for k, g in g_dense.items() if named[k].requires_grad})
    elif method == "direct":
        dense = {k: v.detach().requires_grad_(True) for k, v in named.items() if not k.endswith("embedding.weight")}
        user_rows.requires_grad_(True)
        item_rows.requires_grad_(True)
        with torch.enable_grad():
            z, layers = _head(dense, user_rows, item_rows, genres, policy.item_scale)
            losses = policy_loss(z, rewards, settings.objective, settings.temperature)
            outputs = [o for _, o in layers]
            *g_out, g_user, g_item = torch.autograd.grad(losses.sum(), [*outputs, user_rows, item_rows])
        for name, (inp, _), g in zip(("genre_projection", "hidden", "out"), layers, g_out, strict=True):
            if named[f"{name}.weight"].requires_grad:
                out[named[f"{name}.weight"]] = Outer(g, inp.detach())
            if named[f"{name}.bias"].requires_grad:
                out[named[f"{name}.bias"]] = Dense(g)
        losses = losses.detach()
    else:
        raise ValueError(f"unknown per-sample gradient method {method!r}")
    if policy.user_embedding.weight.requires_grad:
        out[policy.user_embedding.weight] = Rows(users, g_user)
    if policy.item_embedding.weight.requires_grad:
        out[policy.item_embedding.weight] = Rows(items, g_item)
    return out, losses.mean()


def train_epochs_dp(
    policy: PreferencePolicy,
    data: LocalData,
    profiles: ProfileTable,
    settings: TrainSettings,
    epochs: int,
    dp: DPSGDSettings,
    *,
    human: KeyedHumanNoise,
    grad_sample_mode: Literal["ghost", "hooks"] = "ghost",
    engine: Literal["direct", "functorch", "opacus"] | None = None,
) -> tuple[int, float]:
    """Record-level DP-SGD; returns (noisy steps taken, mean loss of the last epoch).

    ``engine`` (default ``dp.per_sample``, i.e. ``privacy.per_sample``): ``direct`` or ``functorch``
    (:class:`~fedrlhf_secure.privacy.per_sample.FunctionalDPSGD` fed by :func:`record_gradients`
    with that method) or ``opacus`` (:func:`_train_epochs_opacus`, the reference). Both: flat clipping of each
    record's gradient to ``max_grad_norm``, Gaussian noise ``noise_multiplier · max_grad_norm`` on
    every coordinate (every item row included, because under record-level DP the set of rated items
    is itself private), Poisson batches at the planned ``sample_rate`` (``int(1/q)`` steps per
    epoch, empty batches still take a noisy step), and Adam on the noisy sum divided by the
    expected batch size. The personal user embedding used here is trained, clipped and noised like
    everything else. Measured (``fedrlhf bench dp``, BENCHMARKS.md): see docs/dp.md.

    Accounting is not done here: :mod:`fedrlhf_secure.privacy` accounts over rounds from the
    ``steps``/``sample_rate``/``noise_multiplier`` this fit reports. The shaped reward is computed
    per record from its own rating and its own keyed draws only (:func:`private_shaped_rewards`,
    ``human`` keyed by the client's secret key and the round), so each per-sample gradient depends
    on one record. All parameters train jointly (one DP mechanism for exactly ``epochs`` passes at
    the planned rate, matching the steps the privacy plan calibrated for), not in the alternating
    schedule of :func:`train_epochs`.
    """
    engine = engine or dp.per_sample
    if engine == "opacus":
        return _train_epochs_opacus(policy, data, profiles, settings, epochs, dp, human=human, grad_sample_mode=grad_sample_mode)
    if engine not in ("direct", "functorch"):
        raise ValueError(f"privacy.per_sample must be one of direct, functorch, opacus; got {engine!r}")
    from ...privacy.per_sample import FunctionalDPSGD

    n = len(data)
    dpsgd = FunctionalDPSGD(_adam(policy, settings, personal=True, shared=True), n, dp)
    last = float("nan")
    for epoch in range(epochs):
        losses = []
        draws = human.draws(epoch, n)
        for idx in dpsgd.epoch():
            if len(idx):
                rewards = torch.from_numpy(private_shaped_rewards(data, idx.numpy(), profiles, draws))
                grads, loss = record_gradients(policy, data, idx, rewards, settings, method=engine)
                losses.append(loss.detach())
            else:  # an empty Poisson batch: no gradient, but the noise is still added
                grads = {}
            dpsgd.step(grads, len(idx))
        if losses:
            last = float(torch.stack(losses).mean())
    for p in policy.parameters():
        p.requires_grad_(True)
    return dpsgd.steps, last


def _train_epochs_opacus(
    policy: PreferencePolicy,
    data: LocalData,
    profiles: ProfileTable,
    settings: TrainSettings,
    epochs: int,
    dp: DPSGDSettings,
    *,
    human: KeyedHumanNoise,
    grad_sample_mode: Literal["ghost", "hooks"] = "ghost",
) -> tuple[int, float]:
    """:func:`train_epochs_dp` with Opacus (``privacy.per_sample: opacus``).

    ``opacus.PrivacyEngine.make_private`` wraps the policy and the optimizer.
    ``grad_sample_mode="ghost"`` (the default) is Opacus' ghost clipping (Li et al. 2022; Bu et al.
    2023): the per-record gradient *norms* come from the layers' activations and backprops, then a
    second backward pass of the reweighted loss yields the sum of clipped gradients directly. The
    result is the same as ``"hooks"`` (which materialises a (batch, 1682, 32) per-record gradient
    of the item table every step); ``tests/test_movielens_task.py`` checks the two agree.

    Poisson sampling is done by an Opacus ``DPDataLoader`` built at exactly the planned
    ``sample_rate`` (make_private's own loader conversion would round the rate to ``1/len(loader)``),
    so it is passed with ``poisson_sampling=False``.
    """
    import warnings

    n = len(data)
    optimizer = _adam(policy, settings, personal=True, shared=True)
    criterion = ShapedRewardCriterion(settings.objective, settings.temperature)
    module, dp_optimizer, loader, criterion = make_private(policy, optimizer, n, dp, grad_sample_mode=grad_sample_mode, criterion=criterion)
    steps, last = 0, float("nan")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")  # inputs are indices
        for epoch in range(epochs):
            losses = []
            draws = human.draws(epoch, n)
            for (idx,) in loader:
                dp_optimizer.zero_grad(set_to_none=True)
                if len(idx):
                    rewards = private_shaped_rewards(data, idx.numpy(), profiles, draws)
                    logits = module(data.user_pos[idx], data.item_pos[idx], data.genres[idx])
                    loss = criterion(logits, torch.from_numpy(rewards))
                    loss.backward()
                    losses.append(loss.detach())
                else:  # an empty Poisson batch: no gradient, but the noise is still added
                    for p in module.parameters():
                        if grad_sample_mode == "ghost":
                            p.grad = torch.zeros_like(p)
                        else:
                            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
                dp_optimizer.step()
                steps += 1
            if losses:
                last = float(torch.stack(losses).mean())
    module._close()
    return steps, last
