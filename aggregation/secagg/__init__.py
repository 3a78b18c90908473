"""Secure aggregation by pairwise masking: SecAgg (Bonawitz et al., CCS 2017) and SecAgg+ (Bell et al., CCS 2020).

The server learns ``sum_k w_k x_k`` and ``sum_k w_k`` over the surviving clients (up to the
quantisation of :mod:`.quantize`) and which clients survived, never an individual update, while
clients may drop at any stage as long as at least ``t`` remain. See SECURITY.md §6 for
the threat model and docs/masking.md for how k, t and the consistency quorum follow from the
stated colluder and dropout fractions (:mod:`.params`).

Distributed DP hook: :meth:`SecAggAggregator.client` takes ``integer_noise`` (int64, one entry per
coordinate, in the quantised units of :attr:`SecAggAggregator.quantizer` — ``scale`` units per unit
of ``w * x``), added after quantisation and before masking, so only the noisy sum is ever
unmasked; the headroom check covers it (``noise_bound`` reserves room for it in the config).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..base import AggregationAborted, Aggregator, Capabilities, ClientHalf, RoundContext, ServerHalf, register
from .client import SecAggClient
from .config import SecAggConfig
from .crypto import Identities
from .params import ParameterError, SecAggParameters, secagg_parameters
from .quantize import HeadroomError, Quantizer
from .server import SecAggServer

__all__ = [
    "HeadroomError",
    "Identities",
    "ParameterError",
    "Quantizer",
    "SecAggAggregator",
    "SecAggClient",
    "SecAggConfig",
    "SecAggParameters",
    "SecAggServer",
    "secagg_parameters",
]


class SecAggAggregator(Aggregator):
    """Builds the SecAgg halves for each round of a run of at most ``max_clients`` clients.

    ``identities`` is the run's identity registry: every client's Ed25519 public key (known to all
    parties before round 0) and the private keys of the clients this process hosts. There is no
    unsigned mode: without it a server could substitute a neighbour's keys (Bonawitz et al. 2017, §6).
    """

    kind = "secagg"

    def __init__(self, config: SecAggConfig, max_clients: int, identities: Identities) -> None:
        if identities is None:
            raise ValueError("secagg needs the run's identity registry (Identities.generate in process, `fedrlhf keys secagg` deployed)")
        self.config = config
        self.quantizer: Quantizer = config.quantizer(max_clients)
        """The fixed-point encoding: DP code calibrates discrete noise in units of ``1 / quantizer.scale``."""
        if max_clients >= 2:
            config.parameters(max_clients)  # a config that cannot meet its bounds fails before any round
        self.identities = identities
        self.capabilities = Capabilities(server_reads_result=True, integer_scale=float(self.quantizer.scale))

    def parameters(self, ctx: RoundContext) -> SecAggParameters:
        """k, t and the consistency quorum of this round (raises :class:`ParameterError` if its n cannot hold the bounds)."""
        if len(ctx.participants) < 2:
            raise AggregationAborted(f"secure aggregation needs at least 2 participants, round {ctx.round} has {len(ctx.participants)}")
        return self.config.parameters(len(ctx.participants))

    def degree(self, ctx: RoundContext) -> int:
        return self.parameters(ctx).k

    def threshold(self, ctx: RoundContext) -> int:
        return self.parameters(ctx).t

    def server(self, ctx: RoundContext) -> ServerHalf:
        self._check_size(ctx)
        p = self.parameters(ctx)
        return SecAggServer(ctx, self.quantizer, p.k, p.t, self.identities.public_only(), quorum=p.quorum)

    def client(
        self,
        ctx: RoundContext,
        client_id: int,
        vector: np.ndarray,
        weight: float,
        *,
        integer_noise: np.ndarray | None = None,
    ) -> ClientHalf:
        """A client half holding ``[q, u]`` = the quantised ``w * x`` (+ ``integer_noise``) and weight units."""
        self._check_size(ctx)
        p = self.parameters(ctx)
        ids = self.identities.for_client(client_id)
        return SecAggClient(ctx, client_id, vector, weight, self.quantizer, p.k, p.t, ids, integer_noise, quorum=p.quorum)

    def _check_size(self, ctx: RoundContext) -> None:
        if len(ctx.participants) > self.quantizer.max_clients:
            raise HeadroomError(
                f"round {ctx.round} has {len(ctx.participants)} participants but the headroom was planned for {self.quantizer.max_clients}"
            )


def build(config: SecAggConfig, client_ids: Sequence[int], seed: int) -> SecAggAggregator:
    """Registry factory for a run in one process: headroom planned for every client of the run, and one
    identity registry generated and registered for all of them before round 0 (deployments load
    theirs: :func:`fedrlhf_secure.federation.aggregators.node_aggregator`)."""
    return SecAggAggregator(config, len(client_ids), Identities.generate(client_ids))


register("secagg", SecAggConfig, build)
