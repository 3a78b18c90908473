"""CKKS aggregation costs, with NVFlare's default parameters measured side by side in the same run.

:func:`measure` is what ``fedrlhf bench aggregation`` calls to add the CKKS rows to its table; run
this module directly (``python -m fedrlhf_secure.bench.ckks``) for the CKKS rows alone plus a sweep
of the data prime's size (the evidence for the default chain: the smallest that keeps the error
<= 1e-4 with room for the aggregate).

A full round is run with the real sans-IO halves, delivering each client's update to the server
as soon as it is made (as a deployment would), so memory stays at one update plus the running sum
even at n=100, d=1e6. Per-party costs are medians over ``repeats`` timings of one client's
vector; "per 1e6" figures are seconds scaled to 1e6 parameters. Wall seconds are reported with
the process's CPU seconds beside them (``*_cpu_s*``): on a machine shared with other jobs the
wall time includes waiting for a core, the CPU time is what the work itself costs (TenSEAL runs
single-threaded here).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aggregation import wire
from aggregation.base import RoundContext
from aggregation.ckks import CKKSConfig, SimulatedDealer, codec, factory
from aggregation.ckks.params import MAX_LOG_Q_128
from aggregation.driver import run_round

DEFAULT = ("ckks", CKKSConfig())
LEGACY = ("ckks-before-issue-12", CKKSConfig(coeff_mod_bit_sizes=(56, 40), scale_bits=34))
"""Today's round before issue 12 (its default parameters; no masks, check or flooding), for the overhead."""
NVFLARE = ("ckks-nvflare-default", CKKSConfig(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 40), scale_bits=40))
"""NVFlare's HE defaults, run as NVFlare runs them (issue 16): its clients hold a context made with
TenSEAL's default ``encryption_type`` (asymmetric), so ``ts.ckks_vector`` encrypts with the PUBLIC
key (a full, unseedable ciphertext); the server sums and the clients decrypt — no masks, check
slots or flooding (the round of :func:`_legacy_round`)."""


def _nvflare_contexts(config: CKKSConfig) -> tuple[Any, Any]:
    """(client context: secret + public key, encrypts with the public key; server context: public only)."""
    import tenseal as ts

    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        config.poly_modulus_degree,
        coeff_mod_bit_sizes=list(config.coeff_mod_bit_sizes),
        encryption_type=ts.ENCRYPTION_TYPE.ASYMMETRIC,
        n_threads=config.threads,
    )
    ctx.global_scale = config.scale
    server = ctx.copy()
    server.make_context_public()
    return ctx, server


def _client_input(seed: int, cid: int, d: int, uniform: bool = False) -> tuple[np.ndarray, float]:
    """A synthetic update with N(0, 1e-3^2) coordinates — the RMS of a unit-norm (clipped) update of
    1e6 parameters — weighted by an example count in 1..500, or by 1 (``uniform``, as client-level DP
    requires: the hardest realistic case for CKKS's absolute precision)."""
    rng = np.random.default_rng([seed, cid])
    vec = rng.standard_normal(d, dtype=np.float32) * np.float32(1e-3)
    return vec, 1.0 if uniform else float(rng.integers(1, 501))


def _full_round(label: str, config: CKKSConfig, n: int, d: int, seed: int, uniform: bool = False) -> dict[str, Any]:
    """One round of the shipped protocol (SecAgg+ mask round, masked ciphertexts, checked and flooded
    decryption), every message delivered as soon as it is sent, through :func:`aggregation.driver.run_round`."""
    if label == LEGACY[0]:
        return _legacy_round(config, n, d, seed, uniform)
    if label == NVFLARE[0]:
        return _legacy_round(config, n, d, seed, uniform, public_key=True)
    clients = tuple(range(n))
    inputs = {cid: _client_input(seed, cid, d, uniform) for cid in clients}
    plain_sum = sum(w * vec.astype(np.float64) for vec, w in inputs.values())
    plain_w = sum(w for _, w in inputs.values())
    t_round, c_round = time.perf_counter(), time.process_time()
    agg = factory(config, clients, seed)
    out = run_round(agg, RoundContext(os.urandom(16), 0, clients, d), inputs)
    seconds, cpu_seconds = time.perf_counter() - t_round, time.process_time() - c_round
    assert out.server_result is None
    res = out.client_results[0]
    return _round_row(res.average, plain_sum / plain_w, seconds, cpu_seconds, out.stats.server_seconds,
                      sum(out.stats.client_seconds.values()), list(out.stats.bytes_up.values()),
                      max(out.stats.bytes_down.values()), d)  # fmt: skip


