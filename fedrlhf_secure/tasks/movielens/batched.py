"""Many MovieLens clients' local training as one batched computation (the embedded simulation's fast path).

Each client's fit (:func:`.train.train_epochs`, ``alternating`` schedule) is a sequence of Adam
steps on its own copy of the policy: ``personal_epochs`` on the user embedding, then ``epochs`` on
the shared parameters. The clients never interact during a fit, so step ``t`` of every client that
still has a step ``t`` can run at once:

* per-client parameters are stacked: the dense layers as ``(K, ...)`` tensors (``torch.bmm`` applies
  client ``k``'s layer to client ``k``'s batch), the personal rows and each client's compact item
  rows as one flat table each, client after client;
* clients are ordered by their number of steps (longest first), so the clients still training at
  step ``t`` are a prefix of that order and their parameters a prefix of every stacked tensor:
  each step trains views of those prefixes, nothing is gathered or copied back;
* the batch of step ``t`` is a ``(K_t, batch_size)`` index array; a shorter last batch is padded
  with records of weight 0 (exactly no gradient), and each client's loss is the mean over its own
  batch, so the summed loss has, for each client's parameters, exactly that client's gradient;
* Adam (Kingma & Ba 2015, Alg. 1, as ``torch.optim.Adam`` computes it, one state tensor per stacked
  parameter instead of one optimiser per client and phase) with one step count: every active client
  is at the same step of its phase;
* the data and the simulated human's rewards are drawn beforehand per client from the client's own
  generator (:func:`.train.draw_phase`), as the per-client loop draws them.

So each client's result is the per-client path's up to floating-point summation order
(``tests/test_movielens_batched.py`` compares both on a generated fixture: every client's deltas,
personal embedding and the aggregate). Record-level DP-SGD (the ``privacy.per_sample`` engine) keeps the per-client path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .model import DENSE_NAMES, GENRE_BIAS, GENRE_WEIGHT, HIDDEN_BIAS, HIDDEN_WEIGHT, OUT_BIAS, OUT_WEIGHT
from .train import LocalData, Phase, TrainSettings, policy_loss

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
"""``torch.optim.Adam``'s defaults, which the per-client path uses."""


@dataclass
class BatchedJob:
    """One client's fit: its starting personal and item rows, its records, and both phases' draws."""

    user_rows: np.ndarray  # (U_k, user_dim) float32
    item_rows: np.ndarray  # (I_k, item_dim) float32: the shared rows of the items it rated
    data: LocalData
    personal: Phase
    shared: Phase


@dataclass
class BatchedOutcome:
    user_rows: np.ndarray
    item_rows: np.ndarray
    dense: dict[str, np.ndarray]
    steps: int
    loss: float


class _Adam:
    """Adam over prefixes of stacked parameters: ``step(n, grad)`` updates the first ``n`` rows of
    the parameter and its moments, exactly as ``torch.optim.Adam``'s single-tensor step does."""

    def __init__(self, param: torch.Tensor, lr: float, weight_decay: float) -> None:
        self.param, self.lr, self.weight_decay = param, lr, weight_decay
        self.m = torch.zeros_like(param)
        self.v = torch.zeros_like(param)

    def step(self, n: int, grad: torch.Tensor, step: int) -> None:
        beta1, beta2 = ADAM_BETAS
        p, m, v = self.param[:n], self.m[:n], self.v[:n]
        if self.weight_decay:
            grad = grad.add(p, alpha=self.weight_decay)
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        denom = (v.sqrt() / math.sqrt(bias_correction2)).add_(ADAM_EPS)
        p.addcdiv_(m, denom, value=-self.lr / bias_correction1)


