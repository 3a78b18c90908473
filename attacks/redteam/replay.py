"""Replay: frames of an earlier round (same session) or of an earlier run (another session).

A network attacker or the server records a round and plays its frames into a later one: stale
key directories, share bundles, unmask requests or CKKS aggregates to the clients, and stale keys,
shares, masked inputs or ciphertexts to the server. Every frame is bound to its session and round
(SecAgg also in the AES-GCM associated data of the shares; CKKS in the header, next to the key id),
so each must be refused. The probe offers each stale frame to a copy of the party that is about to
receive the genuine one, so the round itself runs on unchanged.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

from aggregation.base import ProtocolError, RoundContext

from .harness import Target, drive_world, kind_of, release_halves
from .report import AttackResult

CLAIM = "A frame recorded in an earlier round or run is refused by every client and by the server."
REPLAY_CLIENTS = 12
"""Round size of the probe: binding to session and round does not depend on n."""


def _record(target: Target, config, aggregator, ctx: RoundContext) -> tuple[dict[tuple[int, str], bytes], dict[tuple[int, str], bytes]]:
    """One honest round; the frames each client received and sent, by (client, kind)."""
    task = target.task(len(ctx.participants))
    halves = release_halves(config, aggregator, ctx, ctx.participants, task)
    down: dict[tuple[int, str], bytes] = {}

    def tap(cid: int, data: bytes) -> bytes:
        down.setdefault((cid, kind_of(data)), data)
        return data

    server = aggregator.server(ctx)
    log = drive_world(server, halves, server.start(), down=tap)
    up = {}
    for cid, data in log.sent:
        up.setdefault((cid, kind_of(data)), data)
    return down, up


def _copy(obj: Any) -> Any:
    """A copy to probe, or the party itself when it cannot be copied (TenSEAL contexts): every
    decoder checks the binding before it changes state, so a refused probe changes nothing, and an
    accepted one is recorded whatever it does to the round afterwards."""
    try:
        return copy.deepcopy(obj)
    except (TypeError, ValueError):
        return obj


def _probe(target: Target, config, aggregator, ctx: RoundContext, stale_down: Mapping, stale_up: Mapping) -> dict[str, Any]:
    task = target.task(len(ctx.participants))
    halves = release_halves(config, aggregator, ctx, ctx.participants, task)
    server = aggregator.server(ctx)
    accepted: list[str] = []
    offered = [0]

    def down(cid: int, data: bytes) -> bytes:
        stale = stale_down.get((cid, kind_of(data)))
        if stale is not None and cid in halves:
            offered[0] += 1
            try:
                _copy(halves[cid]).receive(stale)
                accepted.append(f"client {cid} accepted a stale {kind_of(stale)}")
            except ProtocolError:
                pass
        return data

    def up(cid: int, data: bytes) -> bytes:
        stale = stale_up.get((cid, kind_of(data)))
        if stale is not None:
            offered[0] += 1
            try:
                _copy(server).receive(cid, stale)
                accepted.append(f"server accepted client {cid}'s stale {kind_of(stale)}")
            except ProtocolError:
                pass
        return data

    log = drive_world(server, halves, server.start(), down=down, up=up)
    completed = log.result is not None or server.done
    return {"offered": offered[0], "accepted": len(accepted), "examples": accepted[:5], "round_completed": completed}


def replay(target: Target) -> AttackResult:
    name = f"{target.kind}-replay"
    n = min(target.n, REPLAY_CLIENTS)
    config = target.protocol_config()
    ids = tuple(range(n))
    aggregator = target.aggregator(config, ids)
    aggregator.prepare(2)
    session = os.urandom(16)
    down0, up0 = _record(target, config, aggregator, RoundContext(session, 0, ids, target.dim))
    if not down0:
        return AttackResult(name, "error", "the honest round produced no frames to replay", CLAIM)
    other_session = _probe(target, config, aggregator, RoundContext(os.urandom(16), 0, ids, target.dim), down0, up0)
    later_round = _probe(target, config, aggregator, RoundContext(session, 1, ids, target.dim), down0, up0)
    ev = {"clients": n, "earlier_round_same_session": later_round, "same_round_earlier_session": other_session}
    accepted = later_round["accepted"] + other_session["accepted"]
    offered = later_round["offered"] + other_session["offered"]
    if accepted:
        example = (later_round["examples"] + other_session["examples"])[0]
        return AttackResult(name, "recovered", f"{accepted} of {offered} stale frames accepted (e.g. {example})", CLAIM, ev)
    return AttackResult(name, "refused", f"all {offered} stale frames refused (earlier round and earlier session)", CLAIM, ev)
