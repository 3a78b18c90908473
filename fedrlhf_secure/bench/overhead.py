"""``fedrlhf bench overhead``: what secure aggregation costs a MovieLens round, against its physical floor.

Issue 16 asks for "MovieLens default: secagg <= 1.2x plain CPU, ckks <= 1.6x". This benchmark runs
one round of ``configs/movielens.yaml`` in process (real u1 users, ``--clients`` of them; the same
embedded simulation as ``fedrlhf run``, set-up excluded) under plain FedAvg, SecAgg+ and CKKS,
``--repeats`` times each, interleaved, and times each round by this process's CPU seconds.

Beside every protocol it prints the round's **floor**: the plain round (local training and the
plain sum, which a secure round also does) plus the CPU seconds of the cryptographic primitives
the protocol cannot skip, each timed on this machine in this process just before
(:func:`fedrlhf_secure.bench.aggregation.measure_unit_costs` and ``operation_counts``: X25519,
HKDF, AES-GCM shares, Ed25519 signatures and the consistency round's verifications, one AES-256-CTR
keystream and add per mask, one rounding pass; for CKKS additionally each client's TenSEAL
encryption and decryption of the ``d + 1 + checks`` slots and the server's ciphertext additions,
the mask round being a SecAgg+ round over 64-bit masks of the same length). Shamir sharing,
framing, ciphertext (de)serialisation and Python are left out, so the floor is a lower bound:
if ``floor / plain`` already exceeds the issue's ratio, the target cannot be met by this protocol
on this machine, whatever the implementation.

The consistency round (Bonawitz et al., CCS 2017, Fig. 4) makes every survivor verify ``q =
floor((n + C)/2) + 1`` survivor-set signatures: ``n q`` Ed25519 verifications per round, quadratic
in n (docs/masking.md, "What the consistency round costs, and the floor").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..commands.options import add_overrides
from .report import markdown_table, process_cpu_seconds, update_section, write_json

TARGETS = {"secagg": 1.2, "ckks": 1.6}
"""Issue 16: round CPU of each protocol / the plain round's, MovieLens default."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="configs/movielens.yaml", help="run config (default configs/movielens.yaml)")
    add_overrides(p)
    p.add_argument("--data-dir", type=Path, default=None, help="datasets directory (default: $FEDRLHF_DATA_DIR)")
    p.add_argument("--clients", type=int, default=943, help="real users, one client each (default 943: all of u1)")
    p.add_argument(
        "--ckks-clients",
        type=int,
        default=None,
        help="clients of the CKKS cell (default: --clients); its plain round is run at the same size",
    )
    p.add_argument(
        "--floor-clients",
        type=int,
        nargs="*",
        default=[],
        help="also compute the secagg and ckks floors at these sizes (cheap: no protocol round is run there)",
    )
    p.add_argument(
        "--kinds",
        nargs="+",
        default=["plain", "secagg", "ckks"],
        choices=["plain", "secagg", "ckks"],
        help="aggregations to run a round of (default all three; the floors are computed for secagg and ckks either way)",
    )
    p.add_argument("--repeats", type=int, default=3, help="rounds per kind, interleaved; medians reported (default 3)")
    p.add_argument("--json", type=Path, default=Path("bench/overhead.json"), help="JSON results (default bench/overhead.json)")
    p.add_argument("--doc", type=Path, default=None, help="also rewrite this Markdown file's section (e.g. BENCHMARKS.md)")
    p.add_argument("--section", default="overhead", help="the BENCHMARKS.md section to rewrite (default overhead)")
    p.add_argument("--render-only", action="store_true", help="run nothing: print (and with --doc, write) the table of --json")


def one_round(cfg: Any, split: Any, kind: str, n: int, out: Path) -> dict[str, Any]:
    """CPU and wall seconds of round 0 of ``n`` real users under ``kind`` (``cfg`` names that kind) and
    the round's shape (vector dimension, ring width, k, t, q)."""
    from ..federation.engine import Federation, RunOptions
    from ..rundir import RunDirectory
    from ..tasks.movielens.task import MovieLensTask

    users = split.catalogue.num_users
    task = MovieLensTask(replace(cfg.task.params, num_clients=None if n == users else n), split, cfg.seed)
    run = RunDirectory.create(out, f"overhead-{kind}-{n}")
    fed = Federation(cfg, run, RunOptions(out=out, progress=False, task=task))
    load = os.getloadavg()[0]
    try:
        c0, w0 = process_cpu_seconds(), time.perf_counter()
        log = fed.core.run_round(0)
        cpu, wall = process_cpu_seconds() - c0, time.perf_counter() - w0
        shape = _shape(fed.core.aggregator, kind, fed.core.codec.dim, n)
    finally:
        fed.close()
        run.discard()
    return {
        "kind": kind,
        "clients": n,
        "cpu_seconds": cpu,
        "wall_seconds": wall,
        "heldout_accuracy": log.row.get("heldout_accuracy"),
        "load_before": load,
        "load_after": os.getloadavg()[0],
        **shape,
    }


