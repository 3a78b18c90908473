"""``fedrlhf bench aggregation``: plain FedAvg vs pairwise masking vs Flower 1.42 SecAgg+ (vs CKKS).

Every cell (n clients, d coordinates, dropout share) runs one in-process round per aggregator
through :func:`aggregation.driver.run_round` — every client and the server in this one process,
timed separately — with the same inputs for each. Reported per cell: the whole round's seconds,
the total compute (all clients + server), the median client's seconds per stage, the server's
seconds, bytes up/down per client, and the error of the average against float64 plain FedAvg.

Dropouts: ``ceil(dropout * n)`` clients (at least one when dropout > 0) stop answering after the
share-keys stage, i.e. they never send a masked input. That is the case that costs the server
most (it must rebuild their pairwise masks) and the one both our SecAgg+ and Flower's survive
(Flower aborts on drops in its first two stages).

Flower's SecAgg+ (``flwr.server.workflow.SecAggPlusWorkflow`` + ``flwr.client.mod.secaggplus_mod``,
see :mod:`.flower_secaggplus`) runs at the same n, d, dropouts and k, t when flwr is installed;
Flower counts the client itself among its ``num_shares``, so our degree k is matched by Flower
``num_shares = k + 1`` (k neighbours + self; the auto k is even, so k + 1 keeps Flower's ring symmetric).

The cost of the active-security defences (issue 12) is measured in the same cell: ``secagg`` is
the protocol as shipped (signed keys, the consistency round with a quorum of signatures on the
survivor set), ``secagg-no-consistency`` the same round without them (the bench-only
:class:`_UnauthenticatedBaseline`: unsigned keys, no consistency round — what SecAgg+ was before,
insecure against a lying server and never used outside this bench). k and t are the auto
parameters of the default bounds (10% colluders, 10% dropouts, 2^-40) unless ``--k`` is given.

CKKS rows come from ``fedrlhf_secure.bench.ckks.measure(n, d)`` when that module exists.

The floor (issue 16): beside every secagg row the bench prints the CPU seconds the protocol's
required cryptography and arithmetic cost on the machine running it (:func:`measure_unit_costs`,
timed in this process right before the cell, so machine load inflates the floor and the round
alike) and the ratio ours / floor. :func:`floor_seconds` counts, for the round as it ran (n, k,
the quorum q, who dropped), every X25519 key generation and agreement, HKDF derivation, AES-GCM
share encryption and decryption, Ed25519 signature and verification (the defences: k key
signatures and q survivor-set signatures checked by every client, n + |U3| by the server),
AES-256-CTR keystream byte and masked-vector add (k + 1 masks per client, one stochastic-rounding
coin stream and one rounding pass per client, the server's sum, self-mask and dropped-pair
removals). Left out (so the floor is a lower bound): Shamir sharing and interpolation, hashing the
survivor set, and all framing and Python.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from aggregation.base import AggregationAborted, Aggregator, ClientHalf, RoundContext
from aggregation.driver import run_round
from aggregation.plain import PlainAggregator
from aggregation.secagg import SecAggAggregator, SecAggClient, SecAggConfig, SecAggServer
from aggregation.secagg.messages import Keys, UnmaskRequest

from .report import markdown_table, update_section, write_json

FULL_N = (10, 100, 500, 1000)
FULL_D = (10_000, 100_000, 1_000_000)
QUICK_N = (10, 100)
QUICK_D = (10_000, 100_000)
STAGES = ("encode", "advertise", "share keys", "masked input", "consistency check", "unmask")
BASELINE_STAGES = ("encode", "advertise", "share keys", "masked input", "unmask")
TARGETS = (
    # (label, n, d, k, drops, flower): the "done when" cells (k = 0: the auto parameters,
    # k = 32 / t = 17 at n = 100, k = 58 / t = 30 at n = 1000). Flower's full-graph round runs its
    # pure-Python Shamir for minutes (190 s unloaded, 528 s on the shared 2-core box), so it is opt-in.
    ("SecAgg+ n=100 d=1e5 k=auto, 1 dropout", 100, 100_000, 0, 1, True),
    ("SecAgg+ n=1000 d=1e5 k=auto, 1 dropout", 1000, 100_000, 0, 1, True),
    ("SecAgg (full graph) n=100 d=1e5, 1 dropout", 100, 100_000, 99, 1, False),
)
FLOWER_STAGES = {"setup": "advertise", "share_keys": "share keys", "collect_masked_vectors": "masked input", "unmask": "unmask"}
MAX_WEIGHT = 100.0
CLIP = 1.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help=f"n in {QUICK_N}, d in {QUICK_D} (a few minutes)")
    p.add_argument("--n", type=int, nargs="+", default=None, help=f"client counts (default {FULL_N})")
    p.add_argument("--d", type=int, nargs="+", default=None, help=f"vector sizes (default {FULL_D})")
    p.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.1], help="dropout shares per cell")
    p.add_argument("--k", type=int, default=0, help="SecAgg+ degree (and Flower num_shares); 0 = the auto parameters")
    p.add_argument("--append", action="store_true", help="keep the cells already in --json and run only the missing ones")
    p.add_argument(
        "--targets",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the three target cells (n=100/1000 k=auto, full graph n=100; d=1e5) vs Flower",
    )
    p.add_argument("--target-n", type=int, nargs="+", default=None, help="run only the target cells with these n")
    p.add_argument("--grid", action=argparse.BooleanOptionalAction, default=True, help="run the n x d x dropout grid")
    p.add_argument(
        "--flower",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compare with Flower 1.42 SecAgg+ (skipped with a message when flwr is missing)",
    )
    p.add_argument(
        "--flower-full-graph", action="store_true", help="also run Flower on the full-graph target (n=100, k=99: several minutes)"
    )
    p.add_argument(
        "--flower-max-nd",
        type=float,
        default=1e7,
        help="skip Flower in grid cells with n*d above this (it takes minutes there); targets always run",
    )
    p.add_argument(
        "--ckks",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add CKKS rows from fedrlhf_secure.bench.ckks.measure(n, d) when that module exists",
    )
    p.add_argument("--ckks-max-nd", type=float, default=1e6, help="largest n*d cell given to the CKKS measure")
    p.add_argument("--max-memory-gb", type=float, default=4.0, help="skip cells whose inputs + state would exceed this")
    p.add_argument("--repeats", type=int, default=1, help="rounds per cell and kind; medians are reported")
    p.add_argument(
        "--flower-repeats",
        type=int,
        default=None,
        help="rounds of Flower per cell (default: --repeats; Flower's n=1000 round costs ~10 CPU minutes)",
    )
    p.add_argument(
        "--json", type=Path, default=Path("bench/aggregation.json"), help="where the JSON results go (default bench/aggregation.json)"
    )
    p.add_argument(
        "--doc",
        type=Path,
        default=None,
        help="also rewrite this Markdown file's section with the table (e.g. BENCHMARKS.md; default: print it)",
    )


# ------------------------------------------------------------------------------------ inputs


def make_inputs(n: int, d: int, seed: int = 0) -> dict[int, tuple[np.ndarray, float]]:
    """``n`` clients' (vector, weight): vectors cycle through 8 distinct uniform(-1, 1) draws so
    memory stays O(d) at n = 1000, d = 1e6; weights are example counts in 1..100."""
    rng = np.random.default_rng(seed)
    pool = [rng.uniform(-CLIP, CLIP, d).astype(np.float32) for _ in range(min(n, 8))]
    weights = rng.integers(1, int(MAX_WEIGHT) + 1, size=n)
    return {cid: (pool[cid % len(pool)], float(weights[cid])) for cid in range(n)}


def dropped_clients(n: int, dropout: float, seed: int = 1) -> list[int]:
    if dropout <= 0:
        return []
    count = max(1, math.ceil(dropout * n))
    return sorted(np.random.default_rng(seed).choice(n, size=count, replace=False).tolist())


def expected_average(inputs, survivors) -> np.ndarray:
    total = sum(inputs[c][1] for c in survivors)
    acc = np.zeros(next(iter(inputs.values()))[0].size, dtype=np.float64)
    for c in survivors:
        acc += inputs[c][1] * inputs[c][0]
    return acc / total


# ------------------------------------------------------------------------------------ timing


class _StageTimer(Aggregator):
    """Wraps an aggregator so each client's time is split by stage (its k-th received message)."""

    def __init__(self, inner: Aggregator, stage_names: tuple[str, ...]) -> None:
        self.inner = inner
        self.kind = inner.kind  # type: ignore[misc]
        self.names = stage_names
        self.seconds: dict[str, list[float]] = {s: [] for s in stage_names}

    def server(self, ctx):
        return self.inner.server(ctx)

    def client(self, ctx, client_id, vector, weight):
        t0 = time.perf_counter()
        half = self.inner.client(ctx, client_id, vector, weight)
        self.seconds[self.names[0]].append(time.perf_counter() - t0)
        return _TimedClient(half, self)


