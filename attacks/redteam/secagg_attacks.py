"""Active-server attacks on pairwise masking (SecAgg / SecAgg+), against the real client halves.

Each function plays a lying server (optionally with colluding clients) through one real round of
the configured aggregator and reports whether it rebuilt the victim's individual update:

* :func:`overlap` — one unmask request lists the victim as both survived and dropped, so each
  holder would reveal both of its shares (Bonawitz et al., CCS 2017, §4: the honest client must
  refuse);
* :func:`split_view` — tell ``t − c`` honest holders "the victim survived" and the others "the
  victim dropped"; ``c`` colluding holders answer in both views (the server runs two copies of
  the round from the masked inputs on, each honest client seeing only one). Bonawitz et al.'s
  ConsistencyCheck round and Bell et al.'s (CCS 2020) bounds are what must stop it;
* :func:`key_substitution` — man in the middle on the share-encryption keys: the server replaces
  the victim's neighbours' advertised ``c_pk`` (and the victim's in theirs) with its own, reads
  every share the victim sends and re-encrypts it, so the round completes normally. Signed keys
  under a PKI (Bonawitz et al., §6) must stop it;
* :func:`grinding` — the server tries many session ids and participant lists (the masking graph is
  derived from them) until colluders sit next to the victim, then runs the split view.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import os
from typing import Any

import numpy as np

from aggregation.base import ProtocolError

from .harness import SecAggRun, Target, WorldLog, drive_world, kind_of, recover_from_shares, shares_of
from .report import AttackResult

VICTIM = 0


def _err(ev: dict[str, Any]) -> str:
    return f"max error {ev['max_abs_error']:.1e} (quantisation step {ev['quantisation_step']:.1e})"


def _secagg_only(target: Target, name: str, claim: str) -> AttackResult | None:
    if target.kind != "secagg":
        return AttackResult(name, "skipped", f"aggregation.kind is {target.kind}, not secagg", claim)
    return None


def honest_run(target: Target) -> SecAggRun:
    """One honest round up to the masked inputs at the target's size, shared by the attacks that fork it."""
    if "secagg_run" not in target._cache:
        target._cache["secagg_run"] = SecAggRun(target)
    return target._cache["secagg_run"]


def colluder_bound(target: Target, run: SecAggRun) -> tuple[int, str]:
    """The largest number of colluding *neighbours of the victim* the configuration claims to tolerate.

    A configuration that states a colluder fraction (``colluders`` / ``colluder_fraction`` /
    ``gamma``) or count (``max_colluders`` / ``colluders``) is held to it, and always to t − 1:
    t colluding neighbours hold t shares of both secrets without any split view, which a bounded
    colluder fraction rules out only with high probability over their placement — what the
    ``grinding`` entry attacks. Without a stated bound: SECURITY.md's promise for t-of-k sharing,
    t − 1 colluders."""
    c, source = _stated_bound(target, run)
    if c > run.threshold - 1:
        return run.threshold - 1, f"t − 1 (below {source} = {c}: t colluding neighbours are the grinding entry's case)"
    return c, source


