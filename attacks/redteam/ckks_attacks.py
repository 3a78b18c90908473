"""CKKS as a decryption oracle: the server returns something other than the agreed sum.

Clients share one CKKS secret key and decrypt whatever structurally valid ciphertext the server
returns as "the aggregate"; the node folds it into the model it holds and, over Flower, releases
that model to the server after the last round. So a server with no key and no colluder can:

* **single ciphertext** — return the victim's own update ciphertext, listing every participant as
  a contributor; the released model is then the victim's update;
* **subset** — return the sum of the victim's ciphertext and those of colluding clients that
  uploaded zeros with weight 0 (a contributor count is then met with colluders).

A client must decrypt only an aggregate that provably combines at least the policy's minimum
number of distinct honest clients (e.g. pairwise masks that cancel only in the agreed sum). This
is a chosen-ciphertext setting stronger than IND-CPA-D (Li and Micciancio, Eurocrypt 2021).

The attack goes through the real node: setup, fit (the host's participants encrypt), a ``finish``
request carrying the forged aggregate, then the ``release`` request, and reads the victim's
update from the released model.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from aggregation import wire
from aggregation.base import AggregationAborted, ProtocolError, RoundContext
from fedrlhf_secure.federation.messages import FitInstruction

from . import node
from .harness import Target, kind_of, score
from .report import AttackResult

VICTIM = 0
CLAIM = "A CKKS client decrypts only the agreed sum of at least the minimum number of honest clients, never one update or a chosen subset."


def _forge(target: Target, colluders: int) -> dict[str, Any]:
    config = target.protocol_config()
    ids = list(range(target.n))
    bad = ids[-colluders:] if colluders else []
    honest = [c for c in ids if c not in bad]
    agg = target.aggregator(config, ids)
    agg.prepare(1)
    task = target.task()
    with tempfile.TemporaryDirectory(dir=target.workdir) as tmp:
        host = target.make_host(honest, task, Path(tmp), user_config=config, aggregator=agg)
        ans = node.setup(host, config, ids)
        if not ans.accepted:
            return {"stage": "setup", "refusal": ans.error}
        ctx = RoundContext(node.new_session(), 0, tuple(ids), target.dim)
        server = agg.server(ctx)
        initial = task.initial_shared()
        ans, replies = node.fit(host, ctx, server, honest, FitInstruction(0, 1, config.seed, initial, client_held=True))
        if not ans.accepted:
            return {"stage": "fit", "refusal": ans.error}
        # the colluders' halves: the adversary runs them, uploading nothing (zeros, weight 0)
        opening = dict(agg.server(ctx).start())
        forged_in = [(c, f) for c, f in replies if c == VICTIM]
        for c in bad:
            half = agg.inner.client(ctx, c, np.zeros(target.dim), 0.0)
            forged_in += [(c, f) for f in half.receive(opening[c])]
        # the real server half sums only what the adversary hands it ...
        try:
            out = []
            for c, f in forged_in:
                out += server.receive(c, f)
            out += server.close_stage()
        except (ProtocolError, AggregationAborted) as exc:
            return {"stage": "server", "refusal": str(exc)}
        # ... and the aggregate frame claims every participant contributed
        everyone = []
        for c, f in out:
            if c in honest and kind_of(f) == "ckks/aggregate":
                frame = wire.decode(f)
                f = wire.encode(wire.Frame(frame.kind, {**frame.header, "contributors": ids}, frame.tensors))
            everyone.append((c, f))
        messages: dict[int, list[bytes]] = {}
        for c in honest:
            messages[c] = [f for cc, f in everyone if cc == c] or [f for _, f in everyone[:1]]
        fin = node.ask(host, "finish", {"round": 0}, messages)
        if not fin.accepted:
            return {"stage": "finish", "refusal": fin.error, "summed": len(forged_in)}
        rel = node.ask(host, "release", {})
        if not rel.accepted:
            return {"stage": "release", "refusal": rel.error, "summed": len(forged_in)}
        model = rel.message.arrays.get("v")
        recovered = None if model is None else (np.asarray(model, np.float64) - initial["v"]) / config.federation.server_lr
        truth, _ = agg.inputs[(0, VICTIM)]
        ev = score(recovered, truth)
        ev.update(summed_ciphertexts=len(forged_in), claimed_contributors=len(ids), finish_header=dict(fin.message.header))
        return ev


def _result(name: str, ev: dict[str, Any], what: str) -> AttackResult:
    if ev.get("recovered"):
        summary = f"{what}: the node released the victim's update, max error {ev['max_abs_error']:.1e}"
        return AttackResult(name, "recovered", summary, CLAIM, ev)
    if "refusal" in ev:
        return AttackResult(name, "refused", f"{what}: refused at {ev['stage']}: {ev['refusal'][:90]}", CLAIM, ev)
    return AttackResult(name, "refused", f"{what}: the released model is not the victim's update", CLAIM, ev)


def single_ciphertext(target: Target) -> AttackResult:
    name = "ckks-single-ciphertext"
    if target.kind != "ckks":
        return AttackResult(name, "skipped", f"aggregation.kind is {target.kind}, not ckks", CLAIM)
    return _result(name, _forge(target, 0), "victim's ciphertext returned as the aggregate of all")


SUBSET_COLLUDERS = 2


def subset(target: Target) -> AttackResult:
    name = "ckks-subset-aggregate"
    if target.kind != "ckks":
        return AttackResult(name, "skipped", f"aggregation.kind is {target.kind}, not ckks", CLAIM)
    c = min(SUBSET_COLLUDERS, target.n - 2)
    return _result(name, _forge(target, c), f"victim + {c} zero-uploading colluders summed as the aggregate of all")
