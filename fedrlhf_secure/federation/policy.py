"""A participant's own policy: the least protection it accepts, whatever the server asks for.

Why: the server sends the run config in its setup frame, and a node used to build its aggregator
and privacy plan from it. A lying server (SECURITY.md's threat model) then simply asked for
``aggregation: {kind: plain}`` and read every update, or for ``secagg`` with ``threshold: 1``, a
larger ε, or no DP at all. A :class:`NodePolicy` belongs to the participant: in process it is
derived from the config the user runs (:meth:`NodePolicy.from_config`: a user's own config is its
policy); on a deployment node it is a YAML file the node's operator writes and hands to
``fedrlhf deploy client-host --policy`` (``fedrlhf deploy local`` writes one per node). The server
can neither see nor change it. :meth:`NodePolicy.admit_setup` checks the server's config once at
set-up and :meth:`NodePolicy.admit_round` checks each round's size (``neighbours``/``threshold:
auto`` depend on it); a config that asks for less is refused with an error naming the field, the
server's value and the policy's.

SecAgg bounds. A round's graph degree ``k``, Shamir threshold ``t`` and consistency quorum come from
the config's stated colluder fraction γ, dropout fraction δ and failure exponent σ
(:func:`aggregation.secagg.params.secagg_parameters`: SecAgg+ of Bell et al., CCS 2020, with the
consistency round of Bonawitz et al., CCS 2017). A lying server could state γ = 0 (quorum n/2 + 1,
small t) or σ = 1; so the node requires the config to claim at least its own γ and σ, and recomputes
each round's privacy failure probability under its own γ for the (k, t) the round will use:

* ``aggregation.colluders >= secagg.colluders`` and ``aggregation.failure_exponent >= secagg.failure_exponent``;
* P[an honest client has >= t colluding neighbours among k] <= 2^-σ at the round's n;
* ``k >= min_neighbours`` and ``t >= min_threshold`` where the operator sets absolute floors.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from aggregation.errors import AggregationConfigError
from aggregation.secagg.params import DEFAULT_COLLUDERS, DEFAULT_FAILURE_EXPONENT, evaluate

from ..config import RunConfig, read_yaml
from ..configtypes import ConfigError, from_mapping, to_mapping
from ..errors import RunFailed

__all__ = ["CKKSPolicy", "DPPolicy", "NodePolicy", "PolicyRefused", "SecAggPolicy", "load_policy", "write_policy"]

logger = logging.getLogger(__name__)

KINDS = ("plain", "secagg", "ckks")
DP_MODES = ("none", "record", "client")


class PolicyRefused(RunFailed):
    """The server asked for less protection than this participant's policy allows; the message names
    the config field, the server's value and the policy's."""


@dataclass(frozen=True)
class SecAggPolicy:
    """The weakest masking a participant takes part in (see the module docstring for the bounds)."""

    colluders: float = DEFAULT_COLLUDERS
    """γ this node must be safe against: the config must state at least this colluder fraction."""
    failure_exponent: int = DEFAULT_FAILURE_EXPONENT
    """σ: the config must state at least this, and each round's privacy failure must be <= 2^-σ under γ."""
    min_neighbours: int | None = None
    """An absolute floor on the graph degree k (capped at n - 1), beyond what the bounds require."""
    min_threshold: int | None = None
    """An absolute floor on the Shamir threshold t (capped at k), beyond what the bounds require."""

    def __post_init__(self) -> None:
        if not 0 <= self.colluders < 1:
            raise ValueError(f"secagg.colluders must be a fraction in [0, 1), got {self.colluders}")
        if self.failure_exponent < 1:
            raise ValueError(f"secagg.failure_exponent must be >= 1, got {self.failure_exponent}")
        if self.min_neighbours is not None and self.min_neighbours < 1:
            raise ValueError(f"secagg.min_neighbours must be >= 1, got {self.min_neighbours}")
        if self.min_threshold is not None and self.min_threshold < 1:
            raise ValueError(f"secagg.min_threshold must be >= 1, got {self.min_threshold}")


@dataclass(frozen=True)
class CKKSPolicy:
    min_contributors: int = 2
    """A decrypted aggregate of fewer distinct clients is never used (it would be one client's update)."""

    def __post_init__(self) -> None:
        if self.min_contributors < 1:
            raise ValueError(f"ckks.min_contributors must be >= 1, got {self.min_contributors}")


