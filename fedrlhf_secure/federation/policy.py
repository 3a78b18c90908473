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

SecAgg bounds (Bonawitz et al., CCS 2017; Bell et al., CCS 2020). For a round of ``n``
participants with masking-graph degree ``k`` and Shamir threshold ``t``:

* ``k >= min_neighbours`` (capped at ``n - 1``: a complete graph is the most a round can have);
* ``t >= min_threshold``; ``auto`` means a strict majority of the neighbourhood, ``t > k / 2``;
* with at most ``c = max_colluders`` clients colluding with the server, ``2t - k > c`` (which
  implies ``t > c``, as ``t <= k``: the colluders' own shares never reach the threshold): a server that tells ``t - c`` honest
  holders of a victim's shares "it survived" and another ``t - c`` "it dropped" needs ``c >= 2t - k``
  colluders to assemble both the mask key and the self-mask seed (the split view of issue 12,
  reproduced at n=10/k=9/t=5 with one colluder). This is the bound without a consistency round;
  a consistency check of the survivor set (Bonawitz et al. 2017, round "ConsistencyCheck")
  relaxes it, and the function that computes (k, t) from colluder/dropout fractions replaces
  these numbers when it lands.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..config import RunConfig
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

    min_neighbours: int | Literal["auto"] = "auto"
    """Least degree k of the masking graph; ``auto`` = the SecAgg+ default 2*ceil(2*log2 n), capped at n-1."""
    min_threshold: int | Literal["auto"] = "auto"
    """Least Shamir threshold t; ``auto`` = a strict majority of the round's neighbourhood (t > k/2)."""
    max_colluders: int = 0
    """Clients that may collude with the server: requires 2t - k > c (hence t > c)."""
    require_signatures: bool = False
    """Refuse a config without ``signatures: true`` (advertised keys signed under the identity registry)."""

    def __post_init__(self) -> None:
        if self.min_neighbours != "auto" and self.min_neighbours < 1:
            raise ValueError(f"secagg.min_neighbours must be >= 1 or 'auto', got {self.min_neighbours}")
        if self.min_threshold != "auto" and self.min_threshold < 1:
            raise ValueError(f"secagg.min_threshold must be >= 1 or 'auto', got {self.min_threshold}")
        if self.max_colluders < 0:
            raise ValueError(f"secagg.max_colluders must be >= 0, got {self.max_colluders}")


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

    def __post_init__(self) -> None:
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
    """What one participant accepts; see the module docstring. ``identity_dir`` is this node's
    identity registry (``<cid>.pub`` of every peer, ``<cid>.key`` of its own clients): the node,
    not the server, chooses where its trusted identities come from."""

    aggregation: tuple[Literal["plain", "secagg", "ckks"], ...] = ("secagg", "ckks")
    secagg: SecAggPolicy = field(default_factory=SecAggPolicy)
    ckks: CKKSPolicy = field(default_factory=CKKSPolicy)
    privacy: DPPolicy = field(default_factory=DPPolicy)
    min_contributors: int = 2
    """Least number of clients in a round (and of ``federation.min_clients``) this participant joins."""
    identity_dir: str | None = None
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
        identity_dir = None
        if config.aggregation.kind == "secagg":
            secagg = SecAggPolicy(
                min_neighbours=params.neighbours,
                min_threshold=params.threshold,
                max_colluders=0,
                require_signatures=bool(params.signatures),
            )
            identity_dir = params.identity_dir
        p = config.privacy
        privacy = DPPolicy(required=p.mode != "none", modes=(p.mode,), max_epsilon=p.epsilon, max_delta=p.delta)
        m = config.federation.min_clients
        return cls(
            aggregation=(config.aggregation.kind,),
            secagg=secagg,
            ckks=CKKSPolicy(min_contributors=m),
            privacy=privacy,
            min_contributors=m,
            identity_dir=identity_dir,
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
            config = self._own_identities(config, embedded)
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
        if dp.max_epsilon is not None:
            if p.epsilon is None:
                raise self._refuse("privacy.epsilon", None, "privacy.max_epsilon", dp.max_epsilon, "a run without a budget has no cap")
            if p.epsilon > dp.max_epsilon:
                raise self._refuse("privacy.epsilon", p.epsilon, "privacy.max_epsilon", dp.max_epsilon)
        if p.delta > dp.max_delta:
            raise self._refuse("privacy.delta", p.delta, "privacy.max_delta", dp.max_delta)

    def _own_identities(self, config: RunConfig, embedded: bool) -> RunConfig:
        params = config.aggregation.params
        if self.secagg.require_signatures and not params.signatures:
            raise self._refuse("aggregation.signatures", False, "secagg.require_signatures", True, "advertised keys must be signed")
        if not params.signatures:
            return config
        if params.identity_dir != self.identity_dir:
            if params.identity_dir is not None:
                logger.warning(
                    "the server's config names identity_dir %r; this node uses its own identity registry %r",
                    params.identity_dir,
                    self.identity_dir,
                )
            params = dataclasses.replace(params, identity_dir=self.identity_dir)
            config = dataclasses.replace(config, aggregation=dataclasses.replace(config.aggregation, params=params))
        if self.identity_dir is None and not embedded:
            raise PolicyRefused(
                "aggregation.signatures: true needs this node's identity registry (identity_dir in its node policy); "
                "identities invented per process cannot be checked across machines"
            )
        return config

    def _admit_secagg(self, config: RunConfig, n: int) -> None:
        params = config.aggregation.params
        if n < 2:
            return
        k, t = params.degree(n), params.shamir_threshold(n)
        sp = self.secagg
        k_min = min(n - 1, 2 * math.ceil(2 * math.log2(n)) if sp.min_neighbours == "auto" else sp.min_neighbours)
        if k < k_min:
            raise self._refuse("aggregation.neighbours", k, "secagg.min_neighbours", sp.min_neighbours, f"at n={n}: at least {k_min}")
        t_min = k // 2 + 1 if sp.min_threshold == "auto" else min(sp.min_threshold, k)
        if t < t_min:
            raise self._refuse("aggregation.threshold", t, "secagg.min_threshold", sp.min_threshold, f"at n={n}, k={k}: at least {t_min}")
        c = sp.max_colluders
        if 2 * t - k <= c:
            raise self._refuse(
                "aggregation.threshold",
                t,
                "secagg.max_colluders",
                c,
                f"at n={n}, k={k}: a split view needs only 2t-k = {2 * t - k} colluders; t must be at least {(k + c) // 2 + 1}",
            )


def load_policy(path: str | Path) -> NodePolicy:
    """Read and validate a node policy file (YAML); any problem is a :class:`ConfigError` naming the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"node policy file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML ({exc})", source=str(path)) from exc
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
