"""Plain FedAvg (McMahan et al., 2017): clients send ``(w_k, x_k)`` in the clear.

The baseline every secure mode is measured against; the server sees each individual update,
which is exactly what the audits' server-view attack exploits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from . import wire
from .base import (
    AggregateResult,
    AggregationAborted,
    Aggregator,
    Capabilities,
    ClientHalf,
    ProtocolError,
    RoundContext,
    ServerHalf,
    check_single_upload,
    refuse_integer_noise,
    register,
)

REQUEST = "plain/request"
UPDATE = "plain/update"


@dataclass(frozen=True)
class PlainConfig:
    """No parameters: plain FedAvg."""


class PlainServer(ServerHalf):
    def __init__(self, ctx: RoundContext) -> None:
        self.ctx = ctx
        self._sum = np.zeros(ctx.dim, dtype=np.float64)
        self._weight = 0.0
        self._got: list[int] = []
        self._closed = False

    def start(self) -> list[tuple[int, bytes]]:
        msg = wire.encode(wire.Frame(REQUEST, {"round": self.ctx.round, "session": self.ctx.session_id.hex()}))
        return [(cid, msg) for cid in self.ctx.participants]

    def receive(self, sender: int, data: bytes) -> list[tuple[int, bytes]]:
        check_single_upload(self.ctx, self._got, self._closed, sender)
        try:
            frame = wire.decode(data, expect=UPDATE)
            if frame.field("round", int) != self.ctx.round:
                raise ProtocolError(f"update from {sender} is for round {frame.header['round']}, not {self.ctx.round}")
            if frame.field("session", str) != self.ctx.session_id.hex():
                raise ProtocolError(f"update from {sender} belongs to another session (a replay from another run)")
            weight = float(frame.field("weight", (int, float)))
            vec = frame.tensor("vector", np.float32, (self.ctx.dim,))
        except wire.WireError as exc:
            raise ProtocolError(str(exc)) from exc
        if not np.isfinite(weight) or weight < 0 or not np.all(np.isfinite(vec)):
            raise ProtocolError(f"update from {sender} has a non-finite or negative value")
        self._sum += weight * vec.astype(np.float64)
        self._weight += weight
        self._got.append(sender)
        if len(self._got) == len(self.ctx.participants):
            self._closed = True
        return []

    def close_stage(self) -> list[tuple[int, bytes]]:
        if not self._got:  # every participant dropped: an empty sum is no aggregate (weight 0)
            raise AggregationAborted(f"round {self.ctx.round}: no client's update arrived")
        self._closed = True
        return []

    @property
    def done(self) -> bool:
        return self._closed

    def result(self) -> AggregateResult | None:
        if not self._closed:
            return None
        return AggregateResult(self._sum, self._weight, tuple(sorted(self._got)))


class PlainClient(ClientHalf):
    def __init__(self, ctx: RoundContext, vector: np.ndarray, weight: float) -> None:
        self.ctx = ctx
        self._vector = np.ascontiguousarray(vector, dtype=np.float32)
        self._weight = float(weight)
        self._sent = False

    def receive(self, data: bytes) -> list[bytes]:
        try:
            frame = wire.decode(data, expect=REQUEST)
            rnd = frame.field("round", int)
            session = frame.field("session", str)
        except wire.WireError as exc:
            raise ProtocolError(str(exc)) from exc
        if rnd != self.ctx.round or session != self.ctx.session_id.hex() or self._sent:
            raise ProtocolError(f"unexpected request for round {rnd} (session {session[:16]})")
        self._sent = True
        header = {"round": rnd, "session": session, "weight": self._weight}
        return [wire.encode(wire.Frame(UPDATE, header, {"vector": self._vector}))]

    @property
    def done(self) -> bool:
        return self._sent


class PlainAggregator(Aggregator):
    kind = "plain"
    capabilities = Capabilities(server_reads_result=True)

    def server(self, ctx: RoundContext) -> ServerHalf:
        return PlainServer(ctx)

    def client(self, ctx: RoundContext, client_id: int, vector: np.ndarray, weight: float, *, integer_noise=None) -> ClientHalf:
        refuse_integer_noise(self, integer_noise)
        return PlainClient(ctx, vector, weight)


def _factory(config: PlainConfig, client_ids: Sequence[int], seed: int) -> PlainAggregator:
    return PlainAggregator()


register("plain", PlainConfig, _factory)