@dataclass(frozen=True)
class DPPolicy:
    required: bool = False
    """Refuse ``privacy.mode: none``."""
    modes: tuple[Literal["none", "record", "client"], ...] = DP_MODES
    """The DP modes this participant accepts."""
    max_epsilon: float | None = None
    """Largest per-client budget ε for the run; None: no cap (a config without ε is then accepted)."""
    max_delta: float = 1e-5
    record_noise: tuple[Literal["local", "distributed", "central"], ...] = ("local", "distributed")
    """Where record-level noise may be added (``privacy.record_noise``, :mod:`..privacy.distributed_dpsgd`):
    ``central`` trusts the server with every client's un-noised clipped gradient sum, so a node's
    default policy does not accept it."""

    def __post_init__(self) -> None:
        if not self.record_noise:
            raise ValueError("privacy.record_noise must name at least one placement")
        if not self.modes:
            raise ValueError("privacy.modes must name at least one mode")
        if self.required and set(self.modes) == {"none"}:
            raise ValueError("privacy.required is true but privacy.modes allows only 'none'")
        if self.max_epsilon is not None and not (math.isfinite(self.max_epsilon) and self.max_epsilon > 0):
            raise ValueError(f"privacy.max_epsilon must be a positive number, got {self.max_epsilon}")
        if not 0 < self.max_delta < 1:
            raise ValueError(f"privacy.max_delta must be in (0, 1), got {self.max_delta}")