class _TimedClient(ClientHalf):
    def __init__(self, inner: ClientHalf, timer: _StageTimer) -> None:
        self.inner, self.timer, self.count = inner, timer, 0

    def receive(self, data: bytes) -> list[bytes]:
        t0 = time.perf_counter()
        out = self.inner.receive(data)
        self.count += 1
        names = self.timer.names
        self.timer.seconds[names[min(self.count, len(names) - 1)]].append(time.perf_counter() - t0)
        return out

    @property
    def done(self) -> bool:
        return self.inner.done

    def result(self):
        return self.inner.result()


def _ours(kind: str, aggregator: Aggregator, inputs, drops, stage_names) -> dict[str, Any]:
    n = len(inputs)
    d = next(iter(inputs.values()))[0].size
    timer = _StageTimer(aggregator, stage_names)
    ctx = RoundContext(os.urandom(16), 0, tuple(range(n)), d)
    t0, c0 = time.perf_counter(), time.process_time()
    out = run_round(timer, ctx, inputs, drop_after={c: 2 for c in drops} if kind != "plain" else {c: 0 for c in drops})
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    res = out.server_result
    err = float(np.abs(res.average - expected_average(inputs, res.contributors)).max())
    st = out.stats
    per_stage = {s: (statistics.median(v) if v else 0.0) for s, v in timer.seconds.items()}
    load_end = os.getloadavg()[0]
    client_total = sum(st.client_seconds.values())
    return {
        "kind": kind,
        "seconds_round": wall,
        "seconds_compute": client_total + st.server_seconds,
        "cpu_seconds_round": cpu,
        "seconds_server": st.server_seconds,
        "seconds_clients_total": client_total,
        "seconds_client_median": statistics.median(st.client_seconds.values()),
        "client_stage_seconds_median": per_stage,
        "bytes_up_per_client": float(np.mean([st.bytes_up[c] for c in res.contributors])),
        "bytes_down_per_client": float(np.mean([st.bytes_down[c] for c in res.contributors])),
        "contributors": len(res.contributors),
        "max_abs_error_of_average": err,
        "loadavg_1min_end": load_end,
    }


