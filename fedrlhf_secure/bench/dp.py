"""``fedrlhf bench dp``: what differential privacy costs on MovieLens, in time and in accuracy.

``--overhead`` (default): local training CPU time of the same clients, non-private vs record-level
DP-SGD (per-record clipping, noise, Poisson batches) with the configured engine
(``privacy.per_sample``, :mod:`fedrlhf_secure.privacy.per_sample`) and with Opacus as the
reference, measured side by side in one process; target ≤ 2× per epoch. Ratios reported:

* ``ratio_epoch``: the training epochs of a fit, epoch for epoch: the non-private fit's shared
  phase (Adam on a compact model holding only the rated item rows) vs DP-SGD (the full item table,
  because under record-level DP the set of rated items is itself private, see
  :mod:`fedrlhf_secure.tasks.movielens.task`), each at its configured batch size;
* ``ratio_epoch_opacus``: the same with Opacus (``privacy.per_sample: opacus``);
* ``ratio_fit``: one whole ``client.fit`` each (both start with the same personal-embedding
  epochs), what a round costs a client.

``--utility``: the privacy–utility table and plot: held-out accuracy after the configured rounds
at each ε (``inf`` = non-private) for record-level and client-level DP, with plain aggregation and
with secure aggregation (SecAgg masking, distributed Skellam noise at client level). It is many
federations; ``--clients`` runs them on a seeded subset of the users (say so when quoting it).

A grid row is a *variant*: a DP mode plus config overrides. Built in: ``record``, ``client`` and
``client-adaptive`` (client level with adaptive quantile clipping, :data:`ADAPTIVE_CLIP`);
``--variant LABEL=MODE[:key=value;key=value...]`` adds one (say, a record-level mechanism a config
key selects), and ``--modes`` picks which run. ``--merge`` rebuilds the table and plot from saved
result files (grids run separately, e.g. in parallel) without running anything.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from ..commands.options import add_overrides
from .report import markdown_table, update_section, write_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="configs/movielens.yaml", help="run config the benchmark measures (default configs/movielens.yaml)")
    add_overrides(p)
    p.add_argument("--data-dir", type=Path, default=None, help="datasets directory (default: $FEDRLHF_DATA_DIR)")
    p.add_argument("--utility", action="store_true", help="run the privacy-utility grid instead of the overhead benchmark")
    p.add_argument("--clients", type=int, default=None, help="utility: seeded subset of this many clients (default: all)")
    p.add_argument(
        "--epsilons",
        nargs="+",
        type=float,
        default=[1.0, 2.0, 4.0, 8.0, math.inf],
        help="ε budgets of the privacy-utility table (inf: no noise)",
    )
    p.add_argument(
        "--modes",
        nargs="+",
        default=["record", "client"],
        help="grid variants to measure: record (DP-SGD), client (DP-FedAvg), client-adaptive (DP-FedAvg with adaptive "
        "quantile clipping), or a label given with --variant",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=MODE[:KEY=VALUE;...]",
        help="utility: an extra grid variant, a DP mode (record or client) plus config overrides, e.g. "
        "'record-distributed=record:privacy.noise=distributed' (then name LABEL in --modes)",
    )
    p.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        default=None,
        help="utility: build the table and plot from these saved result files (of earlier --utility runs) instead of running",
    )
    p.add_argument("--aggregations", nargs="+", default=["plain", "secagg"], help="aggregation kinds to run each mode with")
    p.add_argument("--delta", type=float, default=1e-5, help="privacy δ of every run (default 1e-5)")
    p.add_argument(
        "--no-levers",
        dest="levers",
        action="store_false",
        help="utility: run each DP mode without the utility levers of USER_LEVEL_LEVERS (the plain mechanisms, for comparison)",
    )
    p.add_argument("--overhead-clients", type=int, default=24, help="overhead: clients timed")
    p.add_argument("--repeats", type=int, default=3, help="overhead: timed repetitions per client (median kept)")
    p.add_argument("--json", type=Path, default=None, help="default bench/dp.json or bench/dp_utility.json")
    p.add_argument("--doc", type=Path, default=None, help="also rewrite this Markdown file's section (e.g. BENCHMARKS.md; default: print)")
    p.add_argument(
        "--section",
        default=None,
        help="utility: the BENCHMARKS.md section to write (default dp-utility), "
        "so grids on different settings (say, one client per user and silos of users) can sit side by side",
    )


def run(args: argparse.Namespace) -> int:
    return _utility(args) if args.utility else _overhead(args)


# ---------------------------------------------------------------------------------------------
# DP-SGD overhead per epoch
# ---------------------------------------------------------------------------------------------


def _overhead(args: argparse.Namespace) -> int:
    """Per client, median of ``--repeats`` CPU-time measurements (``time.process_time``: torch runs
    on ``task.torch_threads`` = 1 thread here, so the process's CPU time is the work's, whatever
    else the machine runs); the ratios are sums over the clients, same process, same run."""
    import numpy as np
    import torch

    from ..config import load_config
    from ..federation.engine import build_task, resolve_data_dir
    from ..privacy.dpsgd import DPSGDSettings
    from ..tasks.base import FitConfig
    from ..tasks.movielens.feedback import KeyedHumanNoise
    from ..tasks.movielens.model import build_policy
    from ..tasks.movielens.train import _adam, _run_epochs, train_epochs_dp

    config = load_config(args.config, args.overrides)
    task = build_task(config, resolve_data_dir(args.data_dir))
    shared = task.initial_shared()
    epochs = config.federation.local_epochs
    engine = config.privacy.per_sample
    rng = np.random.default_rng(0)
    ids = task.client_ids()
    picked = sorted(rng.choice(len(ids), size=min(args.overhead_clients, len(ids)), replace=False).tolist())
    batch = config.privacy.batch_size
    kinds = ("train_plain", "train_dp", "train_dp_opacus", "fit_plain", "fit_dp")
    rows = []
    load_before = _load()
    from tqdm.auto import tqdm

    for i in tqdm(picked, desc="DP-SGD overhead", unit="client"):
        cid = ids[i]
        client = task.make_client(cid)
        n = client.num_examples()
        if n == 0:
            continue
        q = 1.0 / max(1, math.ceil(n / batch))
        dp = DPSGDSettings(noise_multiplier=1.0, max_grad_norm=config.privacy.max_grad_norm, sample_rate=q, per_sample=engine)
        times: dict[str, list[float]] = {k: [] for k in kinds}
        for rep in range(-1, args.repeats):  # rep -1 warms up (imports, allocator, Opacus hooks)
            for kind in kinds:
                t0 = time.process_time()
                if kind == "train_plain":  # the non-private fit's training epochs: compact model, shared parameters
                    policy = build_policy(shared, client._user_rows, client.local_items)
                    _run_epochs(
                        policy,
                        _adam(policy, task.settings, personal=False, shared=True),
                        client.local_data,
                        client.feedback_profiles,
                        task.settings,
                        epochs,
                        np.random.default_rng(max(rep, 0)),
                    )
                elif kind.startswith("train_dp"):  # the DP fit's training epochs: the full table
                    policy = build_policy(shared, client._dp_user_rows, None, item_scale=task.config.dp_item_scale)
                    human = KeyedHumanNoise(client._human_key, max(rep, 0))
                    train_epochs_dp(
                        policy,
                        client._dp_data,
                        client.feedback_profiles,
                        task.settings,
                        epochs,
                        dp,
                        human=human,
                        engine="opacus" if kind == "train_dp_opacus" else engine,
                    )
                else:
                    client.fit(
                        shared, FitConfig(round=max(rep, 0), local_epochs=epochs, seed=max(rep, 0), dp_sgd=dp if kind == "fit_dp" else None)
                    )
                if rep >= 0:
                    times[kind].append(time.process_time() - t0)
        rows.append({"client": cid, "records": n, "sample_rate": q, **{f"seconds_{k}": statistics.median(v) for k, v in times.items()}})
    total = {k: sum(r[f"seconds_{k}"] for r in rows) for k in kinds}
    result = {
        "clients": len(rows),
        "records": sum(r["records"] for r in rows),
        "local_epochs": epochs,
        "dp_batch_size": batch,
        "plain_batch_size": task.settings.batch_size,
        "per_sample": engine,
        "timer": "process CPU time (time.process_time)",
        "seconds_per_epoch_plain": total["train_plain"] / epochs,
        "seconds_per_epoch_dp": total["train_dp"] / epochs,
        "seconds_per_epoch_dp_opacus": total["train_dp_opacus"] / epochs,
        "seconds_per_fit_plain": total["fit_plain"],
        "seconds_per_fit_dp": total["fit_dp"],
        "ratio_epoch": total["train_dp"] / total["train_plain"],
        "ratio_epoch_opacus": total["train_dp_opacus"] / total["train_plain"],
        "ratio_fit": total["fit_dp"] / total["fit_plain"],
        "median_client_ratio_epoch": statistics.median(r["seconds_train_dp"] / r["seconds_train_plain"] for r in rows),
        "torch_threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": _load(),
        "per_client": rows,
    }
    path = write_json(args.json or Path("bench/dp.json"), {"config": args.config, "overrides": args.overrides, "overhead": result})
    table = markdown_table(
        [
            "clients",
            "records",
            "batch (plain / DP)",
            "CPU s/epoch non-private",
            f"CPU s/epoch DP-SGD ({engine})",
            "DP / non-private per epoch",
            "CPU s/epoch DP-SGD (Opacus)",
            "Opacus DP / non-private per epoch",
            "DP / non-private per fit",
            "target",
        ],
        [
            [
                result["clients"],
                result["records"],
                f"{result['plain_batch_size']} / {batch}",
                result["seconds_per_epoch_plain"],
                result["seconds_per_epoch_dp"],
                result["ratio_epoch"],
                result["seconds_per_epoch_dp_opacus"],
                result["ratio_epoch_opacus"],
                result["ratio_fit"],
                "≤ 2× per epoch",
            ]
        ],
    )
    body = (
        _section_header("DP-SGD overhead per local epoch (`fedrlhf bench dp`)", args)
        + table
        + (
            f"\n\nSame clients, same process, CPU time (`time.process_time`, torch on {result['torch_threads']} thread), median of "
            f"{args.repeats} repetitions per client, summed over the clients; load average (1/5/15 min) {load_before} before, "
            f"{result['load_average_after']} after. *Per epoch*: the training epochs of a fit ({epochs} per round), non-private "
            "(Adam on the compact model holding the client's rated item rows, the non-private fit's shared phase) vs DP-SGD "
            f"(`privacy.per_sample: {engine}`, and Opacus ghost clipping as the reference: Poisson batches, per-record clipping, "
            "noise on the full item table, because under record-level DP the rated set is itself private). *Per fit*: a whole "
            "`client.fit` of one round, both including the personal-embedding epochs every fit starts with.\n"
        )
    )
    _update_doc(args.doc, "dp", body)
    print(json.dumps({k: v for k, v in result.items() if k != "per_client"}, indent=2))
    print(f"results: {path}")
    return 0


# ---------------------------------------------------------------------------------------------
# Privacy-utility table
# ---------------------------------------------------------------------------------------------


USER_LEVEL_LEVERS: dict[str, list[str]] = {
    "client": [
        # the touch indicators take 1% of their former share of the clip norm (s² = 0.01): the model
        # delta keeps most of C; the per-item counts, 10× noisier, are floored at 10 clients
        "federation.touch_scale=0.1",
        "federation.touch_floor=10",
        # the clipped delta is still shorter than the unclipped one (median 2.48 at C = 1): a server
        # step of 2 on the released mean (post-processing) makes up part of it
        "federation.server_lr=2",
        # every round re-releases the same noised counts: divide each row by their mean over the
        # rounds so far (post-processing, 1/√(t+1) of one round's count noise; federation/server_optimizer.py)
        "federation.server_optimizer.average_counts=true",
    ],
    "record": [],
}
"""Utility levers (issue 13) the grid applies per DP mode unless ``--no-levers``: all are free in
privacy (post-processing of the released mean, or a change inside the one clipped vector each
client already releases), so the ledger and the ε printed are those of the plain mechanism."""


ADAPTIVE_CLIP: list[str] = [
    # Andrew et al. 2021's defaults: the median (γ = 0.5), η_C = 0.2, σ_b = (clients per round)/20,
    # starting from privacy.clip_norm; the count costs z_Δ = 1.00046 z (z = 2.852 at ε = 8, 5 rounds, RDP, replace-one)
    "privacy.adaptive_clip.target_quantile=0.5",
    "privacy.adaptive_clip.lr=0.2",
    "privacy.adaptive_clip.count_noise=47.15",
]
"""``client-adaptive``: adaptive quantile clipping (:mod:`fedrlhf_secure.privacy.adaptive_clipping`)
on top of the client-level levers. σ_b = 943/20 for one client per user (pass ``--set
privacy.adaptive_clip.count_noise=...`` for other federations)."""

RECORD_DISTRIBUTED: list[str] = [
    # distributed DP-SGD (Kairouz, Liu & Steinke 2021; fedrlhf_secure/privacy/distributed_dpsgd.py):
    # 5 rounds of 2 aggregated full-batch steps (10 noised sums, z calibrated over all 10), per-record
    # clip 0.5, the noised sum applied by server Adam (β₁ 0.5, η 0.01: post-processing)
    "federation.weighting=uniform",
    "privacy.steps_per_round=2",
    "federation.server_optimizer.kind=adam",
    "federation.server_optimizer.beta1=0.5",
    "federation.server_lr=0.01",
]
"""``record-distributed``: under ``plain`` aggregation the server adds the noise (``record_noise:
central``, a trusted server); under ``secagg``/``ckks`` the clients add Skellam/Gaussian shares
(``record_noise: distributed``) and nobody sees an un-noised sum (:func:`_run_overrides`)."""

VARIANTS: dict[str, tuple[str, list[str]]] = {
    "record": ("record", []),
    "record-distributed": ("record", RECORD_DISTRIBUTED),
    "client": ("client", []),
    "client-adaptive": ("client", ADAPTIVE_CLIP),
}
"""Grid variant label -> (DP mode, extra overrides); ``--variant`` adds to it."""


def parse_variant(spec: str) -> tuple[str, tuple[str, list[str]]]:
    """``LABEL=MODE[:key=value;key=value...]`` -> (label, (mode, overrides)); ValueError naming the problem."""
    label, sep, rest = spec.partition("=")
    mode, _, tail = rest.partition(":")
    if not sep or not label or mode not in ("record", "client"):
        raise ValueError(f"--variant {spec!r}: expected LABEL=MODE[:key=value;...] with MODE record or client")
    overrides = [o.strip() for o in tail.split(";") if o.strip()]
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"--variant {spec!r}: overrides must be key=value, got {bad}")
    return label, (mode, overrides)


def _run_overrides(
    mode: str, eps: float, aggregation: str, delta: float, levers: bool = True, variants: dict[str, tuple[str, list[str]]] | None = None
) -> list[str]:
    out = [f"aggregation.kind={aggregation}"]
    if math.isinf(eps):
        return [*out, "privacy.mode=none"]
    base, extra = (variants or VARIANTS)[mode]
    out += [f"privacy.mode={base}", f"privacy.epsilon={eps}", f"privacy.delta={delta}"]
    if base == "client":
        out += ["federation.weighting=uniform", "privacy.noise=distributed", "privacy.accountant=rdp"]
    if levers:
        out += USER_LEVEL_LEVERS.get(base, [])
    if base == "record" and any(o.startswith("privacy.steps_per_round=") for o in extra):
        # distributed DP-SGD: the noise goes where the aggregator lets it protect the sum
        if aggregation == "plain":
            out.append("privacy.record_noise=central")
        else:
            out += ["privacy.record_noise=distributed", "aggregation.clip_range=64", "aggregation.max_weight=1"]
    return out + list(extra)


def _utility(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..configtypes import ConfigError
    from ..federation.engine import RunOptions, run_federation

    variants = dict(VARIANTS)
    for spec in args.variant:
        try:
            label, variant = parse_variant(spec)
        except ValueError as exc:
            raise ConfigError(str(exc), key="--variant") from exc
        variants[label] = variant
    unknown = [m for m in args.modes if m not in variants]
    if unknown:
        raise ConfigError(f"unknown grid variant(s) {unknown}; known: {sorted(variants)} (add one with --variant)", key="--modes")
    base = list(args.overrides) + ([f"task.num_clients={args.clients}"] if args.clients else [])
    if args.merge:
        wanted = set(args.epsilons)
        return _report(args, base, [r for r in _merged(args.merge) if r["epsilon_target"] in wanted and r["mode"] in {*args.modes, "none"}])
    results: list[dict[str, Any]] = []
    grid = []
    for aggregation in args.aggregations:
        for eps in args.epsilons:
            for mode in args.modes if not math.isinf(eps) else ["none"]:
                grid.append((aggregation, eps, mode))
    for aggregation, eps, mode in grid:
        overrides = base + _run_overrides(mode, eps, aggregation, args.delta, args.levers, variants)
        config = load_config(args.config, overrides)
        if aggregation != "plain" and (config.privacy.mode == "client" or config.privacy.record_noise == "distributed"):
            overrides += _headroom(config)
            config = load_config(args.config, overrides)
        t0 = time.perf_counter()
        # not a TemporaryDirectory: an interrupted run says "continue it with --resume <its .partial>",
        # so its directory (and privacy ledger) must outlive the interruption; removed once it completed
        tmp = tempfile.mkdtemp(prefix="fedrlhf-bench-dp-")
        path = run_federation(config, RunOptions(data_dir=args.data_dir, out=Path(tmp), progress=True))
        summary = json.loads((path / "summary.json").read_text())
        shutil.rmtree(tmp, ignore_errors=True)
        res = {
            "aggregation": aggregation,
            "mode": mode,
            "epsilon_target": eps,
            "epsilon_spent": summary["privacy"].get("epsilon_spent_max"),
            "heldout_accuracy": summary["final"].get("heldout_accuracy"),
            "majority_accuracy": (summary.get("baselines") or {}).get("majority", {}).get("heldout_accuracy"),
            "clip_norms": summary["privacy"].get("clip_norms"),
            "uptime": _load(),
            "rounds": summary["rounds_completed"],
            "clients": summary["num_clients"],
            "seconds": time.perf_counter() - t0,
            "overrides": overrides,
        }
        results.append(res)
        print(json.dumps(res))
        _write_results(args, base, results)  # after every run: a grid cut short keeps what it measured
    return _report(args, base, results)


def _load() -> str:
    import os

    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _results_path(args: argparse.Namespace) -> Path:
    return args.json or Path(f"bench/{(args.section or 'dp-utility').replace('-', '_')}.json")


def _write_results(args: argparse.Namespace, base: list[str], results: list[dict[str, Any]]) -> Path:
    return write_json(_results_path(args), {"config": args.config, "overrides": base, "delta": args.delta, "results": results})


def _merged(paths: list[Path]) -> list[dict[str, Any]]:
    """The rows of several saved grids (a later file's row replaces an earlier one of the same cell)."""
    cells: dict[tuple[str, str, float], dict[str, Any]] = {}
    for p in paths:
        for r in json.loads(Path(p).read_text(encoding="utf-8"))["results"]:
            eps = math.inf if r["epsilon_target"] is None else float(r["epsilon_target"])
            cells[(r["aggregation"], r["mode"], eps)] = {"source": str(p), **r, "epsilon_target": eps}
    return list(cells.values())


def _report(args: argparse.Namespace, base: list[str], results: list[dict[str, Any]]) -> int:
    path = _write_results(args, base, results)
    plot = _plot(results, path.with_suffix(".png"), args.delta)
    epsilons = sorted({r["epsilon_target"] for r in results}, key=lambda e: (math.isinf(e), e))
    aggregations = [a for a in args.aggregations if any(r["aggregation"] == a for r in results)]
    header = ["aggregation", "DP"] + [("∞ (non-private)" if math.isinf(e) else f"ε={e:g}") for e in epsilons] + ["majority class"]
    rows = []
    for aggregation in aggregations:
        for mode in args.modes:
            row = [aggregation, mode]
            for e in epsilons:
                want = "none" if math.isinf(e) else mode
                hit = [r for r in results if r["aggregation"] == aggregation and r["mode"] == want and r["epsilon_target"] == e]
                row.append(hit[0]["heldout_accuracy"] if hit else "-")
            majority = [
                r["majority_accuracy"] for r in results if r["aggregation"] == aggregation and r.get("majority_accuracy") is not None
            ]
            row.append(majority[0] if majority else "-")
            rows.append(row)
    clients = results[0]["clients"] if results else 0
    body = (
        _section_header("Privacy–utility on ML-100k u1 (`fedrlhf bench dp --utility`)", args)
        + markdown_table(header, rows)
        + (
            f"\n\nHeld-out accuracy after {results[0]['rounds'] if results else '?'} rounds, {clients} clients"
            f"{' (seeded subset: ' + str(args.clients) + ' users)' if args.clients else ''}, δ={args.delta:g}. Record level: local "
            "DP-SGD (the `privacy.per_sample` engine: `direct` by default since 2026-12-02; rows measured earlier ran Opacus, "
            "its reference), σ calibrated per client over all rounds (PRV unless overridden). Client level: DP-FedAvg, uniform weights, "
            "distributed noise (Gaussian shares with plain aggregation, Skellam shares in the quantised domain under SecAgg). "
            + _levers_note(args.levers, args.modes)
            + _steps_note(results)
            + _clip_note(results)
            + _source_note(results)
            + f"ε spent (ledger, max over clients): {_spent_note(results)}. Plot: `{plot}`.\n"
        )
    )
    _update_doc(args.doc, args.section or "dp-utility", body)
    print(markdown_table(header, rows))
    print(f"results: {path}, plot: {plot}")
    return 0


def _source_note(results: list[dict[str, Any]]) -> str:
    """With ``--merge``: which saved grid each row comes from."""
    sources: dict[str, list[str]] = {}
    for r in results:
        if r.get("source"):
            eps = "∞" if math.isinf(r["epsilon_target"]) else f"{r['epsilon_target']:g}"
            sources.setdefault(r["source"], []).append(f"{r['mode']}/{r['aggregation']} ε={eps}")
    return ("Rows merged from: " + "; ".join(f"`{p}` ({', '.join(c)})" for p, c in sources.items()) + ". ") if sources else ""


def _steps_note(results: list[dict[str, Any]]) -> str:
    """Distributed DP-SGD rows: how many aggregations (noised gradient sums) each run took, and where its noise went."""
    cells = []
    for r in results:
        o = dict(x.split("=", 1) for x in r.get("overrides", []) if "=" in x)
        if "privacy.steps_per_round" not in o:
            continue
        steps = int(o["privacy.steps_per_round"])
        where = "central noise (trusted server)" if o.get("privacy.record_noise") == "central" else "Skellam shares (distributed)"
        cells.append(f"{r['mode']}/{r['aggregation']}: {r['rounds']} rounds × {steps} steps = {r['rounds'] * steps} aggregations, {where}")
    if not cells:
        return ""
    return (
        "Distributed DP-SGD (Kairouz, Liu & Steinke 2021; `privacy.steps_per_round`): every step is one aggregation of the "
        "clients' per-record clipped gradient sums (clip 0.5, all records), noised once for the federation, applied by server "
        "Adam before the next step; ε over all steps: " + "; ".join(cells) + ". "
    )


def _clip_note(results: list[dict[str, Any]]) -> str:
    cells = [f"{r['mode']}/{r['aggregation']}: {' → '.join(f'{c:.3g}' for c in r['clip_norms'])}" for r in results if r.get("clip_norms")]
    return ("Adaptive clip norm C_t per round (round 0 → after the last): " + "; ".join(cells) + ". ") if cells else ""


def _levers_note(levers: bool, modes: list[str]) -> str:
    if not levers:
        return "No utility levers (`--no-levers`). "
    used = {m: USER_LEVEL_LEVERS.get(VARIANTS.get(m, (m, []))[0], []) + VARIANTS.get(m, (m, []))[1] for m in modes}
    parts = [f"{m}: `{' '.join('--set ' + o for o in o_)}`" if o_ else f"{m}: none" for m, o_ in used.items()]
    return "Utility levers (post-processing or inside the clipped vector, no ledger change): " + "; ".join(parts) + ". "


def _spent_note(results: list[dict[str, Any]]) -> str:
    cells = [f"{r['mode']}/{r['aggregation']} ε={r['epsilon_target']:g}: {r['epsilon_spent']:.3f}" for r in results if r["epsilon_spent"]]
    return ", ".join(cells) if cells else "none"


def _headroom(config) -> list[str]:
    """Reserve enough masking headroom for the Skellam shares: 64-bit arithmetic and the check's own
    recommended ``noise_bound`` (iterated, since the bound changes the auto-chosen levels)."""
    import re
    from dataclasses import replace

    from ..configtypes import ConfigError
    from ..federation.aggregators import build_aggregator
    from ..privacy.factory import check_noise_headroom, integer_domain

    n = config.task.params.num_clients or 943
    params = replace(config.aggregation.params, bits=64)
    for _ in range(5):
        cfg = replace(config, aggregation=replace(config.aggregation, params=params))
        try:
            check_noise_headroom(cfg, integer_domain(build_aggregator(cfg, list(range(n)))))
            return ["aggregation.bits=64", f"aggregation.noise_bound={params.noise_bound}"]
        except ConfigError as exc:
            params = replace(params, noise_bound=int(re.search(r"noise_bound >= (\d+)", str(exc)).group(1)))
    raise RuntimeError("could not find a noise_bound that fits the masking headroom")


def _plot(results: list[dict[str, Any]], out: Path, delta: float = 1e-5) -> Path:
    """Held-out accuracy per variant: against ε (log axis) when the grid has several ε, else one bar
    per variant and aggregation; the non-private run and the majority class are drawn as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = sorted({r["epsilon_target"] for r in results if not math.isinf(r["epsilon_target"])})
    aggregations = sorted({r["aggregation"] for r in results})
    modes = sorted({r["mode"] for r in results if r["mode"] != "none"})
    styles = {a: ("-", 1.0) if a == "plain" else ("--", 0.6) for a in aggregations}
    bars_view = len(finite) <= 1
    # One ε: a horizontal bar per variant and aggregation, so long variant labels stay readable.
    fig, ax = plt.subplots(figsize=(7.5, 1.4 + 0.3 * len(modes) * max(1, len(aggregations))) if bars_view else (7, 4.2))
    line = ax.axvline if bars_view else ax.axhline
    for aggregation in aggregations:
        ls, alpha = styles[aggregation]
        base = [r for r in results if r["aggregation"] == aggregation and r["mode"] == "none"]
        if base:
            line(base[0]["heldout_accuracy"], ls=ls, color="black", lw=1, label=f"non-private ({aggregation})")
    majority = [r["majority_accuracy"] for r in results if r.get("majority_accuracy") is not None]
    if majority:
        line(majority[0], ls=":", color="red", lw=1, label="majority class")
    accs = [r["heldout_accuracy"] for r in results if r.get("heldout_accuracy") is not None] + majority
    if not bars_view:
        for aggregation in aggregations:
            for mode in modes:
                pts = sorted(
                    (r["epsilon_target"], r["heldout_accuracy"]) for r in results if r["aggregation"] == aggregation and r["mode"] == mode
                )
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ls=styles[aggregation][0], label=f"{mode}, {aggregation}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(finite, [f"{e:g}" for e in finite])
        ax.set_xlabel(f"ε per client, whole run (δ = {delta:g})")
        if accs:
            ax.set_ylim(min(accs) - 0.03, max(accs) + 0.03)
        ax.set_ylabel("held-out accuracy (fraction of u1 test pairs)")
    else:
        height = 0.8 / max(1, len(aggregations))
        for k, aggregation in enumerate(aggregations):
            ys, xs = [], []
            for i, mode in enumerate(modes):
                hit = [r["heldout_accuracy"] for r in results if r["aggregation"] == aggregation and r["mode"] == mode]
                if hit and hit[0] is not None:
                    ys.append(i + (k - (len(aggregations) - 1) / 2) * height)
                    xs.append(hit[0])
            bars = ax.barh(ys, xs, height=height, alpha=styles[aggregation][1], label=f"DP, {aggregation}")
            ax.bar_label(bars, fmt="%.4f", fontsize=7, padding=2)
        ax.set_yticks(range(len(modes)), modes, fontsize=8)
        ax.invert_yaxis()
        if accs:
            ax.set_xlim(min(accs) - 0.03, max(accs) + 0.03)
        eps = f"ε = {finite[0]:g}, " if finite else ""
        ax.set_xlabel(f"held-out accuracy (fraction of u1 test pairs); {eps}δ = {delta:g} per client, whole run")
        ax.set_ylabel("DP variant")
    ax.set_title("MovieLens u1 FedRLHF: privacy vs utility")
    ax.legend(fontsize=7, loc="lower right" if bars_view else "best")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _section_header(title: str, args: argparse.Namespace) -> str:
    return f"### {title}\n\nConfig `{args.config}` {' '.join('--set ' + o for o in args.overrides)}\n\n"


def _update_doc(doc: Path | None, name: str, body: str) -> None:
    update_section(doc, name, body)
