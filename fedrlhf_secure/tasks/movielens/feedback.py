"""Simulated human feedback and the FedRLHF reward shaping ``R_k = R0 + λ_k · H_k`` (arXiv 2412.15538, Eq. 2).

The MovieLens environment (paper §5.1): the state is a (user, item) pair, the action is a
prediction ``a ∈ {0: low, 1: high}``, and

* the intrinsic reward ``R0(s, a) = +1`` if ``a`` agrees with the label (rating ≥ 4) else ``-1``;
* the human feedback ``H_k(s, a) = (2a - 1) · h_k(s)``: the simulated user endorses "high" by
  ``h_k(s)`` and "low" by ``-h_k(s)``, where ``h_k(s)`` averages two noisy signals of the user's
  own rating of *this* record:

  - direct feedback ``(rating - 3) / 2 + ε``, ``ε ~ N(0, σ_k²)`` drawn afresh each time (a human is
    not consistent), ``σ_k`` client-specific;
  - pairwise comparisons within the batch: records are paired at random and the user says which
    of the two items they preferred (``+1`` for the winner, ``-1`` for the loser, ``0`` on a tie),
    flipping the answer with probability ``p_flip``.

* ``λ_k`` is client-specific (how much this user's feedback counts), drawn per client from a
  seeded range.

The paper's public code looks feedback up in a dict keyed by ids it never stores, so the lookup
always misses and ``H_k = 0``. Here the signal is computed from the ratings of the very records in
the batch (callers pass the rating array aligned with the batch; there is no id lookup to get
wrong), and tests check both alignment and that ``λ_k`` changes the update.

Under record-level DP one record's reward must depend on that record alone, or replacing another
record would move this record's per-sample gradient and break DP-SGD's sensitivity bound. Two
things would couple records, and :func:`private_human_signal` removes both:

* the pairwise term compares two records of a batch: each record is instead compared with a public
  reference rating (the scale midpoint, 3);
* the human's noise, drawn from one generator in batch order, would depend on which other records
  were sampled before it (and on how far an earlier, noiseless phase had advanced the generator).
  Instead each record's draws are a function of (a client's secret key, round, epoch, the record's
  position in the client's data) alone (:class:`KeyedHumanNoise`, ChaCha20 via
  :func:`fedrlhf_secure.privacy.randomness.keyed_uniforms`). The key is secret (``os.urandom``), not
  the public run seed, so nobody can regenerate the human's noise from ``config.yaml``. Under
  replace-one a record keeps its position, so its draws are the same in both neighbouring data
  sets. A record sampled twice in one epoch (Poisson sampling) hears the same answer both times.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HIGH_RATING = 4.0
"""Label threshold: a rating is "high" when ``rating >= 4`` (also for half-star data: 3.5 is low)."""
REFERENCE_RATING = 3.0


def labels(ratings: np.ndarray) -> np.ndarray:
    return (np.asarray(ratings) >= HIGH_RATING).astype(np.float32)


@dataclass(frozen=True)
class FeedbackProfile:
    """One simulated human: how much their feedback counts (``lam``) and how noisy it is."""

    lam: float
    noise_std: float
    flip_prob: float


def draw_profiles(
    client_ids: list[int],
    seed: int,
    lambda_range: tuple[float, float],
    noise_range: tuple[float, float],
    flip_prob: float,
) -> dict[int, FeedbackProfile]:
    """Client-specific ``λ_k`` and ``σ_k``, uniform in the configured ranges, seeded per client so a
    client's profile does not depend on which other clients exist."""
    out = {}
    for cid in client_ids:
        rng = np.random.default_rng([seed, 0xFEED, cid])
        lam = float(rng.uniform(*lambda_range)) if lambda_range[1] > lambda_range[0] else float(lambda_range[0])
        sd = float(rng.uniform(*noise_range)) if noise_range[1] > noise_range[0] else float(noise_range[0])
        out[cid] = FeedbackProfile(lam, sd, flip_prob)
    return out


def direct_feedback(ratings: np.ndarray, noise_std: np.ndarray | float, rng: np.random.Generator) -> np.ndarray:
    """``(rating - 3) / 2`` plus the human's noise: in [-1, 1] before noise for 1..5 stars."""
    ratings = np.asarray(ratings, dtype=np.float32)
    signal = (ratings - REFERENCE_RATING) / 2.0
    noise = rng.standard_normal(ratings.shape) * np.asarray(noise_std, dtype=np.float64)
    return (signal + noise).astype(np.float32)


