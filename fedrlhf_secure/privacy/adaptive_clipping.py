"""Adaptive quantile clipping for client-level DP (Andrew, Thakkar, McMahan & Ramaswamy, NeurIPS 2021,
"Differentially private learning with adaptive clipping", Alg. 1 and §3).

A fixed clip norm C has to be guessed before training: too small and every update is shortened
(bias), too large and the noise z·C swamps the signal. Andrew et al. let C follow a target
quantile γ of the clients' update norms. Each client also releases one bit
``b_k = 1[‖Δ_k‖ ≤ C]``; the server estimates the clipped fraction ``b̄`` from the noised sum of
the bits and moves C geometrically (their Eq. 3):

    C ← C · exp(−η_C · (b̄ − γ))

so C shrinks while more than a γ share of the clients fit under it and grows otherwise.

**How the bit leaves the client here** (never in plaintext, :class:`~fedrlhf_secure.federation.
participant.PlaintextPolicy`): as one more coordinate of the vector the client already clips,
noises and hands to the secure aggregator (:class:`~fedrlhf_secure.federation.update.UpdateCodec`
``count_slot``). The coordinate carries ``α·(b − ½)`` with ``α = z_Δ·C/σ_b``. The augmented vector
``[clip_C(Δ), α(b − ½)]`` has L2 norm at most

    C_aug = sqrt(C² + α²/4) = C · z_Δ / z

and every coordinate gets the same noise std ``z·C_aug = z_Δ·C`` (the update's noise), which on the
count coordinate is ``z_Δ·C/α = σ_b`` in bit units. So the pair (update at multiplier z_Δ, count at
std σ_b) *is* the plain DP-FedAvg Gaussian mechanism at multiplier z on a vector clipped to C_aug,
and it costs exactly what z alone did. That is the paper's Theorem 1 accounting,

    z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2),

(the bit has sensitivity ½ after centring, so its multiplier is 2σ_b; under replace-one both
sensitivities double and the relation is unchanged). The ledger therefore records z, the
clip C_aug and the split (z_Δ, σ_b, C) in its entry's params; the Skellam integer path sizes its
noise for C_aug unchanged, the discrete shares then covering the count coordinate too.

**Post-processing**: b̄ is clamped to [0, 1], so ``C_t`` stays within
``[C_0·e^{−η(1−γ)t}, C_0·e^{ηγt}]`` (the masking headroom is checked at the upper end). C_t is a
function of the released noised counts alone; the server broadcasts that short history in each fit
request and every participant host recomputes C_t from it (and refuses a history that rewrites
what it was told before), so the C that sizes a client's noise is never a number the server
simply dictates. Under CKKS only the clients read the aggregate; this module is refused there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

MAX_HISTORY = 10_000
"""More released counts than any run has rounds: a longer history from a peer is refused."""


@dataclass(frozen=True)
class AdaptiveClipConfig:
    """``privacy.adaptive_clip``: γ (``target_quantile``), η_C (``lr``) and σ_b (``count_noise``, the
    std of the noise on the sum of the clipped-count bits; the paper uses about (clients per round)/20)."""

    target_quantile: float = 0.5
    lr: float = 0.2
    count_noise: float = 10.0

    def __post_init__(self) -> None:
        for key, value in (("target_quantile", self.target_quantile), ("lr", self.lr), ("count_noise", self.count_noise)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"privacy.adaptive_clip.{key} must be a finite number, got {value!r}")
        if not 0 < self.target_quantile < 1:
            raise ValueError(f"privacy.adaptive_clip.target_quantile must be in (0, 1), got {self.target_quantile}")
        if not self.lr > 0:
            raise ValueError(f"privacy.adaptive_clip.lr must be > 0, got {self.lr}")
        if not self.count_noise > 0:
            raise ValueError(f"privacy.adaptive_clip.count_noise must be > 0, got {self.count_noise}")


def update_noise_multiplier(z: float, count_noise: float) -> float:
    """Andrew et al. 2021, Theorem 1: ``z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2)``, the update's multiplier that
    makes (update, count) cost what z alone does. Needs ``2σ_b > z``."""
    if not z > 0:
        raise ValueError(f"adaptive clipping needs a positive noise multiplier, got z={z}")
    rest = z**-2 - (2.0 * count_noise) ** -2
    if not rest > 0:
        raise ValueError(
            f"privacy.adaptive_clip.count_noise={count_noise:g} is too small for the noise multiplier z={z:.4g}: "
            f"the count alone would spend the budget (needs count_noise > z/2 = {z / 2:.4g}; the paper uses about "
            "(clients per round)/20)"
        )
    return rest**-0.5


@dataclass(frozen=True)
class CountRelease:
    """One round's released (noised) sum of the centred, scaled bits and how many clients it sums."""

    round: int
    total: float
    contributors: int

    def to_list(self) -> list[float | int]:
        return [self.round, self.total, self.contributors]

    @classmethod
    def parse(cls, raw: object) -> CountRelease:
        """From a peer's ``[round, total, contributors]`` (bounded, typed, finite)."""
        if not isinstance(raw, (list, tuple)) or len(raw) != 3:
            raise ValueError(f"a released count must be [round, total, contributors], got {raw!r:.80}")
        rnd, total, n = raw
        if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0:
            raise ValueError(f"a released count's round must be a non-negative integer, got {rnd!r}")
        if isinstance(total, bool) or not isinstance(total, (int, float)) or not math.isfinite(total):
            raise ValueError(f"a released count's total must be a finite number, got {total!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"a released count's contributors must be a positive integer, got {n!r}")
        return cls(int(rnd), float(total), int(n))


class ClipSchedule:
    """C_t as a pure function of C_0 and the released counts (server and every host compute the same)."""

    def __init__(self, initial: float, config: AdaptiveClipConfig, z: float) -> None:
        if not initial > 0:
            raise ValueError(f"the initial clip norm must be > 0, got {initial}")
        self.initial = float(initial)
        self.config = config
        self.z = float(z)
        self.z_update = update_noise_multiplier(self.z, config.count_noise)
        self.releases: list[CountRelease] = []

    # ------------------------------------------------------------------ the mechanism's numbers
    def count_scale(self, clip: float) -> float:
        """α = z_Δ·C/σ_b: the bit's scale in the vector, so the shared noise z_Δ·C is σ_b on it."""
        return self.z_update * clip / self.config.count_noise

    def augmented_clip(self, clip: float) -> float:
        """C_aug = C·z_Δ/z = sqrt(C² + α²/4): the norm bound of [clip_C(Δ), α(b − ½)]."""
        return clip * self.z_update / self.z

    def max_clip(self, rounds: int) -> float:
        """The largest C_t any run of ``rounds`` rounds can reach (b̄ clamped to 0 every round)."""
        return self.initial * math.exp(self.config.lr * self.config.target_quantile * max(0, int(rounds)))

    def bit_coordinate(self, norm: float, clip: float) -> float:
        """``α(b − ½)`` for an update of L2 norm ``norm`` (b = 1 when it fits under ``clip``)."""
        return self.count_scale(clip) * ((1.0 if norm <= clip else 0.0) - 0.5)

    def fraction(self, release: CountRelease, clip: float) -> float:
        """b̄ from a released sum: ``total/(α·m) + ½``, clamped to [0, 1] (post-processing)."""
        raw = release.total / (self.count_scale(clip) * release.contributors) + 0.5
        return min(1.0, max(0.0, raw))

    def step(self, clip: float, fraction: float) -> float:
        """Andrew et al. Eq. 3: ``C·exp(−η(b̄ − γ))``."""
        return clip * math.exp(-self.config.lr * (fraction - self.config.target_quantile))

    # ------------------------------------------------------------------ the trajectory
    def clip_for(self, round: int) -> float:
        """C for ``round``: C_0 moved by every released count of an earlier round, in order."""
        clip = self.initial
        for rel in self.releases:
            if rel.round >= round:
                break
            clip = self.step(clip, self.fraction(rel, clip))
        return clip

    def observe(self, release: CountRelease) -> None:
        """Append one round's released count (rounds strictly increasing)."""
        if self.releases and release.round <= self.releases[-1].round:
            raise ValueError(f"released count for round {release.round} after round {self.releases[-1].round}")
        if len(self.releases) >= MAX_HISTORY:
            raise ValueError(f"more than {MAX_HISTORY} released counts")
        self.releases.append(release)

    def adopt(self, history: Sequence[CountRelease], before: int) -> None:
        """Take the server's history of released counts for rounds before ``before``. What this holder
        was told earlier must be a prefix of it: a server cannot rewrite a count it already sent
        (and thereby the C of a round whose noise was sized with it)."""
        history = list(history)
        if len(history) > MAX_HISTORY:
            raise ValueError(f"more than {MAX_HISTORY} released counts")
        for i, rel in enumerate(history):
            if rel.round >= before:
                raise ValueError(f"released count for round {rel.round} sent before round {before} ran")
            if i and rel.round <= history[i - 1].round:
                raise ValueError("released counts are not in increasing round order")
        known = [r for r in self.releases if r.round < before]
        if history[: len(known)] != known:
            raise ValueError("the released-count history differs from what this participant was told before")
        self.releases = history

    def history(self) -> list[list[float | int]]:
        return [r.to_list() for r in self.releases]

    def load(self, raw: Sequence[object]) -> None:
        """Restore from :meth:`history` (a checkpoint)."""
        self.releases = []
        for item in raw:
            self.observe(CountRelease.parse(item))