def _round_row(avg, plain_avg, seconds, cpu_seconds, t_server, t_client, up_bytes, down_bytes, d) -> dict[str, Any]:
    return {
        "round_s": seconds,
        "round_cpu_s": cpu_seconds,
        "round_server_s": t_server,
        "round_clients_s": t_client,
        "rel_error": float(np.linalg.norm(avg - plain_avg) / np.linalg.norm(plain_avg)),
        "max_abs_error": float(np.max(np.abs(avg - plain_avg))),
        "bytes_up_per_client": float(np.mean(up_bytes)),
        "bytes_down_per_client": float(down_bytes),
        "expansion_vs_float32": float(np.mean(up_bytes)) / (4.0 * d),
    }


def _legacy_round(config: CKKSConfig, n: int, d: int, seed: int, uniform: bool = False, *, public_key: bool = False) -> dict[str, Any]:
    """The CKKS round as it was before issue 12 (commit b46270a), re-enacted with the same codec and
    wire code: each client encrypts ``[w x, w]`` and sends it in one frame, the server parses, checks
    and adds the ciphertexts and sends the sum back, each client parses and decrypts it — no mask
    round, no check slots, no flooding (and the decryption oracle of issue 12 open).

    ``public_key``: NVFlare's way — every client encrypts with the shared context's public key
    (:func:`_nvflare_contexts`; full ciphertexts) instead of the dealer's symmetric key."""
    clients = tuple(range(n))
    session, t_client, t_server, up_bytes = os.urandom(16), 0.0, 0.0, []
    plain_sum, plain_w = np.zeros(d), 0.0
    t_round, c_round = time.perf_counter(), time.process_time()
    if public_key:
        client_ctx, server_ctx = _nvflare_contexts(config)

        def context_of(_cid: int):
            return client_ctx

        header = {"round": 0, "session": session.hex(), "key_id": "nvflare"}
    else:
        dealer = SimulatedDealer(config, list(clients))
        dealer.deal_ahead([0])
        server_ctx = dealer.public(0).load(config)

        def context_of(cid: int):
            return dealer.client_key(cid, 0).context

        header = {"round": 0, "session": session.hex(), "key_id": dealer.public(0).key_id.hex()}
    acc = None
    for cid in clients:
        vec, w = _client_input(seed, cid, d, uniform)
        plain_sum += w * vec.astype(np.float64)
        plain_w += w
        t0 = time.perf_counter()
        data, lengths = codec.join(codec.encrypt(np.append(w * vec.astype(np.float64), w), context_of(cid), config, seeded=not public_key))
        update = wire.encode(wire.Frame("ckks/update", header, {"ciphertexts": data, "lengths": lengths}))
        t1 = time.perf_counter()
        frame = wire.decode(update, expect="ckks/update")
        blobs = codec.split(frame.tensors["ciphertexts"], frame.tensors["lengths"], config, d + 1)
        chunks = codec.load_chunks(blobs, server_ctx, config, d + 1)
        if acc is None:
            acc = chunks
        else:
            for a, c in zip(acc, chunks, strict=True):
                a.add_(c)
        t_client, t_server = t_client + t1 - t0, t_server + time.perf_counter() - t1
        up_bytes.append(len(update))
    t0 = time.perf_counter()
    data, lengths = codec.join([c.serialize() for c in acc])
    aggregate = wire.encode(
        wire.Frame("ckks/aggregate", {**header, "contributors": list(clients)}, {"ciphertexts": data, "lengths": lengths})
    )
    t_server += time.perf_counter() - t0
    for cid in clients:
        t0 = time.perf_counter()
        frame = wire.decode(aggregate, expect="ckks/aggregate")
        blobs = codec.split(frame.tensors["ciphertexts"], frame.tensors["lengths"], config, d + 1)
        values = codec.decrypt(codec.load_chunks(blobs, context_of(cid), config, d + 1))
        t_client += time.perf_counter() - t0
    seconds, cpu_seconds = time.perf_counter() - t_round, time.process_time() - c_round
    return _round_row(values[:d] / values[d], plain_sum / plain_w, seconds, cpu_seconds, t_server, t_client, up_bytes, len(aggregate), d)