def _padded(phases: Sequence[Phase], record_offset: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(records (K, T, B) global positions, weights (K, T, B) 1/batch size or 0, rewards (K, T, B, 2),
    steps per client (K,))."""
    steps = np.array([p.steps for p in phases], dtype=np.int64)
    k_count, t_max = len(phases), int(steps.max(initial=0))
    rec = np.zeros((k_count, t_max, batch_size), dtype=np.int64)
    weight = np.zeros((k_count, t_max, batch_size), dtype=np.float32)
    rewards = np.zeros((k_count, t_max, batch_size, 2), dtype=np.float32)
    for k, ph in enumerate(phases):
        if not ph.steps:
            continue
        starts = np.cumsum(ph.sizes) - ph.sizes
        step = np.repeat(np.arange(ph.steps), ph.sizes)
        slot = np.arange(len(ph.idx)) - np.repeat(starts, ph.sizes)
        rec[k, step, slot] = record_offset[k] + ph.idx
        weight[k, step, slot] = 1.0 / np.repeat(ph.sizes, ph.sizes).astype(np.float32)
        rewards[k, step, slot] = ph.rewards
    return rec, weight, rewards, steps


def train_batched(shared: Mapping[str, np.ndarray], jobs: Sequence[BatchedJob], settings: TrainSettings) -> list[BatchedOutcome]:
    """Every job's ``alternating`` fit (:func:`.train.train_epochs`) from the same received dense
    layers ``shared``; returns one outcome per job, in the jobs' order."""
    if not jobs:
        return []
    # longest first: the clients still training at any step are then a prefix of this order
    order = sorted(range(len(jobs)), key=lambda j: -jobs[j].shared.steps)
    js = [jobs[j] for j in order]
    k_count = len(js)
    user_counts = np.array([len(j.user_rows) for j in js], dtype=np.int64)
    item_counts = np.array([len(j.item_rows) for j in js], dtype=np.int64)
    rec_counts = np.array([len(j.data) for j in js], dtype=np.int64)
    user_off = np.r_[0, np.cumsum(user_counts)]
    item_off = np.r_[0, np.cumsum(item_counts)]
    rec_off = np.r_[0, np.cumsum(rec_counts)]
    users = torch.from_numpy(np.concatenate([j.user_rows for j in js]).astype(np.float32))
    items = torch.from_numpy(np.concatenate([j.item_rows for j in js]).astype(np.float32))
    rec_user = torch.from_numpy(np.concatenate([user_off[k] + j.data.user_pos.numpy() for k, j in enumerate(js)]))
    rec_item = torch.from_numpy(np.concatenate([item_off[k] + j.data.item_pos.numpy() for k, j in enumerate(js)]))
    genres = torch.cat([j.data.genres for j in js])
    dense = {}
    for name in DENSE_NAMES:
        received = torch.from_numpy(np.require(shared[name], np.float32, "W"))
        dense[name] = received.expand(k_count, *received.shape).clone()

    def forward(rec: torch.Tensor, user_table: torch.Tensor, item_table: torch.Tensor, layers: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``PreferencePolicy.forward`` for the first ``kt`` clients' (kt, B) records: (kt, B) logits."""
        u = user_table[rec_user[rec]]
        it = item_table[rec_item[rec]]
        g = torch.baddbmm(layers[GENRE_BIAS][:, None, :], genres[rec], layers[GENRE_WEIGHT].transpose(1, 2))
        x = torch.cat([u, it, g], dim=2)
        h = torch.relu(torch.baddbmm(layers[HIDDEN_BIAS][:, None, :], x, layers[HIDDEN_WEIGHT].transpose(1, 2)))
        return torch.baddbmm(layers[OUT_BIAS][:, None, :], h, layers[OUT_WEIGHT].transpose(1, 2)).squeeze(2)

    def run(phases: Sequence[Phase], personal: bool) -> tuple[np.ndarray, np.ndarray]:
        """One phase for every client; returns (steps, mean loss of the last epoch) per client."""
        rec_np, weight_np, rewards_np, steps = _padded(phases, rec_off, settings.batch_size)
        if np.any(np.diff(steps) > 0):
            raise AssertionError("clients must be ordered by non-increasing steps in every phase")
        rec, weight, rewards = torch.from_numpy(rec_np), torch.from_numpy(weight_np), torch.from_numpy(rewards_np)
        losses = np.zeros(rec_np.shape[:2], dtype=np.float64)
        if personal:
            optimisers = {"user": _Adam(users, settings.user_lr, settings.weight_decay)}
        else:
            optimisers = {"item": _Adam(items, settings.item_lr, settings.weight_decay)}
            optimisers.update({name: _Adam(dense[name], settings.lr, settings.weight_decay) for name in DENSE_NAMES})
        for t in range(rec_np.shape[1]):
            kt = int(np.count_nonzero(steps > t))  # a prefix: steps are non-increasing
            r = rec[:kt, t]
            if personal:
                user_leaf = users[: user_off[kt]].detach().requires_grad_(True)
                layers = {name: dense[name][:kt] for name in DENSE_NAMES}
                logits = forward(r, user_leaf, items, layers)
                leaves = {"user": (int(user_off[kt]), user_leaf)}
            else:
                item_leaf = items[: item_off[kt]].detach().requires_grad_(True)
                layers = {name: dense[name][:kt].detach().requires_grad_(True) for name in DENSE_NAMES}
                logits = forward(r, users, item_leaf, layers)
                leaves = {"item": (int(item_off[kt]), item_leaf), **{name: (kt, layers[name]) for name in DENSE_NAMES}}
            loss = policy_loss(logits.reshape(-1), rewards[:kt, t].reshape(-1, 2), settings.objective, settings.temperature)
            per_client = (loss.reshape(kt, -1) * weight[:kt, t]).sum(1)
            per_client.sum().backward()
            with torch.no_grad():
                for name, (n, leaf) in leaves.items():
                    optimisers[name].step(n, leaf.grad, t + 1)
            losses[:kt, t] = per_client.detach().numpy()
        last = np.full(k_count, np.nan)
        for k, ph in enumerate(phases):
            if ph.steps:
                last[k] = float(losses[k, ph.steps - ph.steps_per_epoch : ph.steps].mean())
        return steps, last

    personal_steps, _ = run([j.personal for j in js], personal=True)
    shared_steps, last = run([j.shared for j in js], personal=False)
    out: list[BatchedOutcome | None] = [None] * k_count
    users_np, items_np = users.numpy(), items.numpy()
    dense_np = {name: t.numpy() for name, t in dense.items()}
    for k, j in enumerate(order):
        out[j] = BatchedOutcome(
            users_np[user_off[k] : user_off[k + 1]].copy(),
            items_np[item_off[k] : item_off[k + 1]].copy(),
            {name: dense_np[name][k].copy() for name in DENSE_NAMES},
            int(personal_steps[k] + shared_steps[k]),
            float(last[k]),
        )
    return out  # type: ignore[return-value]
