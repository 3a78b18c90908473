"""In-process driver for the sans-IO halves: delivers messages in order, simulates dropouts.

The same loop runs the embedded federation, the tests and the benchmarks. A dropout is modelled
as a client that stops answering after it has received a given number of messages from the
server (``drop_after[cid] = 0`` drops it before it says anything, ``1`` after its first reply
stage, ...). When no message is in flight and the server is not done, the stage deadline has
passed and the driver calls :meth:`ServerHalf.close_stage`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from .base import AggregateResult, AggregationAborted, Aggregator, ClientHalf, RoundContext

TranscriptHook = Callable[[int, int, bytes], None]
"""``hook(src, dst, data)``; the server is -1."""

SERVER_ID = -1


@dataclass
class RoundStats:
    bytes_up: dict[int, int] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)
    client_seconds: dict[int, float] = field(default_factory=dict)
    server_seconds: float = 0.0
    stages: int = 0


@dataclass
class RoundOutcome:
    server_result: AggregateResult | None
    client_results: dict[int, AggregateResult | None]
    stats: RoundStats

    def readable_result(self) -> AggregateResult:
        """The aggregate as the party that can read it sees it (server, else any finished client)."""
        if self.server_result is not None:
            return self.server_result
        for res in self.client_results.values():
            if res is not None:
                return res
        raise AggregationAborted("no party could read the aggregate")


def run_round(
    aggregator: Aggregator,
    ctx: RoundContext,
    inputs: Mapping[int, tuple[np.ndarray, float]],
    *,
    drop_after: Mapping[int, int] | None = None,
    hook: TranscriptHook | None = None,
) -> RoundOutcome:
    """Run one aggregation round over ``inputs[cid] = (vector, weight)`` for ``ctx.participants``."""
    drop_after = dict(drop_after or {})
    stats = RoundStats()
    for cid in ctx.participants:
        stats.bytes_up[cid] = 0
        stats.bytes_down[cid] = 0
        stats.client_seconds[cid] = 0.0

    clients: dict[int, ClientHalf] = {}
    for cid in ctx.participants:
        vec, weight = inputs[cid]
        t0 = time.perf_counter()
        clients[cid] = aggregator.client(ctx, cid, vec, weight)
        stats.client_seconds[cid] += time.perf_counter() - t0
    received: dict[int, int] = {cid: 0 for cid in ctx.participants}

    t0 = time.perf_counter()
    server = aggregator.server(ctx)
    to_clients: deque[tuple[int, bytes]] = deque(server.start())
    stats.server_seconds += time.perf_counter() - t0
    to_server: deque[tuple[int, bytes]] = deque()

    while not server.done:
        if to_server:  # hand each reply to the server as it arrives: memory stays O(one update)
            src, data = to_server.popleft()
            stats.bytes_up[src] += len(data)
            if hook:
                hook(src, SERVER_ID, data)
            t0 = time.perf_counter()
            to_clients.extend(server.receive(src, data))
            stats.server_seconds += time.perf_counter() - t0
            continue
        if to_clients:
            dst, data = to_clients.popleft()
            if dst not in clients:
                raise AggregationAborted(f"server addressed unknown client {dst}")
            if dst in drop_after and received[dst] >= drop_after[dst]:
                continue  # dropped: the message is lost, the client never answers again
            received[dst] += 1
            stats.bytes_down[dst] += len(data)
            if hook:
                hook(SERVER_ID, dst, data)
            t0 = time.perf_counter()
            replies = clients[dst].receive(data)
            stats.client_seconds[dst] += time.perf_counter() - t0
            for reply in replies:
                to_server.append((dst, reply))
            continue
        t0 = time.perf_counter()
        out = server.close_stage()
        stats.server_seconds += time.perf_counter() - t0
        stats.stages += 1
        if not out and not server.done:
            raise AggregationAborted("protocol stalled: no message in flight and the server is not done")
        to_clients.extend(out)

    # Deliver whatever the server sent in its final step (e.g. CKKS aggregate to the clients).
    while to_clients:
        dst, data = to_clients.popleft()
        if dst in drop_after and received[dst] >= drop_after[dst]:
            continue
        received[dst] += 1
        stats.bytes_down[dst] += len(data)
        if hook:
            hook(SERVER_ID, dst, data)
        t0 = time.perf_counter()
        clients[dst].receive(data)
        stats.client_seconds[dst] += time.perf_counter() - t0

    return RoundOutcome(
        server_result=server.result(),
        client_results={cid: c.result() for cid, c in clients.items() if c.done},
        stats=stats,
    )
