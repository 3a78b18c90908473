"""The ``privacy:`` section of a run config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .adaptive_clipping import AdaptiveClipConfig


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy settings for a run.

    ``mode``:
      * ``none``   - no DP.
      * ``record`` - record-level DP-SGD inside each client's local training (Opacus).
      * ``client`` - client-level DP-FedAvg (McMahan et al. 2018): clip each update to
        ``clip_norm`` and add Gaussian noise calibrated over all rounds.

    ``epsilon``/``delta`` is the budget for the whole run (all rounds), per client; ``delta`` must
    also be below 1/n (n = records of the largest client for ``record``, clients for ``client``),
    which :func:`fedrlhf_secure.privacy.factory.build_client_privacy` checks once n is known.

    ``accountant``: ``prv`` (tighter) or ``rdp`` for the Gaussian mechanisms; the integer masking
    mode always uses the Skellam RDP accountant. ``noise_multiplier`` overrides calibration (the
    budget is then only enforced, not targeted). ``batch_size``: expected DP-SGD batch size
    (record level). ``clip_norm``/``noise``/``survivor_fraction``: client level (see
    :mod:`fedrlhf_secure.privacy.client_level`); each client adds noise for
    ``ceil(survivor_fraction × selected)`` survivors, so a round may lose the rest to dropouts.
    """

    mode: Literal["none", "record", "client"] = "none"
    epsilon: float | None = None
    delta: float = 1e-5
    accountant: Literal["prv", "rdp"] = "prv"
    max_grad_norm: float = 1.0
    clip_norm: float = 1.0
    noise: Literal["central", "distributed"] = "distributed"
    noise_multiplier: float | None = None
    batch_size: int = 16
    survivor_fraction: float = 1.0
    record_noise: Literal["local", "distributed", "central"] = "local"
    """Record level only: ``local`` = Opacus DP-SGD inside each client (:mod:`.record_level`);
    ``distributed`` / ``central`` = one DP-SGD step per round on the sum of all clients' per-record
    clipped gradients, noised by the clients' shares or by the server
    (:mod:`.distributed_dpsgd`; needs ``federation.weighting: uniform``)."""
    per_sample: Literal["direct", "functorch", "opacus"] = "direct"
    """Record level, local noise: the engine of the per-sample clipping and noise. ``direct``
    (:mod:`.per_sample` fed by per-sample gradients from one batched backward pass, the fastest on
    the MovieLens policy), ``functorch`` (the same engine fed by ``torch.func.vmap(grad)``) or
    ``opacus`` (the reference both are checked against; the noise bit for bit). Same mechanism,
    same steps, same ledger. Tasks with only Opacus (IMDb) ignore it."""
    steps_per_round: int = 1
    """``record_noise`` distributed/central only: DP-SGD steps per round, each its own (secure)
    aggregation, applied by the server optimizer before the next step's gradients are taken; ε is
    calibrated and accounted over ``federation.rounds × steps_per_round`` releases
    (:func:`.distributed_dpsgd.releases_per_run`)."""
    audit_canaries: int | Literal["auto"] = 0
    """White-box gradient (Dirac) canaries inserted into this run for ``fedrlhf audit RUN``
    (:mod:`fedrlhf_secure.privacy.canaries`): client level after clipping, record level inside each
    DP-SGD step. 0: none; ``auto``: the smallest m whose ceiling exceeds ``epsilon``
    (:func:`.audit_power.canaries_needed`; 20,000 at ε = 8, δ = 1e-5)."""
    audit_coordinates: Literal["block", "model"] = "block"
    """Where the canaries sit: ``block`` (a dedicated block of released coordinates the model never
    reads, clipped and noised like every other coordinate; no data gradient confounds them) or
    ``model`` (the model's own plain-mean coordinates; client level only)."""
    adaptive_clip: AdaptiveClipConfig | None = None
    """Client level: let the clip norm follow a quantile of the update norms (Andrew et al. 2021;
    :mod:`.adaptive_clipping`), starting from ``clip_norm``. None: a fixed ``clip_norm``."""

    def __post_init__(self) -> None:
        if self.mode != "none" and self.epsilon is None and self.noise_multiplier is None:
            raise ValueError(f"privacy.mode={self.mode} needs privacy.epsilon (the budget) or privacy.noise_multiplier")
        if self.epsilon is not None and not self.epsilon > 0:
            raise ValueError(f"privacy.epsilon must be > 0, got {self.epsilon}")
        if not 0 < self.delta < 1:
            raise ValueError(f"privacy.delta must be in (0, 1), got {self.delta}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"privacy.max_grad_norm must be > 0, got {self.max_grad_norm}")
        if not self.clip_norm > 0:
            raise ValueError(f"privacy.clip_norm must be > 0, got {self.clip_norm}")
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            raise ValueError(f"privacy.noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not 0 < self.survivor_fraction <= 1:
            raise ValueError(f"privacy.survivor_fraction must be in (0, 1], got {self.survivor_fraction}")
        if self.audit_canaries != "auto" and self.audit_canaries < 0:
            raise ValueError(f"privacy.audit_canaries must be >= 0 or 'auto', got {self.audit_canaries}")
        if self.audit_canaries == "auto" and self.epsilon is None:
            raise ValueError("privacy.audit_canaries: auto sizes m from privacy.epsilon, which is not set")
        if self.audit_canaries and self.mode == "record" and self.audit_coordinates != "block":
            raise ValueError(
                "privacy.audit_coordinates: model is client level only; record-level canaries go in the audit block "
                "(privacy.audit_coordinates: block)"
            )
        if self.adaptive_clip is not None and self.mode != "client":
            raise ValueError(f"privacy.adaptive_clip is for client-level DP (privacy.mode: client), not mode {self.mode!r}")
        if self.adaptive_clip is not None and self.audit_canaries:
            raise ValueError(
                "privacy.adaptive_clip with privacy.audit_canaries: the canaries are sized for a fixed clip_norm; audit a fixed-clip run"
            )
        if self.batch_size < 1:
            raise ValueError(f"privacy.batch_size must be >= 1, got {self.batch_size}")
        if isinstance(self.steps_per_round, bool) or not isinstance(self.steps_per_round, int) or self.steps_per_round < 1:
            raise ValueError(f"privacy.steps_per_round must be an integer >= 1, got {self.steps_per_round!r}")
        if self.steps_per_round > 1 and (self.mode != "record" or self.record_noise == "local"):
            raise ValueError(
                f"privacy.steps_per_round: {self.steps_per_round} takes several aggregated DP-SGD steps per round, which only "
                "record-level DP with privacy.record_noise: distributed or central has; set it to 1"
            )

    def audit_canary_count(self) -> int:
        """m, with ``auto`` resolved from the claim (0 without DP or without canaries)."""
        if self.mode == "none" or not self.audit_canaries:
            return 0
        if self.audit_canaries != "auto":
            return int(self.audit_canaries)
        from .audit_power import CANARY_LADDER, canaries_needed

        assert self.epsilon is not None
        return canaries_needed(float(self.epsilon), self.delta) or CANARY_LADDER[-1]