def _shape(aggregator: Any, kind: str, dim: int, n: int) -> dict[str, Any]:
    if kind == "secagg":
        return {"dim": dim, **secagg_shape(aggregator.config, dim, n)}
    if kind == "ckks":
        return {"dim": dim, **ckks_shape(aggregator.config, dim, n)}
    return {"dim": dim}


def secagg_shape(config: Any, dim: int, n: int) -> dict[str, Any]:
    """Elements on the wire, ring width and k / t / q of a SecAgg+ round of ``n`` over ``[q, u]``."""
    p = config.parameters(n)
    return {"elements": dim + 1, "ring_bits": config.quantizer(n).bits, "k": p.k, "t": p.t, "quorum": p.quorum}


def ckks_shape(config: Any, dim: int, n: int) -> dict[str, Any]:
    """The same for CKKS: its mask round is SecAgg+ over the ``d + 1 + checks`` slots with 64-bit masks."""
    from aggregation.ckks import codec, masking
    from aggregation.ckks.protocol import masking_config

    plan = masking.plan(config, n)
    length = dim + 1 + plan.checks(dim + 1)
    return {**secagg_shape(masking_config(config, plan), length - 1, n), "ciphertexts": len(codec.chunk_lengths(config, length))}


def secagg_floor(n: int, elements: int, ring_bits: int, k: int, quorum: int) -> dict[str, float]:
    """CPU seconds of the primitives one SecAgg+ round of ``n`` clients (no dropout) cannot skip."""
    from .aggregation import floor_seconds, measure_unit_costs, operation_counts

    words = elements * ring_bits // 32  # measure_unit_costs times masks of (d + 1) uint32 words
    costs = measure_unit_costs(words - 1)
    if ring_bits == 64:  # the rounding pass is per element, not per 32-bit word
        costs["rounding_pass"] /= 2
    floor = floor_seconds(costs, operation_counts(n, k, quorum, 0))
    if ring_bits == 64:  # each client's rounding coins are 32-bit whatever the ring: half a mask's keystream
        coins = n * costs["keystream_mask"] / 2
        floor["keystream_mask"] -= coins
        floor["total"] -= coins
    return {**floor, **{f"unit_{name}": value for name, value in costs.items()}}


def ckks_floor(config: Any, n: int, elements: int, repeats: int = 3) -> dict[str, float]:
    """CPU seconds of ``n`` clients' encryptions and decryptions and the server's ``n - 1`` ciphertext additions.

    Timed with a client context of a freshly dealt key of the same parameters (TenSEAL, the shipped
    seeded serialisation for encryption), median of ``repeats``; none of it depends on n, so it is
    timed once per client; loading/checking ciphertexts is not counted."""
    import numpy as np

    from aggregation.ckks import codec
    from aggregation.ckks.protocol import SimulatedDealer

    key = SimulatedDealer(config, [0, 1]).client_key(0, 0)
    values = np.random.default_rng(0).uniform(-1, 1, elements)

    def timed(fn) -> float:
        samples = []
        for _ in range(repeats):
            c0 = time.process_time()
            fn()
            samples.append(time.process_time() - c0)
        return statistics.median(samples)

    blobs = codec.encrypt(values, key.context, config)
    chunks = codec.load_chunks(blobs, key.context, config, elements)
    enc = timed(lambda: codec.encrypt(values, key.context, config))
    dec = timed(lambda: codec.decrypt(chunks))
    acc = [c.copy() for c in chunks]

    def add() -> None:
        for a, c in zip(acc, chunks, strict=True):
            a += c

    add_s = timed(add)
    return {
        "ckks_encrypt": n * enc,
        "ckks_decrypt": n * dec,
        "ckks_add": (n - 1) * add_s,
        "unit_ckks_encrypt": enc,
        "unit_ckks_decrypt": dec,
        "unit_ckks_add": add_s,
    }


