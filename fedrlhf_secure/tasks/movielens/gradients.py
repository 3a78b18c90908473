"""Per-record clipped gradient sums of the MovieLens policy, for distributed-noise DP-SGD.

Under ``privacy.record_noise: distributed`` (or ``central``) a client releases one thing per round:
``Σ_{i ∈ S} clip_C(∇ℓ_i(θ, u_0))``, the sum of its per-record clipped gradients over a Poisson
sample ``S`` of its records (rate ``q``), evaluated at the **received global** shared parameters
``θ`` and the **public** initial user embedding ``u_0`` (seeded from the public run seed,
:meth:`.model.PolicyDims.init_user`). The client's privacy layer then adds its noise share
(:mod:`fedrlhf_secure.privacy.distributed_dpsgd`). Why at ``(θ, u_0)`` and nothing else:

* one record then moves exactly one summand, by at most ``2C`` in norm (replace-one), which is the
  sensitivity the subsampled Gaussian accountant assumes. A personal embedding fitted to the
  client's data (even only its DP-SGD-trained one) would make every summand a function of the other
  records too, and a multi-step local trajectory would carry one record's influence into every
  later step: neither has a per-record bound;
* the gradient with respect to the user embedding is never released (it is personal), so the
  shared layers learn with the user input held at its public initial value; the client's
  prediction embedding is fitted afterwards, locally and without noise, to the new global model
  (it never leaves, :meth:`.task.MovieLensClient._fit_prediction_embedding`).

The gradients are computed in closed form (NumPy, float64) for the whole sample at once: the
policy is ``z = w₂·relu(W₁x + b₁) + b₂`` with ``x = [u ; e_item ; P g + p]`` (:mod:`.model`) and
the per-record loss's derivative with respect to the logit is ``σ(z) - π*`` (the
``kl_regularised`` objective) or ``-π(1-π)(R_high - R_low)`` (``expected_reward``), so every
per-record gradient is an outer product and its squared norm a sum of products of squared norms
(the identity ghost clipping uses, Li et al. 2022). ``tests/test_distributed_dpsgd.py`` checks the
result against torch autograd record by record.

``item_scale`` k is the same preconditioning as ``dp_item_scale`` under local DP-SGD
(:func:`.model.build_policy`): the item rows are differentiated in units of ``1/k``, so each
record's item-row gradient counts k times more inside the clip norm; the released item block is in
those units (post-processing turns it back; the server optimizer sees it per coordinate anyway).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .model import DENSE_NAMES, GENRE_BIAS, GENRE_WEIGHT, HIDDEN_BIAS, HIDDEN_WEIGHT, ITEM_EMBEDDING, OUT_BIAS, OUT_WEIGHT


@dataclass(frozen=True)
class ClippedSum:
    """The clipped gradient sum of one sample: a gradient per shared parameter (item table full size),
    how many records were sampled and how many of them were clipped (both stay on the client)."""

    gradient: dict[str, np.ndarray]
    sampled: int
    clipped: int


def _dloss_dz(z: np.ndarray, rewards: np.ndarray, objective: str, temperature: float) -> np.ndarray:
    """d loss / d logit per record, for :func:`.train.policy_loss`'s two objectives."""
    p = _sigmoid(z)
    if objective == "expected_reward":
        return -p * (1.0 - p) * (rewards[:, 1] - rewards[:, 0])
    return p - _sigmoid((rewards[:, 1] - rewards[:, 0]) / temperature)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """σ(x) without overflow for large |x| (the logits of a model far from its start)."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def per_record_gradients(
    shared: Mapping[str, np.ndarray],
    user_vectors: np.ndarray,
    items: np.ndarray,
    genres: np.ndarray,
    rewards: np.ndarray,
    *,
    objective: str,
    temperature: float,
    item_scale: float = 1.0,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The factors of each record's gradient and its L2 norm over all shared parameters.

    Returns ``(factors, norms)``: ``factors`` holds per-record ``r`` (dℓ/dz), ``h`` (hidden
    activations), ``da`` (dℓ/d pre-activation), ``x`` (the MLP input), ``de`` (dℓ/d item row, in
    the ``1/item_scale`` units) and ``dgp`` (dℓ/d genre projection output), from which every
    per-record gradient is an outer product."""
    f64 = np.float64
    gw, gb = np.asarray(shared[GENRE_WEIGHT], f64), np.asarray(shared[GENRE_BIAS], f64)
    hw, hb = np.asarray(shared[HIDDEN_WEIGHT], f64), np.asarray(shared[HIDDEN_BIAS], f64)
    ow, ob = np.asarray(shared[OUT_WEIGHT], f64), np.asarray(shared[OUT_BIAS], f64)
    g = np.asarray(genres, f64)
    u = np.asarray(user_vectors, f64)
    e = np.asarray(shared[ITEM_EMBEDDING], f64)[items]
    gp = g @ gw.T + gb
    x = np.concatenate([u, e, gp], axis=1)
    a = x @ hw.T + hb
    h = np.maximum(a, 0.0)
    z = h @ ow[0] + ob[0]
    r = _dloss_dz(z, np.asarray(rewards, f64), objective, temperature)
    da = (r[:, None] * ow[0][None, :]) * (a > 0)
    dx = da @ hw
    du = u.shape[1]  # the user embedding's gradient dx[:, :du] is personal: never released
    de = dx[:, du : du + e.shape[1]] * float(item_scale)
    dgp = dx[:, du + e.shape[1] :]
    sq = lambda m: np.einsum("ij,ij->i", m, m)  # noqa: E731
    norms2 = (
        r * r  # out bias
        + r * r * sq(h)  # out weight
        + sq(da) * (sq(x) + 1.0)  # hidden weight and bias
        + sq(de)  # item row
        + sq(dgp) * (sq(g) + 1.0)  # genre projection weight and bias
    )
    return {"r": r, "h": h, "da": da, "x": x, "de": de, "dgp": dgp, "g": g}, np.sqrt(norms2)