class _PartyTimer:
    """One client's vector under one parameter set, ready to time encrypt / server add / decrypt."""

    def __init__(self, config: CKKSConfig, d: int, seed: int, *, public_key: bool = False) -> None:
        self.config, self.d, self.seeded = config, d, not public_key
        if public_key:  # NVFlare: encrypt with the public key of a shared asymmetric context
            self.client_ctx, self.server_ctx = _nvflare_contexts(config)
        else:
            agg = factory(config, tuple(range(10)), seed)  # keys only; the mask round needs enough clients for its bounds
            self.client_ctx = agg.keys.client_key(0, 0).context
            self.server_ctx = agg.keys.public(0).load(config)
        vec, w = _client_input(seed, 0, d)
        self.payload = np.append(w * vec.astype(np.float64), w)
        self.blobs = codec.encrypt(self.payload, self.client_ctx, config, seeded=self.seeded)
        self.acc = codec.load_chunks(self.blobs, self.server_ctx, config, d + 1)
        self.times: dict[str, list[float]] = {"encrypt": [], "aggregate": [], "decrypt": []}
        self.cpu: dict[str, list[float]] = {"encrypt": [], "aggregate": [], "decrypt": []}

    def encrypt(self) -> None:
        codec.encrypt(self.payload, self.client_ctx, self.config, seeded=self.seeded)

    def aggregate(self) -> None:
        for a, c in zip(self.acc, codec.load_chunks(self.blobs, self.server_ctx, self.config, self.d + 1), strict=False):
            a.add_(c)

    def decrypt(self) -> None:
        codec.decrypt(codec.load_chunks(self.blobs, self.client_ctx, self.config, self.d + 1))

    def medians_per_1e6(self) -> dict[str, float]:
        scale = 1e6 / self.d
        out = {f"{k}_s_per_1e6": statistics.median(v) * scale for k, v in self.times.items()}
        out.update({f"{k}_cpu_s_per_1e6": statistics.median(v) * scale for k, v in self.cpu.items()})
        return out


def _per_party(configs: Sequence[tuple[str, CKKSConfig]], d: int, seed: int, repeats: int) -> dict[str, dict[str, float]]:
    """Medians for one client's vector, the parameter sets interleaved so machine load hits them alike."""
    timers = {label: _PartyTimer(cfg, d, seed, public_key=label == NVFLARE[0]) for label, cfg in configs}
    for _ in range(repeats):
        for timer in timers.values():
            for stage in ("encrypt", "aggregate", "decrypt"):
                c0, t0 = time.process_time(), time.perf_counter()
                getattr(timer, stage)()
                timer.times[stage].append(time.perf_counter() - t0)
                timer.cpu[stage].append(time.process_time() - c0)
    return {label: t.medians_per_1e6() for label, t in timers.items()}


def _params_row(label: str, config: CKKSConfig, n: int, d: int) -> dict[str, Any]:
    return {
        "mode": label,
        "n": n,
        "d": d,
        "poly_modulus_degree": config.poly_modulus_degree,
        "coeff_mod_bit_sizes": list(config.coeff_mod_bit_sizes),
        "scale_bits": config.scale_bits,
        "log_q": config.log_q,
        "log_q_bound_128": MAX_LOG_Q_128[config.poly_modulus_degree],
    }