def pairwise_feedback(ratings: np.ndarray, groups: np.ndarray, flip_prob: np.ndarray | float, rng: np.random.Generator) -> np.ndarray:
    """Random pairs of records *of the same user* (``groups``) within the batch; ``+1`` to the
    preferred item, ``-1`` to the other, ``0`` on ties and for a user's odd record out; each answer
    flipped with probability ``flip_prob`` (that user's)."""
    ratings = np.asarray(ratings, dtype=np.float32)
    n = len(ratings)
    out = np.zeros(n, dtype=np.float32)
    if n < 2:
        return out
    groups = np.asarray(groups)
    order = np.lexsort((rng.random(n), groups))  # shuffle within each user
    g = groups[order]
    group_start = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    rank = np.arange(n) - np.repeat(group_start, np.diff(np.r_[group_start, n]))
    first = np.flatnonzero((rank % 2 == 0) & (np.r_[g[1:] == g[:-1], False]))
    a, b = order[first], order[first + 1]
    pref = np.sign(ratings[a] - ratings[b])
    flips = rng.random(len(a)) < np.broadcast_to(np.asarray(flip_prob, dtype=np.float64), (n,))[a]
    pref = np.where(flips, -pref, pref)
    out[a] = pref
    out[b] = -pref
    return out


def human_signal(
    ratings: np.ndarray,
    groups: np.ndarray,
    noise_std: np.ndarray | float,
    flip_prob: np.ndarray | float,
    rng: np.random.Generator,
) -> np.ndarray:
    """``h_k(s)`` for each record of a batch, from the batch's own ratings (aligned, one per record),
    without DP: direct feedback and pairwise comparisons within the batch.

    ``groups`` says which records belong to the same user (pairs are formed within a user);
    ``noise_std``/``flip_prob`` are the records' humans' (scalars or one per record)."""
    direct = direct_feedback(ratings, noise_std, rng)
    return 0.5 * (direct + pairwise_feedback(ratings, groups, flip_prob, rng))


def private_human_signal(
    ratings: np.ndarray, noise_std: np.ndarray | float, flip_prob: np.ndarray | float, normal: np.ndarray, uniform: np.ndarray
) -> np.ndarray:
    """``h_k(s)`` under record-level DP: each record's direct feedback plus its own N(0, 1) draw
    ``normal`` scaled by σ_k, and its comparison with the public reference rating 3, flipped when
    its own uniform draw ``uniform`` is below ``p_flip`` (draws aligned with ``ratings``, one per
    record, from :class:`KeyedHumanNoise`)."""
    ratings = np.asarray(ratings, dtype=np.float32)
    direct = (ratings - REFERENCE_RATING) / 2.0 + np.asarray(normal, dtype=np.float64) * np.asarray(noise_std, dtype=np.float64)
    pref = np.sign(ratings - REFERENCE_RATING)
    compare = np.where(np.asarray(uniform) < np.asarray(flip_prob, dtype=np.float64), -pref, pref)
    return (0.5 * (direct + compare)).astype(np.float32)


class KeyedHumanNoise:
    """The simulated humans' randomness under DP, per record: draws keyed by (secret key, round,
    epoch, record position) alone (see the module docstring)."""

    def __init__(self, key: bytes, round: int) -> None:
        self.key = bytes(key)
        self.round = int(round)

    def draws(self, epoch: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(N(0, 1) draw, uniform draw) for each of the ``n`` records of a client, for this round and epoch."""
        from ...privacy.randomness import keyed_uniforms

        u = keyed_uniforms(self.key, b"human-feedback/%d/%d" % (self.round, int(epoch)), 3 * int(n)).reshape(3, int(n))
        normal = np.sqrt(-2.0 * np.log1p(-u[0])) * np.cos(2.0 * np.pi * u[1])  # Box-Muller
        return normal, u[2]


def reward_table(label: np.ndarray, signal: np.ndarray, lam: np.ndarray | float) -> np.ndarray:
    """``R_k(s, a)`` for both actions: an (N, 2) array, column ``a``.

    ``R0(s, a) = ±1`` for agreeing with the label; ``H_k(s, a) = (2a - 1) h_k(s)``."""
    label = np.asarray(label, dtype=np.float32)
    shaped = np.asarray(lam, dtype=np.float32) * signal
    r_high = (2.0 * label - 1.0) + shaped
    r_low = (1.0 - 2.0 * label) - shaped
    return np.stack([r_low, r_high], axis=1).astype(np.float32)