def _flower(inputs, drops, k: int, t: int) -> dict[str, Any]:
    from .flower_secaggplus import run_flower_secaggplus

    shifted = {c + 1: v for c, v in inputs.items()}  # Flower node ids must be non-zero
    t0 = time.perf_counter()
    r = run_flower_secaggplus(
        shifted, num_shares=k, threshold=t, drop_from_stage={c + 1: 2 for c in drops}, clipping_range=CLIP, max_weight=MAX_WEIGHT
    )
    wall = time.perf_counter() - t0
    survivors = [c for c in inputs if c not in drops]
    if r.aggregate is None or not np.any(r.aggregate):
        raise AggregationAborted("Flower SecAgg+ halted the round (too few live neighbours for its threshold)")
    err = float(np.abs(r.aggregate - expected_average(inputs, survivors)).max())
    live = [c + 1 for c in survivors]
    n = len(inputs)
    load_end = os.getloadavg()[0]
    return {
        "loadavg_1min_end": load_end,
        "kind": "flower-secagg+",
        "seconds_round": r.seconds_total,
        "seconds_round_with_serde": wall,
        "seconds_compute": r.seconds_total,
        "cpu_seconds_round": r.cpu_seconds_total,
        "seconds_server": r.seconds_server,
        "seconds_clients_total": sum(r.client_seconds.values()),
        "seconds_client_median": statistics.median(r.client_seconds.values()),
        # Flower keeps no per-client stage times; its per-stage mean over clients stands in for the median.
        "client_stage_seconds_median": {FLOWER_STAGES[s]: v / n for s, v in r.stage_client_seconds.items()},
        "bytes_up_per_client": float(np.mean([r.bytes_up[c] for c in live])),
        "bytes_down_per_client": float(np.mean([r.bytes_down[c] for c in live])),
        "contributors": len(live),
        "max_abs_error_of_average": err,
    }


# ------------------------------------------------------------------------------------ the floor