def clipped_gradient_sum(
    shared: Mapping[str, np.ndarray],
    user_vectors: np.ndarray,
    items: np.ndarray,
    genres: np.ndarray,
    rewards: np.ndarray,
    *,
    max_grad_norm: float,
    objective: str,
    temperature: float,
    item_scale: float = 1.0,
) -> ClippedSum:
    """``Σ_i clip_C(∇ℓ_i)`` over the given records (already the Poisson sample), every shared
    parameter at full shape (rows of items nobody in the sample rated are exactly zero; the caller
    releases them all, so the released shape says nothing about the data)."""
    num_items, item_dim = np.shape(shared[ITEM_EMBEDDING])
    out = {k: np.zeros(np.shape(shared[k]), dtype=np.float64) for k in (ITEM_EMBEDDING, *DENSE_NAMES)}
    if len(items) == 0:
        return ClippedSum(out, 0, 0)
    f, norms = per_record_gradients(
        shared, user_vectors, items, genres, rewards, objective=objective, temperature=temperature, item_scale=item_scale
    )
    c = np.minimum(1.0, float(max_grad_norm) / np.maximum(norms, 1e-30))
    cr, cda, cdgp = c * f["r"], c[:, None] * f["da"], c[:, None] * f["dgp"]
    out[OUT_BIAS][0] = cr.sum()
    out[OUT_WEIGHT][0] = cr @ f["h"]
    out[HIDDEN_WEIGHT] = cda.T @ f["x"]
    out[HIDDEN_BIAS] = cda.sum(axis=0)
    np.add.at(out[ITEM_EMBEDDING], np.asarray(items), c[:, None] * f["de"])
    out[GENRE_WEIGHT] = cdgp.T @ f["g"]
    out[GENRE_BIAS] = cdgp.sum(axis=0)
    assert out[ITEM_EMBEDDING].shape == (num_items, item_dim)
    return ClippedSum(out, int(len(items)), int((norms > max_grad_norm).sum()))


def gradient_sum_fit(client: Any, shared: Mapping[str, np.ndarray], config: Any, rng: np.random.Generator) -> Any:
    """A :class:`~.task.MovieLensClient`'s fit under ``GradientSumSettings``
    (:mod:`fedrlhf_secure.privacy.distributed_dpsgd`): the released delta is ``-Σ_i clip_C(∇ℓ_i)``
    over all the client's records at ``(shared, u_0)`` (see the module docstring), every item row
    marked touched (the released shape does not depend on which items the user rated), and the
    report says one step at sample rate 1. The prediction embedding is then refitted locally,
    without noise, to the received model, as under local DP-SGD (with ``privacy.steps_per_round``
    > 1 only at the round's last step, ``settings.fit_personal``); it is not part of the release."""
    from ...privacy.dpsgd import DPSGDReport
    from ..base import FitResult
    from .feedback import KeyedHumanNoise
    from .train import private_shaped_rewards

    settings = config.dp_sgd
    task = client.task
    n = len(client.train)
    idx = np.arange(n)
    data = client._dp_data
    rewards = private_shaped_rewards(data, idx, client.feedback_profiles, KeyedHumanNoise(client._human_key, config.round).draws(0, n))
    public_users = task.initial_user_rows(client.users)  # seeded from the public run seed: no data in it
    users = public_users[np.searchsorted(client.users, client.train.user)] if n else public_users[:0]
    result = clipped_gradient_sum(
        shared,
        users,
        np.asarray(client.train.item, dtype=np.int64),
        data.genres.numpy() if n else np.zeros((0, task.dims.num_genres)),
        rewards if n else np.zeros((0, 2)),
        max_grad_norm=settings.max_grad_norm,
        objective=task.settings.objective,
        temperature=task.settings.temperature,
    )
    delta = {k: (-v).astype(np.float32) for k, v in result.gradient.items()}
    if n and getattr(settings, "fit_personal", True):  # several steps per round: only the last one (the evaluated model's)
        client._user_rows = client._fit_prediction_embedding(shared, rng)
    touched = np.ones(task.dims.num_items, dtype=bool)
    report = DPSGDReport(1, 1.0, float(settings.noise_multiplier), float(settings.max_grad_norm))
    return FitResult(delta, n, {ITEM_EMBEDDING: touched}, metrics={"clipped": float(result.clipped)}, dp_sgd=report)
