"""Secure aggregation by pairwise masking: SecAgg (Bonawitz et al., CCS 2017) and SecAgg+ (Bell et al., CCS 2020).

The server learns ``sum_k w_k x_k`` and ``sum_k w_k`` over the surviving clients (up to the
quantisation of :mod:`.quantize`) and which clients survived, never an individual update, while
clients may drop at any stage as long as at least ``t`` remain. See SECURITY.md §6 for
the threat model.

Distributed DP hook: :meth:`SecAggAggregator.client` takes ``integer_noise`` (int64, one entry per
coordinate, in the quantised units of :attr:`SecAggAggregator.quantizer` — ``scale`` units per unit
of ``w * x``), added after quantisation and before masking, so only the noisy sum is ever
unmasked; the headroom check covers it (``noise_bound`` reserves room for it in the config).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..base import Aggregator, Capabilities, ClientHalf, RoundContext, ServerHalf, register
from .client import SecAggClient
from .config import SecAggConfig
from .crypto import Identities
from .quantize import HeadroomError, Quantizer
from .server import SecAggServer

__all__ = ["HeadroomError", "Identities", "Quantizer", "SecAggAggregator", "SecAggClient", "SecAggConfig", "SecAggServer"]


class SecAggAggregator(Aggregator):
    """Builds the SecAgg halves for each round of a run of at most ``max_clients`` clients."""

    kind = "secagg"

    def __init__(self, config: SecAggConfig, max_clients: int, identities: Identities | None = None) -> None:
        self.config = config
        self.quantizer: Quantizer = config.quantizer(max_clients)
        """The fixed-point encoding: DP code calibrates discrete noise in units of ``1 / quantizer.scale``."""
        if config.signatures and identities is None:
            raise ValueError("signatures: true needs identity keys (identity_dir, or Identities.generate for a simulation)")
        self.identities = identities if config.signatures else None
        self.capabilities = Capabilities(server_reads_result=True, integer_scale=float(self.quantizer.scale))

    def degree(self, ctx: RoundContext) -> int:
        return self.config.degree(len(ctx.participants))

    def threshold(self, ctx: RoundContext) -> int:
        return self.config.shamir_threshold(len(ctx.participants))

    def server(self, ctx: RoundContext) -> ServerHalf:
        self._check_size(ctx)
        ids = self.identities.public_only() if self.identities else None
        return SecAggServer(ctx, self.quantizer, self.degree(ctx), self.threshold(ctx), ids)

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
        ids = self.identities.for_client(client_id) if self.identities else None
        return SecAggClient(ctx, client_id, vector, weight, self.quantizer, self.degree(ctx), self.threshold(ctx), ids, integer_noise)

    def _check_size(self, ctx: RoundContext) -> None:
        if len(ctx.participants) > self.quantizer.max_clients:
            raise HeadroomError(
                f"round {ctx.round} has {len(ctx.participants)} participants but the headroom was planned for {self.quantizer.max_clients}"
            )


def build(config: SecAggConfig, client_ids: Sequence[int], seed: int) -> SecAggAggregator:
    """Registry factory: headroom planned for every client of the run; identities loaded or generated."""
    identities = None
    if config.signatures:
        if config.identity_dir:
            identities = Identities.load(Path(config.identity_dir), client_ids)
        else:
            identities = Identities.generate(client_ids)
    return SecAggAggregator(config, len(client_ids), identities)


register("secagg", SecAggConfig, build)
