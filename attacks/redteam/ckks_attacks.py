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

The attack goes through the real node: setup, fit, the mask round's SecAgg+ stages (``agg``
requests; the host's participants mask and encrypt), a ``finish`` request carrying the forged
aggregate instead of the honest one, then the ``release`` request, and reads the victim's
update from the released model.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from aggregation import wire
from aggregation.base import AggregationAborted, ProtocolError, RoundContext
from aggregation.ckks.protocol import AGGREGATE, _frame
from fedrlhf_secure.federation.messages import FitInstruction

from . import node
from .harness import Target, kind_of, score
from .report import AttackResult

VICTIM = 0
CLAIM = "A CKKS client decrypts only the agreed sum of at least the minimum number of honest clients, never one update or a chosen subset."


def _blobs(frame: bytes) -> list[bytes]:
    f = wire.decode(frame)
    raw, lengths = f.tensors["ciphertexts"].tobytes(), f.tensors["lengths"].tolist()
    out, pos = [], 0
    for n in lengths:
        out.append(raw[pos : pos + n])
        pos += n
    return out


def _sum(server: Any, frames: list[bytes]) -> list[bytes]:
    """The homomorphic sum of the chosen update ciphertexts, under the server half's key-less context."""
    from aggregation.ckks import codec

    acc = None
    for f in frames:
        chunks = codec.load_chunks(_blobs(f), server._context, server.config, server.length)
        if acc is None:
            acc = chunks
        else:
            for a, c in zip(acc, chunks, strict=True):
                a.add_(c)
    return [c.serialize() for c in acc or []]


def _run_to_updates(host, server, ctx: RoundContext, replies, local: dict[int, Any]) -> tuple[dict[int, bytes], bytes | None]:
    """Run the round honestly (the mask round's SecAgg+ stages through the node's ``agg`` requests,
    the colluders' halves locally) and keep each client's ``ckks/update`` frame and the honest
    aggregate, which is not delivered."""
    updates: dict[int, bytes] = {}
    aggregate = None
    pending = list(replies)
    for _ in range(32):
        out: list[tuple[int, bytes]] = []
        for c, f in pending:
            if kind_of(f) == "ckks/update":
                updates[c] = f
            out += server.receive(c, f)
        if not out and not server.done:
            out += server.close_stage()
        if not out:
            break
        to_node: dict[int, list[bytes]] = {}
        pending = []
        for c, f in out:
            if kind_of(f) == "ckks/aggregate":
                aggregate = f
            elif c in local:
                pending += [(c, r) for r in local[c].receive(f)]
            else:
                to_node.setdefault(c, []).append(f)
        if to_node:
            ans = node.ask(host, "agg", {"round": ctx.round}, to_node)
            if not ans.accepted:
                raise ProtocolError(f"node refused a mask-round message: {ans.error}")
            pending += [(c, m) for c, ms in sorted(ans.message.messages.items()) for m in ms]
        if aggregate is not None:
            break
    return updates, aggregate


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
        local = {c: agg.client(ctx, c, np.zeros(target.dim), 0.0) for c in bad}
        for c in bad:
            replies += [(c, f) for f in local[c].receive(opening[c])]
        try:
            updates, honest_aggregate = _run_to_updates(host, server, ctx, replies, local)
        except (ProtocolError, AggregationAborted) as exc:
            return {"stage": "mask round", "refusal": str(exc)}
        if VICTIM not in updates or honest_aggregate is None:
            return {"stage": "mask round", "refusal": f"the round gave {len(updates)} updates and no aggregate"}
        # the forged aggregate: the victim's ciphertext (+ the colluders' zeros), no unmask (the server
        # knows no client's mask), claiming every participant contributed
        summed = [updates[c] for c in [VICTIM, *bad]]
        unmask = np.zeros_like(wire.decode(honest_aggregate).tensors["unmask"])
        forged = _frame(AGGREGATE, ctx, server.key_id, _sum(server, summed), tensors={"unmask": unmask}, contributors=ids)
        fin = node.ask(host, "finish", {"round": 0}, {c: [forged] for c in honest})
        if not fin.accepted:
            return {"stage": "finish", "refusal": fin.error, "summed": len(summed)}
        rel = node.ask(host, "release", {})
        if not rel.accepted:
            return {"stage": "release", "refusal": rel.error, "summed": len(summed)}
        model = rel.message.arrays.get("v")
        recovered = None if model is None else (np.asarray(model, np.float64) - initial["v"]) / config.federation.server_lr
        truth, _ = agg.inputs[(0, VICTIM)]
        ev = score(recovered, truth)
        ev.update(summed_ciphertexts=len(summed), claimed_contributors=len(ids), finish_header=dict(fin.message.header))
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