def measure(
    n: int, d: int, *, repeats: int = 5, round_repeats: int | None = None, seed: int = 0, include_nvflare: bool = True
) -> dict[str, Any]:
    """CKKS rows for ``fedrlhf bench aggregation``: the shipped round, the round before issue 12 (no
    masks, check or flooding: the overhead of the defences) and NVFlare's parameters, one run.

    Returns ``{"rows": [row, ...]}``; each row has ``mode``, ``n``, ``d``, the parameter set,
    ``expansion_vs_float32``, ``bytes_up_per_client``, ``bytes_down_per_client``, ``rel_error``,
    ``encrypt_s_per_1e6``, ``aggregate_s_per_1e6``, ``decrypt_s_per_1e6`` (medians of ``repeats``
    interleaved timings), ``round_s`` (median of ``round_repeats`` full in-process rounds, the n
    clients run one after another in one process; default 3 when n*d <= 1e7, else 1),
    ``round_server_s`` and ``round_clients_s`` (that round's time in the server / client halves).
    """
    configs = [DEFAULT, LEGACY] + ([NVFLARE] if include_nvflare else [])
    per = _per_party(configs, min(d, 1_000_000), seed, repeats)
    round_repeats = round_repeats or (3 if n * d <= 10_000_000 else 1)
    rounds: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in configs}
    for _ in range(round_repeats):
        for label, cfg in configs:
            rounds[label].append(_full_round(label, cfg, n, d, seed))
    rows = []
    for label, cfg in configs:
        runs = sorted(rounds[label], key=lambda r: r["round_s"])
        row = _params_row(label, cfg, n, d)
        row.update(per[label])
        row.update(runs[len(runs) // 2])
        row["round_repeats"] = round_repeats
        rows.append(row)
    return {"rows": rows}


def sweep(d: int, *, n: int = 10, seed: int = 0, data_bits: Sequence[int] = (44, 48, 52, 56, 60)) -> list[dict[str, Any]]:
    """Expansion and error against the data prime's size, uniform weights (scale = data bits - 22: 2^21 headroom)."""
    rows = []
    for bits in data_bits:
        special = min(60, MAX_LOG_Q_128[4096] - bits)
        cfg = CKKSConfig(coeff_mod_bit_sizes=(bits, special), scale_bits=bits - 22)
        r = _full_round(f"q{bits}", cfg, n, d, seed, uniform=True)
        rows.append(
            {
                "coeff_mod_bit_sizes": [bits, special],
                "scale_bits": cfg.scale_bits,
                "headroom": 2.0**21,
                "expansion_vs_float32": r["expansion_vs_float32"],
                "rel_error": r["rel_error"],
            }
        )
    return rows


def serialisation_options(d: int = 100_000, *, config: CKKSConfig | None = None, repeats: int = 5, seed: int = 0) -> list[dict[str, Any]]:
    """Bytes and CPU of each way TenSEAL can put one client's encrypted vector of ``d`` values on the wire.

    Measured (medians of ``repeats``, process CPU seconds scaled to 1e6 values): the shipped seeded
    symmetric ciphertexts (:func:`codec.encrypt`), TenSEAL's own ``CKKSVector.serialize`` of a
    symmetric ciphertext, and public-key encryption as NVFlare does it, all at ``config`` (the
    default parameters). 'load' is the receiver's work: the structural checks, SEAL's zstd inflate
    (and seed expansion), deserialization. TenSEAL offers no other choice: ``serialize`` and
    ``save`` take no compression argument (SEAL's default, zstd, every time). Then the floors,
    computed: polynomial data bit-packed at the data primes' width, both polynomials (full) and one
    plus the 64-byte seed (seeded).
    """
    config = config or DEFAULT[1]
    x = np.random.default_rng(seed).standard_normal(d) * 1e-3
    agg = factory(config, tuple(range(10)), seed)
    sym_ctx, sym_server = agg.keys.client_key(0, 0).context, agg.keys.public(0).load(config)
    pk_ctx, pk_server = _nvflare_contexts(config)
    options = [
        ("seeded symmetric (shipped: sealapi encrypt_symmetric, saved with its seed)", sym_ctx, sym_server, True),
        ("full symmetric (TenSEAL CKKSVector.serialize)", sym_ctx, sym_server, False),
        ("full public-key (NVFlare's way; cannot be seeded)", pk_ctx, pk_server, False),
    ]
    rows = []
    scale = 1e6 / d
    for label, ctx, server, seeded in options:
        enc, load = [], []
        blobs: list[bytes] = []
        for _ in range(repeats):
            c0 = time.process_time()
            blobs = codec.encrypt(x, ctx, config, seeded=seeded)
            enc.append(time.process_time() - c0)
            c0 = time.process_time()
            codec.load_chunks(blobs, server, config, d)
            load.append(time.process_time() - c0)
        rows.append(
            {
                "option": label,
                "expansion_vs_float32": sum(map(len, blobs)) / (4.0 * d),
                "encrypt_cpu_s_per_1e6": statistics.median(enc) * scale,
                "load_cpu_s_per_1e6": statistics.median(load) * scale,
            }
        )
    chunks = config.chunks(d)
    bits = sum(config.coeff_mod_bit_sizes[: config.data_primes])
    packed = chunks * 2 * config.poly_modulus_degree * bits / 8
    rows.append({"option": f"floor: full ciphertext bit-packed ({bits}-bit data modulus)", "expansion_vs_float32": packed / (4.0 * d)})
    seeded_packed = packed / 2 + 64 * chunks
    rows.append({"option": "floor: seeded ciphertext bit-packed (c0 + 64-byte seed)", "expansion_vs_float32": seeded_packed / (4.0 * d)})
    return rows


SERIALISATION_HEADERS = ("serialisation", "expansion ×f32", "encrypt CPU s/1e6", "load CPU s/1e6")


def serialisation_table_rows(rows: Sequence[dict[str, Any]]) -> list[list[Any]]:
    return [
        [r["option"], r["expansion_vs_float32"], r.get("encrypt_cpu_s_per_1e6", "(computed)"), r.get("load_cpu_s_per_1e6", "")]
        for r in rows
    ]


TABLE_HEADERS = (
    "mode",
    "N",
    "primes",
    "scale",
    "n",
    "d",
    "expansion ×f32",
    "rel. error",
    "enc s/1e6 (cpu)",
    "agg s/1e6 (cpu)",
    "dec s/1e6 (cpu)",
    "round s (cpu)",
)


def table_rows(rows: Sequence[dict[str, Any]]) -> list[list[Any]]:
    return [
        [
            r["mode"],
            r["poly_modulus_degree"],
            str(r["coeff_mod_bit_sizes"]),
            f"2^{r['scale_bits']}",
            r["n"],
            r["d"],
            r["expansion_vs_float32"],
            r["rel_error"],
        ]
        + [f"{r[f'{k}_s_per_1e6']:.3g} ({r[f'{k}_cpu_s_per_1e6']:.3g})" for k in ("encrypt", "aggregate", "decrypt")]
        + [f"{r['round_s']:.3g} ({r['round_cpu_s']:.3g})"]
        for r in rows
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--d", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-nvflare", action="store_true", help="skip the NVFlare-default reference rows")
    parser.add_argument("--nvflare-max-n", type=int, default=10, help="NVFlare reference rows only for n up to this")
    parser.add_argument("--sweep-d", type=int, default=200_000, help="vector size of the data-prime sweep (0: skip)")
    parser.add_argument("--serialisation-d", type=int, default=200_000, help="vector size of the serialisation comparison (0: skip)")
    parser.add_argument("--out", type=Path, default=Path("bench/ckks.json"))
    parser.add_argument("--doc", type=Path, default=None, help="also rewrite this Markdown file's ckks section (default: print the table)")


def _plot_sweep(swept: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["expansion_vs_float32"] for r in swept], [r["rel_error"] for r in swept], "o-")
    for r in swept:
        ax.annotate(f"q={r['coeff_mod_bit_sizes'][0]} bits", (r["expansion_vs_float32"], r["rel_error"]), fontsize=8)
    ax.axhline(1e-4, color="grey", ls="--", lw=1, label="1e-4 target")
    ax.set_yscale("log")
    ax.set_xlabel("ciphertext expansion vs float32")
    ax.set_ylabel("relative error of the average")
    ax.set_title("CKKS data prime (N=4096, headroom 2^21)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .report import markdown_table, update_section, write_json

    rows = []
    for n in tqdm(args.n, desc="ckks bench", unit="n"):
        nvflare = not args.no_nvflare and n <= args.nvflare_max_n
        rows += measure(n, args.d, repeats=args.repeats, include_nvflare=nvflare)["rows"]
    swept = sweep(args.sweep_d) if args.sweep_d else []
    serial = serialisation_options(args.serialisation_d, repeats=args.repeats) if args.serialisation_d else []
    load = list(os.getloadavg())
    write_json(args.out, {"rows": rows, "sweep": swept, "serialisation": serial, "loadavg_at_end": load})
    parts = [
        "### CKKS aggregation (`python -m fedrlhf_secure.bench.ckks`)",
        "",
        "Default parameters and NVFlare's (N=8192, [60,40,40], 2^40) in one run, per-party timings interleaved; "
        "medians of the per-party timings; wall seconds with process CPU seconds in brackets (a shared machine "
        "inflates wall time). 'round s' runs every client and the server in one process, one after another. "
        "The NVFlare row runs NVFlare's round (no masks, check slots or flooding) with its clients encrypting "
        f"under the public key, as NVFlare does. Load average (1, 5, 15 min) at the end: {', '.join(f'{v:.1f}' for v in load)}.",
        "",
        markdown_table(TABLE_HEADERS, table_rows(rows)),
    ]
    if serial:
        parts += [
            "",
            f"Serialisation options at the default parameters (d={args.serialisation_d}, medians of {args.repeats}, process CPU):",
            "",
            markdown_table(SERIALISATION_HEADERS, serialisation_table_rows(serial)),
        ]
    if swept:
        _plot_sweep(swept, args.out.with_name("ckks_sweep.png"))
        parts += [
            "",
            f"Data-prime sweep (n=10, d={args.sweep_d}, uniform weights, clipped-size updates, headroom 2^21):",
            "",
            markdown_table(
                ("primes", "scale", "expansion ×f32", "rel. error"),
                [[str(r["coeff_mod_bit_sizes"]), f"2^{r['scale_bits']}", r["expansion_vs_float32"], r["rel_error"]] for r in swept],
            ),
        ]
    body = "\n".join(parts)
    update_section(args.doc, "ckks", body)
    print(body)
    print(f"wrote {args.out} and the 'ckks' section of {args.doc}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="CKKS aggregation benchmark (fedrlhf bench aggregation includes its small cells)")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