@dataclass(frozen=True)
class NodePolicy:
    """What one participant accepts; see the module docstring. Where its trusted identities come
    from is the node's own too: the SecAgg identity registry in its ``--keys-dir``, never a path the
    server names."""

    aggregation: tuple[Literal["plain", "secagg", "ckks"], ...] = ("secagg", "ckks")
    secagg: SecAggPolicy = field(default_factory=SecAggPolicy)
    ckks: CKKSPolicy = field(default_factory=CKKSPolicy)
    privacy: DPPolicy = field(default_factory=DPPolicy)
    min_contributors: int = 2
    """Least number of clients in a round (and of ``federation.min_clients``) this participant joins."""
    source: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.aggregation:
            raise ValueError("aggregation must name at least one allowed kind")
        if self.min_contributors < 1:
            raise ValueError(f"min_contributors must be >= 1, got {self.min_contributors}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: RunConfig) -> NodePolicy:
        """The policy of a user running ``config`` themselves: exactly what it asks for, no less."""
        params = config.aggregation.params
        secagg = SecAggPolicy()
        if config.aggregation.kind == "secagg":
            secagg = SecAggPolicy(colluders=params.colluders, failure_exponent=params.failure_exponent)
        p = config.privacy
        privacy = DPPolicy(
            required=p.mode != "none",
            modes=(p.mode,),
            max_epsilon=p.epsilon,
            max_delta=p.delta,
            record_noise=(p.record_noise,) if p.mode == "record" else DPPolicy.record_noise,
        )
        m = config.federation.min_clients
        return cls(
            aggregation=(config.aggregation.kind,),
            secagg=secagg,
            ckks=CKKSPolicy(min_contributors=m),
            privacy=privacy,
            min_contributors=m,
            source=f"{config.source or '<config>'} (the user's own config)",
        )

    def to_mapping(self) -> dict[str, Any]:
        out = to_mapping(self)
        out.pop("source", None)
        return out

    # ------------------------------------------------------------------ checks
    def _refuse(self, field_name: str, asked: Any, policy_field: str, required: Any, why: str = "") -> PolicyRefused:
        where = f" ({self.source})" if self.source else ""
        return PolicyRefused(
            f"node policy refuses {field_name}: the server asks for {asked!r}, this node's policy{where} "
            f"requires {policy_field} = {required!r}{f' ({why})' if why else ''}"
        )

    def admit_setup(self, config: RunConfig, num_clients: int, *, embedded: bool = False) -> RunConfig:
        """Check the server's ``config`` for a run of ``num_clients``; return it with the node's own
        choices (identity registry) in place of the server's, or raise :class:`PolicyRefused`."""
        kind = config.aggregation.kind
        if kind not in self.aggregation:
            raise self._refuse("aggregation.kind", kind, "aggregation", list(self.aggregation))
        if config.federation.min_clients < self.min_contributors:
            raise self._refuse("federation.min_clients", config.federation.min_clients, "min_contributors", self.min_contributors)
        self._admit_privacy(config)
        if kind == "secagg":
            self._admit_secagg(config, num_clients)
        return config

    def admit_round(self, config: RunConfig, participants: int) -> None:
        """Check one round's size: a round of fewer clients than ``min_contributors`` is refused, and
        SecAgg's ``auto`` degree and threshold, which shrink with it, are checked again."""
        if participants < self.min_contributors:
            raise self._refuse("round participants", participants, "min_contributors", self.min_contributors)
        if config.aggregation.kind == "secagg":
            self._admit_secagg(config, participants)

    def _admit_privacy(self, config: RunConfig) -> None:
        p, dp = config.privacy, self.privacy
        if dp.required and p.mode == "none":
            raise self._refuse("privacy.mode", p.mode, "privacy.required", True, "DP must be on")
        if p.mode not in dp.modes:
            raise self._refuse("privacy.mode", p.mode, "privacy.modes", list(dp.modes))
        if p.mode == "none":
            return
        if p.mode == "record" and p.record_noise not in dp.record_noise:
            raise self._refuse("privacy.record_noise", p.record_noise, "privacy.record_noise", list(dp.record_noise))
        if dp.max_epsilon is not None:
            if p.epsilon is None:
                raise self._refuse("privacy.epsilon", None, "privacy.max_epsilon", dp.max_epsilon, "a run without a budget has no cap")
            if p.epsilon > dp.max_epsilon:
                raise self._refuse("privacy.epsilon", p.epsilon, "privacy.max_epsilon", dp.max_epsilon)
        if p.delta > dp.max_delta:
            raise self._refuse("privacy.delta", p.delta, "privacy.max_delta", dp.max_delta)

    def _admit_secagg(self, config: RunConfig, n: int) -> None:
        params, sp = config.aggregation.params, self.secagg
        if params.colluders < sp.colluders:
            raise self._refuse("aggregation.colluders", params.colluders, "secagg.colluders", sp.colluders)
        if params.failure_exponent < sp.failure_exponent:
            raise self._refuse("aggregation.failure_exponent", params.failure_exponent, "secagg.failure_exponent", sp.failure_exponent)
        if n < 2:
            return
        try:
            k, t = params.degree(n), params.shamir_threshold(n)
        except AggregationConfigError as exc:
            raise PolicyRefused(
                f"node policy refuses aggregation.neighbours/threshold: the server asks for k={params.neighbours}, "
                f"t={params.threshold}, which do not hold at n={n}: {exc}"
            ) from None
        mine = evaluate(n, k, t, colluders=sp.colluders, dropouts=params.dropouts, failure_exponent=sp.failure_exponent)
        if mine.log2_privacy_failure > -sp.failure_exponent:
            raise self._refuse(
                "aggregation.threshold",
                t,
                "secagg.colluders",
                sp.colluders,
                f"at n={n}, k={k}: P[an honest client has >= t colluding neighbours] = 2^{mine.log2_privacy_failure:.1f} "
                f"> 2^-{sp.failure_exponent} with {mine.colluders} colluders",
            )
        if sp.min_neighbours is not None and k < min(n - 1, sp.min_neighbours):
            raise self._refuse("aggregation.neighbours", k, "secagg.min_neighbours", sp.min_neighbours, f"at n={n}")
        if sp.min_threshold is not None and t < min(k, sp.min_threshold):
            raise self._refuse("aggregation.threshold", t, "secagg.min_threshold", sp.min_threshold, f"at n={n}, k={k}")


def load_policy(path: str | Path) -> NodePolicy:
    """Read and validate a node policy file (YAML); any problem is a :class:`ConfigError` naming the key."""
    path = Path(path)
    raw = read_yaml(path, "node policy")
    if not isinstance(raw, dict):
        raise ConfigError("a node policy must be a YAML mapping", source=str(path))
    if "source" in raw:
        raise ConfigError("unknown key source", source=str(path))
    policy = from_mapping(NodePolicy, raw, source=str(path))
    return dataclasses.replace(policy, source=str(path))


def write_policy(policy: NodePolicy, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(policy.to_mapping(), sort_keys=False), encoding="utf-8")
    return path
