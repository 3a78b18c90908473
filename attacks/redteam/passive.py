"""The honest-but-curious server: it follows the protocol and reads the victim's frames.

Under ``plain`` the server reads every update by design (SECURITY.md §2); under ``secagg`` it sees
a masked vector (``[q, u]`` plus one-time pads), under ``ckks`` ciphertexts under a key it does not
hold. The attack decodes every frame the victim sent in an honest round the way the server can:
an update frame through a server half of one participant, a masked input through the quantiser.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from aggregation.base import AggregationAborted, ProtocolError, RoundContext

from .harness import Target, drive_world, kind_of, release_halves, score
from .report import AttackResult

VICTIM = 0
CLAIM = "A server that follows the protocol learns no individual update (plain aggregation offers no such protection)."
CLIENTS = 12


def _guesses(aggregator, ctx: RoundContext, frames: list[bytes]) -> list[tuple[str, np.ndarray]]:
    out = []
    for f in frames:
        solo = RoundContext(ctx.session_id, ctx.round, (VICTIM,), ctx.dim)
        try:
            server = aggregator.server(solo)
            server.receive(VICTIM, f)
            server.close_stage()
            res = server.result()
            if res is not None and res.total_weight > 0:
                out.append((kind_of(f), np.asarray(res.average, np.float64)))
        except (ProtocolError, AggregationAborted, ValueError):
            pass
        q = getattr(aggregator, "quantizer", None)
        if q is not None and kind_of(f) == "secagg/masked-input":
            from aggregation.secagg.messages import MaskedInput

            y = MaskedInput.decode(f, ctx, VICTIM, q.dtype).vector
            ws, w = q.decode(y.copy())
            if w > 0:
                out.append((kind_of(f) + " ÷ its weight slot", np.asarray(ws, np.float64) / w))
    return out


def passive_server(target: Target) -> AttackResult:
    name = "passive-server"
    config = target.protocol_config()
    n = min(target.n, CLIENTS)
    ids = tuple(range(n))
    aggregator = target.aggregator(config, ids)
    aggregator.prepare(1)
    ctx = RoundContext(os.urandom(16), 0, ids, target.dim)
    halves = release_halves(config, aggregator, ctx, ids, target.task(n))
    server = aggregator.server(ctx)
    log = drive_world(server, halves, server.start())
    truth, _ = aggregator.inputs[(0, VICTIM)]
    frames = [f for c, f in log.sent if c == VICTIM]
    tried: dict[str, Any] = {}
    for what, guess in _guesses(aggregator, ctx, frames):
        tried[what] = score(guess, truth)
        if tried[what]["recovered"]:
            ev = {"clients": n, "frames": [kind_of(f) for f in frames], "read": tried}
            summary = f"the server reads the victim's update from its {what}, max error {tried[what]['max_abs_error']:.1e}"
            return AttackResult(name, "recovered", summary, CLAIM, ev)
    ev = {"clients": n, "frames": [kind_of(f) for f in frames], "read": tried}
    return AttackResult(name, "refused", f"none of the victim's {len(frames)} frames decodes to its update", CLAIM, ev)