def run(args: argparse.Namespace) -> int:
    if args.render_only:
        payload = json.loads(args.json.read_text())
        payload["summary"] = summarise(payload)  # recomputed: a JSON from an older version renders with today's columns
        render(payload, args.doc, args.section)
        return 0
    from ..config import load_config
    from ..federation.engine import build_task, resolve_data_dir

    configs = {kind: load_config(args.config, [*args.overrides, "federation.rounds=1", f"aggregation.kind={kind}"]) for kind in args.kinds}
    config = next(iter(configs.values()))
    if config.task.kind != "movielens":
        from ..errors import InputError

        raise InputError(f"{args.config}: bench overhead runs MovieLens users; task.kind is {config.task.kind!r}")
    split = build_task(config, resolve_data_dir(args.data_dir)).split
    if args.clients > split.catalogue.num_users or (args.ckks_clients or 0) > split.catalogue.num_users:
        from ..errors import InputError

        raise InputError(f"--clients / --ckks-clients: at most {split.catalogue.num_users} real users in this split")
    sizes = {"plain": [args.clients], "secagg": [args.clients], "ckks": [args.ckks_clients or args.clients]}
    if "ckks" in args.kinds and "plain" in args.kinds and sizes["ckks"][0] != args.clients:
        sizes["plain"].append(sizes["ckks"][0])
    rounds: list[dict[str, Any]] = []
    floor_by: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for kind in args.kinds:
                for n in sizes[kind]:
                    res = one_round(configs[kind], split, kind, n, Path(tmp))
                    res["repeat"] = rep
                    rounds.append(res)
                    print(f"{kind} n={n} repeat {rep}: {res['cpu_seconds']:.3f} CPU s (load {res['load_before']:.1f})", flush=True)
        dim = rounds[0]["dim"]
    for kind in ("secagg", "ckks"):
        if kind not in configs:
            configs[kind] = load_config(args.config, [*args.overrides, "federation.rounds=1", f"aggregation.kind={kind}"])
        for n in sorted({*sizes[kind], *args.floor_clients}):
            floor_by[f"{kind}-{n}"] = floors_ = floors(configs, kind, dim, n)
            print(f"{kind} n={n} floor: {floors_['total']:.3f} CPU s (Ed25519 verify {floors_['ed25519_verify']:.3f})", flush=True)
    argv = ["--clients", str(args.clients), "--repeats", str(args.repeats), "--kinds", *args.kinds]
    argv += ["--ckks-clients", str(args.ckks_clients)] if args.ckks_clients else []
    argv += ["--floor-clients", *map(str, args.floor_clients)] if args.floor_clients else []
    payload = {"argv": argv, "config": args.config, "overrides": list(args.overrides), "repeats": args.repeats}
    payload.update(rounds=rounds, floors=floor_by)
    payload["summary"] = summarise(payload)
    write_json(args.json, payload)
    render(payload, args.doc, args.section)
    return 0


def floors(configs: dict[str, Any], kind: str, dim: int, n: int) -> dict[str, Any]:
    """The crypto floor of ``kind`` at ``n`` clients over ``dim`` coordinates, timed now."""
    c0 = time.process_time()
    params = configs[kind].aggregation.params
    shape = secagg_shape(params, dim, n) if kind == "secagg" else ckks_shape(params, dim, n)
    floor: dict[str, Any] = secagg_floor(n, shape["elements"], shape["ring_bits"], shape["k"], shape["quorum"])
    if kind == "ckks":
        extra = ckks_floor(params, n, shape["elements"])
        floor.update(extra)
        floor["total"] += extra["ckks_encrypt"] + extra["ckks_decrypt"] + extra["ckks_add"]
    floor.update(shape, measured_cpu_seconds=time.process_time() - c0, load=os.getloadavg()[0])
    return floor


def _floor_without_defences(floor: dict[str, Any], n: int) -> float:
    """The crypto floor of the same round without Ed25519 signatures and the consistency round (semi-honest
    SecAgg+, the bench-only baseline of ``bench aggregation``), from the unit costs timed for ``floor``."""
    from .aggregation import operation_counts

    counts = operation_counts(n, floor["k"], floor["quorum"], 0, consistency=False)
    total = sum(count * floor[f"unit_{name}"] for name, count in counts.items())
    if floor.get("ring_bits") == 64:  # as in secagg_floor: 32-bit coins are half a 64-bit mask's keystream
        total -= n * floor["unit_keystream_mask"] / 2
    return total + sum(floor.get(name, 0.0) for name in ("ckks_encrypt", "ckks_decrypt", "ckks_add"))