def measure_unit_costs(d: int, *, repeats: int = 5) -> dict[str, float]:
    """Median CPU seconds of each primitive the protocol needs, measured now on this machine.

    Each figure is the median of ``repeats`` batches, process CPU time per operation. Keys differ
    from one operation to the next (as in the protocol: every verification is of another client's
    key), and the keystream and add work on one masked vector of ``d + 1`` uint32 at a time.
    """
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    def per_op(fn, ops: int) -> float:
        samples = []
        for _ in range(repeats):
            c0 = time.process_time()
            fn(ops)
            samples.append((time.process_time() - c0) / ops)
        return statistics.median(samples)

    keys = [Ed25519PrivateKey.generate() for _ in range(64)]
    payload = os.urandom(16 + 8 + 32 + len(b"fedrlhf/secagg/v1/consistency"))
    signed = [(k.public_key(), k.sign(payload)) for k in keys]
    xs = [X25519PrivateKey.generate() for _ in range(64)]
    x_pubs = [x.public_key().public_bytes_raw() for x in xs]
    nbytes = 4 * (d + 1)
    zeros, buf = bytearray(nbytes), bytearray(nbytes + 15)
    acc = np.zeros(d + 1, np.uint32)
    mask = np.frombuffer(os.urandom(nbytes), np.uint32)
    vec = np.random.default_rng(0).uniform(-1, 1, d).astype(np.float32)
    scaled, ints = np.empty(d), np.empty(d, np.int32)
    gcm_key, share = AESGCM(os.urandom(32)), os.urandom(96)
    sealed = gcm_key.encrypt(bytes(12), share, b"ad")

    def verify(ops):
        for i in range(ops):
            pk, sig = signed[i % 64]
            pk.verify(sig, payload)

    def sign(ops):
        for i in range(ops):
            keys[i % 64].sign(payload)

    def agree(ops):
        for i in range(ops):
            xs[i % 64].exchange(X25519PublicKey.from_public_bytes(x_pubs[(i + 1) % 64]))

    def keygen(ops):
        for _ in range(ops):
            X25519PrivateKey.generate().public_key().public_bytes_raw()

    def hkdf(ops):
        for i in range(ops):
            HKDF(hashes.SHA256(), 32, salt=payload[:16], info=payload[:40]).derive(payload[i % 8 : i % 8 + 32])

    def gcm(ops):  # one op = one share encryption or decryption (pairs timed, halved)
        for _ in range(ops // 2):
            gcm_key.encrypt(bytes(12), share, b"ad")
            gcm_key.decrypt(bytes(12), sealed, b"ad")

    def keystream(ops):
        for _ in range(ops):
            Cipher(algorithms.AES(os.urandom(32)), modes.CTR(bytes(16))).encryptor().update_into(zeros, buf)

    def add(ops):
        for _ in range(ops):
            np.add(acc, mask, out=acc)

    def rounding(ops):  # the least a rounding pass does: scale d floats, floor, store d integers
        for _ in range(ops):
            np.multiply(vec, 3.0, out=scaled)
            np.floor(scaled, out=scaled)
            np.copyto(ints, scaled, casting="unsafe")

    big = max(1, 4_000_000 // max(nbytes, 1))
    return {
        "ed25519_verify": per_op(verify, 200),
        "ed25519_sign": per_op(sign, 200),
        "x25519_agree": per_op(agree, 200),
        "x25519_keygen": per_op(keygen, 200),
        "hkdf": per_op(hkdf, 200),
        "aes_gcm_share": per_op(gcm, 200),
        "keystream_mask": per_op(keystream, big),
        "add_mask": per_op(add, 4 * big),
        "rounding_pass": per_op(rounding, big),
    }


def operation_counts(n: int, k: int, quorum: int, dropped: int, *, consistency: bool = True) -> dict[str, float]:
    """How many of each primitive one round needs (SecAgg+, auto degree k, the ``dropped`` clients
    leaving after the share-keys stage as in this bench). Every client: 2 key pairs, 1 key signature,
    k key-signature checks (the defences), k share agreements + derivations + encryptions; every
    survivor additionally k share decryptions, k mask agreements + derivations, a coin stream and a
    rounding pass, k + 1 masks (keystream + add), 1 survivor-set signature and q checks; the server
    n + |U3| signature checks, |U3| masked-vector adds, |U3| self-mask removals and, per dropped
    client, one key rebuild (a key generation's cost) and a mask removal per surviving neighbour
    (agreement + derivation + keystream + add). Without ``consistency`` (the bench-only baseline):
    no signatures at all."""
    survivors = n - dropped
    pair_removals = dropped * k  # each dropped client's neighbours all survived (one dropout)
    counts = {
        "x25519_keygen": 2 * n + dropped,
        "x25519_agree": n * k + survivors * k + pair_removals,
        "hkdf": n * k + survivors * k + pair_removals,
        "aes_gcm_share": n * k + survivors * k,  # every client seals k shares, every survivor opens k
        "keystream_mask": survivors * (k + 2) + survivors + pair_removals,  # k pair + self + coins; server self + pairs
        "add_mask": survivors * (k + 1) + survivors + survivors + pair_removals,  # client masks; server sum, self, pairs
        "rounding_pass": survivors,
        "ed25519_sign": 0,
        "ed25519_verify": 0,
    }
    if consistency:
        counts["ed25519_sign"] = n + survivors
        counts["ed25519_verify"] = n * k + survivors * quorum + n + survivors
    return counts


def floor_seconds(costs: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
    """The floor, total and by primitive (CPU seconds)."""
    parts = {name: counts[name] * costs[name] for name in counts}
    return {"total": sum(parts.values()), **parts}


def _median_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    if len(rows) == 1:
        return rows[0]
    out = dict(rows[0])
    for key, val in rows[0].items():
        if isinstance(val, float):
            out[key] = statistics.median(r[key] for r in rows)
        elif isinstance(val, dict) and val and all(isinstance(v, float) for v in val.values()):
            out[key] = {k: statistics.median(r[key][k] for r in rows) for k in val}
    out["repeats"] = len(rows)
    out["loadavg_1min_each"] = [r.get("loadavg_1min_end") for r in rows]
    return out


class _NoConsistencyClient(SecAggClient):
    """Bench baseline only: takes unsigned neighbour keys and unmasks for whatever set it is told."""

    def _check_directory(self, d, ids) -> None:
        return None

    def _consistency(self, data: bytes) -> list[bytes]:  # the baseline server skips the round: this is the unmask request
        r = UnmaskRequest.decode(data, self.ctx, self.id)
        members = {int(i) for i in r.survivors}
        return self._reveal(set(self._held) & members, set(self._held) - members)


class _NoConsistencyServer(SecAggServer):
    """Bench baseline only: no signature checks, unmask requests right after the masked inputs."""

    def _on_keys(self, sender: int, data: bytes) -> None:
        self._refuse_repeat(sender, self._keys)
        self._keys[sender] = Keys.decode(data, self.ctx, sender)

    def _send_consistency_requests(self):
        self._require(len(self._masked), "sent masked inputs")
        self._survivor_set = tuple(sorted(self._masked))
        self._consistency = dict.fromkeys(self._masked, b"")
        request = UnmaskRequest(np.array(self._survivor_set, np.int64), np.zeros(0, np.int64), np.zeros((0, 64), np.uint8))
        return self._request_unmask(request, self._masked)


class _UnauthenticatedBaseline(SecAggAggregator):
    """SecAgg+ without signatures and without the consistency round: the cost baseline of issue 12.

    Insecure against a lying server (split view, key substitution); it exists only so the bench can
    measure what the defences cost in the same run, and nothing outside this module builds it.
    """

    kind = "secagg-no-consistency"

    def server(self, ctx):
        p = self.parameters(ctx)
        return _NoConsistencyServer(ctx, self.quantizer, p.k, p.t, self.identities.public_only(), quorum=p.quorum)

    def client(self, ctx, client_id, vector, weight, *, integer_noise=None):
        p = self.parameters(ctx)
        ids = self.identities.for_client(client_id)
        return _NoConsistencyClient(ctx, client_id, vector, weight, self.quantizer, p.k, p.t, ids, integer_noise, quorum=p.quorum)


def measure_cell(
    n: int, d: int, drops: list[int], *, k: int, flower: bool, repeats: int, flower_repeats: int | None = None
) -> list[dict[str, Any]]:
    """Rows for plain, secagg (degree k; 0 = auto), the unauthenticated baseline and optionally
    Flower SecAgg+ at one cell, same inputs."""
    from aggregation.secagg import Identities

    inputs = make_inputs(n, d)
    cfg = SecAggConfig(neighbours=k or "auto", clip_range=CLIP, max_weight=MAX_WEIGHT, bits=32)
    params = cfg.parameters(n)
    k, t = params.k, params.t
    meta = {"n": n, "d": d, "k": k, "t": t, "quorum": params.quorum, "dropped": len(drops)}
    rows = []
    kinds = [
        ("plain", lambda: _ours("plain", PlainAggregator(), inputs, drops, ("encode", "update"))),
        ("secagg", lambda: _ours("secagg", SecAggAggregator(cfg, n, Identities.generate(range(n))), inputs, drops, STAGES)),
        (
            "secagg-no-consistency",
            lambda: _ours(
                "secagg-no-consistency", _UnauthenticatedBaseline(cfg, n, Identities.generate(range(n))), inputs, drops, BASELINE_STAGES
            ),
        ),
    ]
    if flower:
        kinds.append(("flower-secagg+", lambda: _flower(inputs, drops, min(k + 1, n), t)))
    counts = {
        "secagg": operation_counts(n, k, params.quorum, len(drops)),
        "secagg-no-consistency": operation_counts(n, k, params.quorum, len(drops), consistency=False),
    }

    def with_floor(kind, fn):
        """One repeat, with the unit costs measured right before it (same load as the round)."""
        costs = measure_unit_costs(d)
        row = fn()
        floor = floor_seconds(costs, counts[kind])
        return {
            **row,
            "floor_cpu_seconds": floor["total"],
            "floor_breakdown": floor,
            "unit_costs": costs,
            "cpu_over_floor": row["cpu_seconds_round"] / floor["total"],
        }

    for kind, fn in kinds:
        # the 1-minute load average says how contended the (shared) machine was: wall seconds inflate
        # with it, process CPU seconds do not
        load = {"loadavg_1min": os.getloadavg()[0]}
        try:
            times = flower_repeats if kind == "flower-secagg+" and flower_repeats else repeats
            runs = [with_floor(kind, fn) if kind in counts else fn() for _ in range(times)]
            rows.append({**meta, **load, **_median_rows(runs)})
        except AggregationAborted as exc:  # a real outcome (e.g. a client lost t of its k neighbours): recorded
            rows.append({**meta, **load, "kind": kind, "aborted": str(exc)})
    return rows


def _memory_gb(n: int, d: int, flower: bool) -> float:
    """Peak estimate: 8 input vectors, plus every client's upload queued at once by the in-process
    driver (n x (d+1) x 4 bytes, 1.5x for frame copies), plus Flower's int64 vectors and proto copies."""
    return (8 * d * 4 + 1.5 * n * (d + 1) * 4 + (n * d * 24 if flower else 0)) / 1e9


# ------------------------------------------------------------------------------------ command


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .flower_secaggplus import available

    flower_reason = available() if args.flower else "Flower comparison disabled (--no-flower)"
    if flower_reason:
        print(flower_reason)
    run_flower = flower_reason is None
    ns = args.n or (QUICK_N if args.quick else FULL_N)
    ds = args.d or (QUICK_D if args.quick else FULL_D)
    cells: list[tuple[str, int, int, int, list[int], bool]] = []
    if args.targets:
        for label, n, d, k, ndrop, with_flower in TARGETS:
            if args.target_n and n not in args.target_n:
                continue
            flower_here = run_flower and (with_flower or args.flower_full_graph)
            cells.append((label, n, d, k, dropped_clients(n, ndrop / n), flower_here))
    if args.grid:
        for n in ns:
            for d in ds:
                for p in args.dropout:
                    use_flower = run_flower and n * d <= args.flower_max_nd
                    k = args.k
                    label = f"grid dropout={p:g}" + ("" if args.k else " k=auto")
                    cells.append((label, n, d, k, dropped_clients(n, p), use_flower))
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    previous: dict[str, Any] = {}
    if args.append and args.json.exists():
        import json

        previous = json.loads(args.json.read_text())
        results += previous["results"]
        skipped += previous.get("skipped", [])
    done = {(r["cell"], r["n"], r["d"]) for r in results}
    if flower_reason and any(r["kind"] == "flower-secagg+" for r in results):
        flower_reason = None  # earlier cells of this file do have Flower rows; new cells simply lack them
    payload: dict[str, Any] = {
        "grid": {"n": list(ns), "d": list(ds), "dropout": args.dropout, "k": args.k},
        "results": results,
        "targets": [],
        "skipped": skipped,
        "flower": flower_reason or "flwr 1.42 SecAgg+, run right after the secagg row of the same cell",
        "ckks": previous.get("ckks", []),
        "ckks_note": previous.get("ckks_note", "CKKS rows pending"),
        "complete": False,
        "loadavg_at_start": list(os.getloadavg()),
    }
    # Cheapest cells first, and results written after every cell: on a shared machine a long grid can
    # be stopped at any point and still leave every finished cell in the JSON and the table.
    n_targets = sum(1 for c in cells if not c[0].startswith("grid "))
    grid_cells = sorted(cells[n_targets:], key=lambda c: (c[1] * c[2], c[1]))
    ordered = cells[:n_targets] + grid_cells
    ordered = [c for c in ordered if (c[0], c[1], c[2]) not in done]
    for label, n, d, k, drops, use_flower in tqdm(ordered, desc="aggregation bench", unit="cell"):
        if _memory_gb(n, d, False) > args.max_memory_gb:
            skipped.append({"cell": label, "n": n, "d": d, "why": f"needs ~{_memory_gb(n, d, False):.1f} GB > --max-memory-gb"})
            continue
        if use_flower and _memory_gb(n, d, True) > args.max_memory_gb:
            skipped.append(
                {
                    "cell": label + " (Flower only)",
                    "n": n,
                    "d": d,
                    "why": f"Flower needs ~{_memory_gb(n, d, True):.1f} GB > --max-memory-gb",
                }
            )
            use_flower = False
        for row in measure_cell(n, d, drops, k=k, flower=use_flower, repeats=args.repeats, flower_repeats=args.flower_repeats):
            results.append({"cell": label, **row})
        payload["targets"] = _target_ratios(results)
        _write(args, payload)
    if args.ckks or not previous.get("ckks"):
        payload["ckks"], payload["ckks_note"] = _ckks(args, ns, ds)
    else:  # --append --no-ckks keeps the CKKS rows measured before
        payload["ckks"], payload["ckks_note"] = previous["ckks"], previous["ckks_note"]
    payload["complete"] = True
    _write(args, payload)
    for t in payload["targets"]:
        print(t)
    print(f"results: {args.json}, {args.json.with_suffix('.png')} and {args.doc}")
    return 0


def _write(args: argparse.Namespace, payload: dict[str, Any]) -> None:
    write_json(args.json, payload)
    _plot(payload["results"], args.json.with_suffix(".png"))
    update_section(args.doc, "aggregation", _markdown(payload))


def _ckks(args, ns, ds) -> tuple[list[dict[str, Any]], str]:
    if not args.ckks:
        return [], "CKKS rows disabled (--no-ckks)"
    try:
        from . import ckks
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.endswith("bench.ckks"):
            return [], "CKKS rows skipped: fedrlhf_secure.bench.ckks is not installed"
        raise
    rows = []
    for n in ns:
        for d in ds:
            if n * d <= args.ckks_max_nd:
                rows += ckks.measure(n, d)["rows"]
    return rows, f"CKKS rows from fedrlhf_secure.bench.ckks.measure(n, d) for n*d <= {args.ckks_max_nd:g}"


def _target_ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for label, *_ in TARGETS:
        rows = {r["kind"]: r for r in results if r["cell"] == label and "aborted" not in r}
        if "secagg" not in rows:
            continue
        ours = rows["secagg"]
        entry = {
            "cell": label,
            "secagg_seconds_round": ours["seconds_round"],
            "secagg_seconds_compute": ours["seconds_compute"],
            "secagg_bytes_up_per_client": ours["bytes_up_per_client"],
            "secagg_cpu_seconds_round": ours["cpu_seconds_round"],
            "secagg_floor_cpu_seconds": ours.get("floor_cpu_seconds"),
            "secagg_cpu_over_floor": ours.get("cpu_over_floor"),
            "loadavg_1min": ours.get("loadavg_1min"),
        }
        base = rows.get("secagg-no-consistency")
        if base:
            entry.update(
                {
                    "no_consistency_seconds_round": base["seconds_round"],
                    "no_consistency_cpu_seconds_round": base["cpu_seconds_round"],
                    "no_consistency_floor_cpu_seconds": base.get("floor_cpu_seconds"),
                    "no_consistency_cpu_over_floor": base.get("cpu_over_floor"),
                    "defences_cpu_overhead": ours["cpu_seconds_round"] / base["cpu_seconds_round"],
                    "defences_upload_overhead": ours["bytes_up_per_client"] / base["bytes_up_per_client"],
                    "defences_download_overhead": ours["bytes_down_per_client"] / base["bytes_down_per_client"],
                }
            )
        fl = rows.get("flower-secagg+")
        if fl:
            entry.update(
                {
                    "flower_seconds_round": fl["seconds_round"],
                    "flower_seconds_compute": fl["seconds_compute"],
                    "flower_seconds_server": fl["seconds_server"],
                    "flower_bytes_up_per_client": fl["bytes_up_per_client"],
                    "compute_speedup_vs_flower": fl["seconds_compute"] / ours["seconds_compute"],
                    "cpu_speedup_vs_flower": fl["cpu_seconds_round"] / ours["cpu_seconds_round"],
                    "secagg_cpu_seconds_round": ours["cpu_seconds_round"],
                    "flower_cpu_seconds_round": fl["cpu_seconds_round"],
                    "round_time_ratio_vs_flower": ours["seconds_round"] / fl["seconds_round"],
                    "upload_ratio_vs_flower": ours["bytes_up_per_client"] / fl["bytes_up_per_client"],
                }
            )
        out.append(entry)
    return out


def _markdown(payload: dict[str, Any]) -> str:
    head = [
        "cell",
        "kind",
        "n",
        "d",
        "k",
        "t",
        "dropped",
        "round s",
        "compute s",
        "CPU s",
        "floor CPU s",
        "CPU / floor",
        "server s",
        "client s (median)",
        *[f"client {s} s" for s in STAGES],
        "up B/client",
        "down B/client",
        "max err of avg",
    ]
    rows = []
    for r in payload["results"]:
        if "aborted" in r:
            rows.append(
                [r["cell"], r["kind"], r["n"], r["d"], r["k"], r["t"], r["dropped"], f"aborted: {r['aborted']}", *[""] * (len(head) - 8)]
            )
            continue
        st = r["client_stage_seconds_median"]
        rows.append(
            [
                r["cell"],
                r["kind"],
                r["n"],
                r["d"],
                r["k"],
                r["t"],
                r["dropped"],
                r["seconds_round"],
                r["seconds_compute"],
                r["cpu_seconds_round"],
                r.get("floor_cpu_seconds", ""),
                r.get("cpu_over_floor", ""),
                r["seconds_server"],
                r["seconds_client_median"],
                *[st.get(s, "") for s in STAGES],
                int(r["bytes_up_per_client"]),
                int(r["bytes_down_per_client"]),
                r["max_abs_error_of_average"],
            ]
        )
    parts = [
        "### Aggregation protocols (`fedrlhf bench aggregation`)",
        "",
        "One in-process round per cell, every client and the server timed separately in one process; "
        "dropped clients stop after the share-keys stage. 'compute s' is wall time summed over the clients and "
        "the server; 'CPU s' is the process CPU time of the round (robust to other load on a shared machine). "
        "Flower = flwr 1.42 `SecAggPlusWorkflow` + "
        f"`secaggplus_mod`, same inputs ({payload['flower']}).",
        ""
        if payload.get("complete", True)
        else "\n**Partial run**: stopped before every cell finished; the cells below are all that was measured.",
        "",
        markdown_table(head, rows),
    ]
    if payload["targets"]:
        th = [
            "target cell",
            "load (1 min)",
            "ours round s",
            "ours CPU s",
            "floor CPU s",
            "ours / floor",
            "no-consistency CPU s",
            "its floor",
            "its / floor",
            "defences CPU ×",
            "defences down B ×",
            "Flower round s",
            "compute speed-up (wall)",
            "CPU speed-up",
            "round time ratio",
            "upload ratio",
        ]
        tr = [
            [
                t["cell"],
                t.get("loadavg_1min", "n/a"),
                t["secagg_seconds_round"],
                t["secagg_cpu_seconds_round"],
                t.get("secagg_floor_cpu_seconds") or "n/a",
                t.get("secagg_cpu_over_floor") or "n/a",
                t.get("no_consistency_cpu_seconds_round", "n/a"),
                t.get("no_consistency_floor_cpu_seconds") or "n/a",
                t.get("no_consistency_cpu_over_floor") or "n/a",
                t.get("defences_cpu_overhead", "n/a"),
                t.get("defences_download_overhead", "n/a"),
                t.get("flower_seconds_round", "n/a"),
                t.get("compute_speedup_vs_flower", "n/a"),
                t.get("cpu_speedup_vs_flower", "n/a"),
                t.get("round_time_ratio_vs_flower", "n/a"),
                t.get("upload_ratio_vs_flower", "n/a"),
            ]
            for t in payload["targets"]
        ]
        parts += ["", "Targets (same run):", "", markdown_table(th, tr)]
    if payload["skipped"]:
        parts += ["", "Skipped cells: " + "; ".join(f"n={s['n']} d={s['d']} ({s['why']})" for s in payload["skipped"])]
    if payload["ckks"]:
        from .ckks import TABLE_HEADERS, table_rows

        parts += ["", payload["ckks_note"] + ":", "", markdown_table(TABLE_HEADERS, table_rows(payload["ckks"]))]
    else:
        parts += ["", payload["ckks_note"]]
    return "\n".join(parts)


def _plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = [r for r in results if r["cell"].startswith("grid dropout=0") and r["cell"].split()[1] == "dropout=0" and "aborted" not in r]
    if not grid:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for kind, marker in (("plain", "o"), ("secagg", "s"), ("secagg-no-consistency", "x"), ("flower-secagg+", "^")):
        for d in sorted({r["d"] for r in grid}):
            pts = sorted((r["n"], r["cpu_seconds_round"], r["bytes_up_per_client"]) for r in grid if r["kind"] == kind and r["d"] == d)
            if pts:
                axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=f"{kind} d={d:g}")
                axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker=marker, label=f"{kind} d={d:g}")
    axes[0].set(xscale="log", yscale="log", xlabel="clients n", ylabel="CPU s per round (all clients + server)")
    axes[1].set(xscale="log", yscale="log", xlabel="clients n", ylabel="bytes up per client")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