def _stated_bound(target: Target, run: SecAggRun) -> tuple[int, str]:
    params = target.config.aggregation.params
    for name in ("max_colluders", "colluders"):
        v = getattr(params, name, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return min(v, run.degree), f"aggregation.{name}"
    for name in ("colluders", "colluder_fraction", "gamma"):  # a fraction γ: ceil(γ n) clients of the round
        v = getattr(params, name, None)
        if isinstance(v, float):
            return min(math.ceil(v * len(run.participants)), run.degree), f"ceil(aggregation.{name} × n)"
    return run.threshold - 1, "t − 1 (SECURITY.md: safe up to t − 1 colluders)"


# ---------------------------------------------------------------------------------------------
# overlapping survivor / dropout lists
# ---------------------------------------------------------------------------------------------

OVERLAP_CLAIM = "An honest client never reveals both shares of one neighbour (survivor and dropout lists that overlap are refused)."


def overlap(target: Target) -> AttackResult:
    name = "secagg-overlapping-lists"
    skipped = _secagg_only(target, name, OVERLAP_CLAIM)
    if skipped:
        return skipped
    from aggregation.secagg.messages import UnmaskRequest

    if "dropped" not in getattr(UnmaskRequest, "__dataclass_fields__", {}):
        why = "the unmask request names no per-client survivor/dropout lists (each client derives them from one signed set)"
        return AttackResult(name, "skipped", why, OVERLAP_CLAIM)
    run = honest_run(target)
    holders = run.neighbours(VICTIM)
    server, clients = run.fork()
    log = WorldLog()
    pending = run.feed_masked(server, run.masked, log)
    forged = []

    def down(cid: int, data: bytes) -> bytes:
        if cid in holders and kind_of(data) == "secagg/unmask-request":
            req = UnmaskRequest.decode(data, run.ctx, cid)
            both = np.array([VICTIM], dtype=np.int64)
            data = dataclasses.replace(
                req, survivors=np.union1d(req.survivors, both).astype(np.int64), dropped=np.union1d(req.dropped, both).astype(np.int64)
            ).encode(run.ctx, cid)
            forged.append(cid)
        return data

    drive_world(server, clients, pending, down=down, log=log)
    seeds, keys = shares_of(log.sent, run.ctx, VICTIM)
    both = sorted(set(seeds) & set(keys))
    ev = recover_from_shares(run, VICTIM, {h: seeds[h] for h in both}, {h: keys[h] for h in both})
    ev.update(
        holders=len(holders),
        forged_requests=len(forged),
        revealed_both=len(both),
        refusals=len([c for c in forged if c in log.refusals]),
        refusal_example=next((log.refusals[c] for c in forged if c in log.refusals), None),
    )
    if ev["recovered"]:
        summary = f"{len(both)} holders revealed both shares; update rebuilt, {_err(ev)}"
        return AttackResult(name, "recovered", summary, OVERLAP_CLAIM, ev)
    summary = f"{ev['refusals']}/{len(forged)} holders refused; {len(both)} revealed both shares"
    return AttackResult(name, "refused", summary, OVERLAP_CLAIM, ev)


# ---------------------------------------------------------------------------------------------
# split view with c colluders
# ---------------------------------------------------------------------------------------------

SPLIT_CLAIM = (
    "A server that tells different holders different survivor sets, helped by up to c_max colluding clients, "
    "never obtains both secrets of an honest survivor."
)


def split_trial(run: SecAggRun, victim: int, colluders: set[int]) -> dict[str, Any]:
    """One split view: ``colluders`` (neighbours of the victim) answer in both views."""
    nbrs = run.neighbours(victim)
    t = run.threshold
    honest = sorted(nbrs - colluders)
    need = max(0, t - len(colluders))
    group_a, group_b = honest[:need], honest[need:]
    others = [c for c in run.participants if c not in nbrs and c != victim and c not in colluders and c in run.masked]
    server_a, clients = run.fork()
    server_b = copy.deepcopy(run.server)
    colluders_b = {c: copy.deepcopy(clients[c]) for c in colluders}
    log_a, log_b = WorldLog(), WorldLog()
    pending_a = run.feed_masked(server_a, run.masked, log_a)
    pending_b = run.feed_masked(server_b, [c for c in run.masked if c != victim], log_b)
    world_a = {c: clients[c] for c in [victim, *group_a, *others[0::2], *colluders] if c in clients}
    world_b = {**{c: clients[c] for c in [*group_b, *others[1::2]]}, **colluders_b}
    drive_world(server_a, world_a, pending_a, log=log_a)
    drive_world(server_b, world_b, pending_b, log=log_b)
    seeds, _ = shares_of(log_a.sent, run.ctx, victim)
    _, keys = shares_of(log_b.sent, run.ctx, victim)
    ev = recover_from_shares(run, victim, seeds, keys)
    refusals = [m for log, group in ((log_a, group_a), (log_b, group_b)) for c, m in log.refusals.items() if c in group]
    ev.update(
        colluders=len(colluders),
        told_survived=len(group_a),
        told_dropped=len(group_b),
        holder_refusals=len(refusals),
        refusal_example=refusals[0] if refusals else None,
    )
    return ev


def split_view(target: Target) -> AttackResult:
    name = "secagg-split-view"
    skipped = _secagg_only(target, name, SPLIT_CLAIM)
    if skipped:
        return skipped
    run = honest_run(target)
    c_max, source = colluder_bound(target, run)
    nbrs = sorted(run.neighbours(VICTIM))
    trials = {}
    for c in range(0, c_max + 1):
        trials[c] = split_trial(run, VICTIM, set(nbrs[:c]))
    won = [c for c, ev in trials.items() if ev["recovered"]]
    ev = {"n": len(run.participants), "k": run.degree, "t": run.threshold, "c_max": c_max, "c_max_source": source, "trials": trials}
    if won:
        c = won[0]
        return AttackResult(
            name,
            "recovered",
            f"n={ev['n']} k={ev['k']} t={ev['t']}: recovered with c={c} colluders (≤ c_max={c_max}), max error "
            f"{trials[c]['max_abs_error']:.1e}; recovered for {len(won)} of c=0..{c_max}",
            SPLIT_CLAIM,
            ev,
        )
    return AttackResult(name, "refused", f"n={ev['n']} k={ev['k']} t={ev['t']}: refused for every c=0..{c_max}", SPLIT_CLAIM, ev)


# ---------------------------------------------------------------------------------------------
# key substitution (man in the middle on the share keys)
# ---------------------------------------------------------------------------------------------

KEY_CLAIM = (
    "The server cannot substitute the public keys neighbours advertise (keys are authenticated), so it cannot read a client's shares."
)


class _KeyMitm:
    """The server's hooks: fake ``c_pk`` on every victim–neighbour edge, shares decrypted and re-sealed."""

    def __init__(self, victim: int) -> None:
        from aggregation.secagg import crypto

        self.crypto = crypto
        self.victim = victim
        self.real: dict[int, bytes] = {}
        self.fake: dict[int, Any] = {}  # client -> (fake private key, fake public key) the server uses in its place
        self.plain: dict[int, np.ndarray] = {}  # holder -> the victim's share for it, as the server read it
        self.ctx = None

    def _fake(self, cid: int):
        if cid not in self.fake:
            self.fake[cid] = self.crypto.new_x25519()
        return self.fake[cid]

    def down(self, cid: int, data: bytes) -> bytes:
        from aggregation.secagg.messages import KeyDirectory

        if kind_of(data) != "secagg/key-directory":
            return data
        d = KeyDirectory.decode(data, self.ctx, cid)
        ids = [int(i) for i in d.ids]
        c_pks = d.c_pks.copy()
        for row, peer in enumerate(ids):
            if cid == self.victim or peer == self.victim:
                c_pks[row] = np.frombuffer(self._fake(peer)[1], dtype=np.uint8)
        return dataclasses.replace(d, c_pks=c_pks).encode(self.ctx, cid)

    def up(self, cid: int, data: bytes) -> bytes:
        from aggregation.secagg.messages import Keys, Shares

        kind = kind_of(data)
        if kind == "secagg/keys":
            self.real[cid] = Keys.decode(data, self.ctx, cid).c_pk
            return data
        if kind != "secagg/shares":
            return data
        msg = Shares.decode(data, self.ctx, cid)
        cts = msg.ciphertexts.copy()
        c = self.crypto
        for row, peer in enumerate(int(i) for i in msg.ids):
            if self.victim not in (cid, peer) or peer not in self.real or cid not in self.real:
                continue
            ad = c.share_ad(self.ctx.session_id, self.ctx.round, cid, peer)
            sess, rnd = self.ctx.session_id, self.ctx.round
            read_key = c.derive(c.agree(self._fake(peer)[0], self.real[cid], peer=cid), c.SHARE_LABEL, sess, rnd, cid, peer)
            try:
                plain = c.open_sealed(read_key, cts[row].tobytes(), ad, sender=cid)
            except ProtocolError:
                continue
            if cid == self.victim:
                self.plain[peer] = np.frombuffer(plain, dtype=">u8", offset=16).astype(np.uint64)
            seal_key = c.derive(c.agree(self._fake(cid)[0], self.real[peer], peer=peer), c.SHARE_LABEL, sess, rnd, cid, peer)
            cts[row] = np.frombuffer(c.seal(seal_key, plain, ad), dtype=np.uint8)
        return dataclasses.replace(msg, ciphertexts=cts).encode(self.ctx, cid)


def key_substitution(target: Target) -> AttackResult:
    name = "secagg-key-substitution"
    skipped = _secagg_only(target, name, KEY_CLAIM)
    if skipped:
        return skipped
    from aggregation.base import RoundContext
    from aggregation.secagg.messages import SECRET_ELEMENTS

    mitm = _KeyMitm(VICTIM)
    session = os.urandom(16)
    mitm.ctx = RoundContext(session, 0, tuple(range(target.n)), target.dim)
    run = SecAggRun(target, session=session, down=mitm.down, up=mitm.up)
    keys = {h: s[:SECRET_ELEMENTS] for h, s in mitm.plain.items()}
    seeds = {h: s[SECRET_ELEMENTS:] for h, s in mitm.plain.items()}
    ev = recover_from_shares(run, VICTIM, seeds, keys)
    ev.update(
        signatures=bool(getattr(target.config.aggregation.params, "signatures", False)),
        shares_read=len(mitm.plain),
        refusals=len(run.log.refusals),
        refusal_example=run.log.refusals.get(VICTIM) or next(iter(run.log.refusals.values()), None),
    )
    if ev["recovered"]:
        return AttackResult(
            name,
            "recovered",
            f"server read {len(mitm.plain)} of the victim's shares through substituted keys; {_err(ev)}",
            KEY_CLAIM,
            ev,
        )
    summary = f"{ev['refusals']} clients refused the substituted keys; {len(mitm.plain)} shares read"
    return AttackResult(name, "refused", summary, KEY_CLAIM, ev)


# ---------------------------------------------------------------------------------------------
# grinding session ids / participant lists
# ---------------------------------------------------------------------------------------------

GRIND_CLAIM = "A server that chooses session ids and participant lists cannot place enough colluders next to a victim to unmask it."
GRIND_BUDGET = 2048
DEFAULT_COLLUDER_FRACTION = 0.1


def grinding(target: Target, budget: int = GRIND_BUDGET) -> AttackResult:
    name = "secagg-grinding"
    skipped = _secagg_only(target, name, GRIND_CLAIM)
    if skipped:
        return skipped
    from aggregation.secagg.graph import neighbours_of

    params = target.config.aggregation.params
    fractions = ("colluders", "colluder_fraction", "gamma")
    gamma = next((getattr(params, a) for a in fractions if isinstance(getattr(params, a, None), float)), None)
    gamma = DEFAULT_COLLUDER_FRACTION if gamma is None else gamma
    ids = list(range(target.n))
    rng = np.random.default_rng(target.config.seed)
    others = np.array([c for c in ids if c != VICTIM])
    colluders = set(int(c) for c in rng.choice(others, size=max(1, math.ceil(gamma * target.n - 1e-9)), replace=False))
    honest = [c for c in ids if c != VICTIM and c not in colluders]
    agg = target.aggregator(target.protocol_config(), ids)
    from aggregation.base import RoundContext

    counts = []
    best = (-1, None, None)
    for g in range(budget):
        session = hashlib.sha256(b"redteam-grind" + g.to_bytes(8, "big")).digest()[:16]
        parts = ids
        if g % 2 and len(honest) > 4:  # half the tries also leave a few honest clients out of the list
            drop = set(rng.choice(honest, size=max(1, len(ids) // 20), replace=False).tolist())
            parts = [c for c in ids if c not in drop]
        k = agg.degree(RoundContext(session, 0, tuple(parts), target.dim))
        got = len(neighbours_of(session, 0, parts, k, VICTIM) & colluders)
        counts.append(got)
        if got > best[0]:
            best = (got, session, parts)
    got, session, parts = best
    run = SecAggRun(target, session=session, participants=parts)
    placed = set(run.neighbours(VICTIM)) & colluders
    ev = split_trial(run, VICTIM, placed)
    ev.update(
        colluder_fraction=gamma,
        colluders_total=len(colluders),
        budget=budget,
        colluding_neighbours_mean=float(np.mean(counts)),
        colluding_neighbours_best=got,
        participants=len(parts),
        k=run.degree,
        t=run.threshold,
    )
    if ev["recovered"]:
        return AttackResult(
            name,
            "recovered",
            f"best of {budget} sessions puts {got} of {len(colluders)} colluders next to the victim "
            f"(mean {ev['colluding_neighbours_mean']:.1f}); split view then recovers, {_err(ev)}",
            GRIND_CLAIM,
            ev,
        )
    return AttackResult(
        name,
        "refused",
        f"best of {budget} sessions puts {got} colluders next to the victim "
        f"(mean {ev['colluding_neighbours_mean']:.1f}); split view refused",
        GRIND_CLAIM,
        ev,
    )