def summarise(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Medians per (kind, clients), ratios to the plain round of the same size, the floor beside them."""
    by: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in payload["rounds"]:
        by.setdefault((r["kind"], r["clients"]), []).append(r)
    for key in payload["floors"]:  # a floor without its protocol round: a row with the floor only
        kind, n = key.rsplit("-", 1)
        by.setdefault((kind, int(n)), [])
    rows = []
    for (kind, n), rs in sorted(by.items(), key=lambda kv: (kv[0][1], ["plain", "secagg", "ckks"].index(kv[0][0]))):
        floor = payload["floors"].get(f"{kind}-{n}")
        if not rs:
            rs = [
                {
                    "cpu_seconds": None,
                    "dim": None,
                    "load_before": floor["load"],
                    "load_after": floor["load"],
                    "heldout_accuracy": None,
                    **floor,
                }
            ]
        cpu = statistics.median(r["cpu_seconds"] for r in rs) if rs[0]["cpu_seconds"] is not None else None
        plain_rs = by.get(("plain", n))
        plain = statistics.median(r["cpu_seconds"] for r in plain_rs) if plain_rs else None
        row = {
            "kind": kind,
            "clients": n,
            "runs": len(rs) if cpu is not None else 0,
            "cpu_seconds": cpu,
            "cpu_seconds_all": [r["cpu_seconds"] for r in rs if r["cpu_seconds"] is not None],
            "plain_cpu_seconds": plain,
            "ratio_to_plain": cpu / plain if plain and cpu is not None else None,
            "target": TARGETS.get(kind),
            "dim": rs[0]["dim"] or payload["rounds"][0]["dim"],
            "elements": rs[0].get("elements"),
            "ring_bits": rs[0].get("ring_bits"),
            "k": rs[0].get("k"),
            "t": rs[0].get("t"),
            "quorum": rs[0].get("quorum"),
            "load": [min(r["load_before"] for r in rs), max(r["load_after"] for r in rs)],
            "heldout_accuracy": rs[0]["heldout_accuracy"],
        }
        if floor is not None:
            row.update(crypto_floor_cpu_seconds=floor["total"], ed25519_verify_cpu_seconds=floor["ed25519_verify"])
        if floor is not None and plain:
            total = plain + floor["total"]
            bare = plain + _floor_without_defences(floor, n)
            row.update(
                floor_without_defences_cpu_seconds=bare,
                floor_without_defences_ratio_to_plain=bare / plain,
                floor_cpu_seconds=total,
                floor_ratio_to_plain=total / plain,
                ours_to_floor=cpu / total if cpu is not None else None,
                target_possible=total / plain <= TARGETS[kind],
            )
        rows.append(row)
    return rows


def render(payload: dict[str, Any], doc: Path | None, section: str = "overhead") -> None:
    headers = [
        "kind",
        "clients",
        "runs",
        "d",
        "elements × bits",
        "k / t / q",
        "round CPU s (median)",
        "× plain",
        "issue target",
        "crypto floor CPU s",
        "of it Ed25519 verify",
        "floor = plain + crypto",
        "floor × plain",
        "floor × plain without signatures",
        "ours / floor",
        "load (1-min)",
    ]
    rows = []
    for r in payload["summary"]:
        shape = "" if r["elements"] is None else f"{r['elements']} × {r['ring_bits']}"
        ktq = "" if r["k"] is None else f"{r['k']} / {r['t']} / {r['quorum']}"
        rows.append(
            [
                r["kind"],
                r["clients"],
                r["runs"],
                r["dim"],
                shape,
                ktq,
                r["cpu_seconds"] if r["cpu_seconds"] is not None else "not run",
                r["ratio_to_plain"] if r["ratio_to_plain"] is not None else "",
                f"≤ {r['target']}×" if r["target"] else "",
                r.get("crypto_floor_cpu_seconds", ""),
                r.get("ed25519_verify_cpu_seconds", ""),
                r.get("floor_cpu_seconds", ""),
                r.get("floor_ratio_to_plain", ""),
                r.get("floor_without_defences_ratio_to_plain", ""),
                r.get("ours_to_floor") or "",
                f"{r['load'][0]:.1f}–{r['load'][1]:.1f}",
            ]
        )
    command = " ".join(["fedrlhf bench overhead --config", payload["config"], *payload.get("argv", [])])
    heading = f"### Secure aggregation overhead on MovieLens (`{command}`)"
    note = (
        "One in-process round (real u1 users, set-up excluded), process CPU seconds, kinds interleaved, median of the runs. "
        "Floor = the plain round of the same size + the CPU seconds of the protocol's required primitives, each timed in the "
        "same process (X25519, HKDF, AES-GCM, Ed25519 incl. the consistency round's n·q verifications, AES-256-CTR keystream "
        "and adds, one rounding pass; CKKS: + TenSEAL encryption and decryption per client, the server's ciphertext adds). "
        "Shamir, framing, ciphertext loading and Python are not counted, so the floor is a lower bound: "
        "where 'floor × plain' exceeds the issue target, the target cannot be met with this protocol on this machine. "
        "'without signatures': the same floor less the Ed25519 key signatures and the consistency round (semi-honest SecAgg+)."
    )
    update_section(doc, section, f"{heading}\n\n{markdown_table(headers, rows)}\n\n{note}")
