"""``fedrlhf bench dp``: what differential privacy costs on MovieLens, in time and in accuracy.

``--overhead`` (default): local training time of the same clients, non-private vs record-level
DP-SGD (Opacus: per-record clipping, noise, Poisson batches), measured side by side in one
process; target ≤ 2× per epoch. Two ratios are reported:

* ``ratio_epoch``: the training epochs of a fit, epoch for epoch: the non-private fit's shared
  phase (Adam on a compact model holding only the rated item rows) vs DP-SGD (the full item table,
  because under record-level DP the set of rated items is itself private, see
  :mod:`fedrlhf_secure.tasks.movielens.task`), each at its configured batch size;
* ``ratio_fit``: one whole ``client.fit`` each (both start with the same personal-embedding
  epochs), what a round costs a client.

``--utility``: the privacy–utility table and plot: held-out accuracy after the configured rounds
at each ε (``inf`` = non-private) for record-level and client-level DP, with plain aggregation and
with secure aggregation (SecAgg masking, distributed Skellam noise at client level). It is many
federations; ``--clients`` runs them on a seeded subset of the users (say so when quoting it).
"""

from __future__ import annotations

import argparse
import json
import math
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
        choices=["record", "client"],
        help="DP modes to measure: record (DP-SGD), client (DP-FedAvg)",
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
    rng = np.random.default_rng(0)
    ids = task.client_ids()
    picked = sorted(rng.choice(len(ids), size=min(args.overhead_clients, len(ids)), replace=False).tolist())
    batch = config.privacy.batch_size
    kinds = ("train_plain", "train_dp", "fit_plain", "fit_dp")
    rows = []
    from tqdm.auto import tqdm

    for i in tqdm(picked, desc="DP-SGD overhead", unit="client"):
        cid = ids[i]
        client = task.make_client(cid)
        n = client.num_examples()
        if n == 0:
            continue
        q = 1.0 / max(1, math.ceil(n / batch))
        dp = DPSGDSettings(noise_multiplier=1.0, max_grad_norm=config.privacy.max_grad_norm, sample_rate=q)
        times: dict[str, list[float]] = {k: [] for k in kinds}
        for rep in range(-1, args.repeats):  # rep -1 warms up (imports, allocator, Opacus hooks)
            for kind in kinds:
                t0 = time.perf_counter()
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
                elif kind == "train_dp":  # the DP fit's training epochs: Opacus on the full table
                    policy = build_policy(shared, client._dp_user_rows, None, item_scale=task.config.dp_item_scale)
                    human = KeyedHumanNoise(client._human_key, max(rep, 0))
                    train_epochs_dp(policy, client._dp_data, client.feedback_profiles, task.settings, epochs, dp, human=human)
                else:
                    client.fit(
                        shared, FitConfig(round=max(rep, 0), local_epochs=epochs, seed=max(rep, 0), dp_sgd=dp if kind == "fit_dp" else None)
                    )
                if rep >= 0:
                    times[kind].append(time.perf_counter() - t0)
        rows.append({"client": cid, "records": n, "sample_rate": q, **{f"seconds_{k}": statistics.median(v) for k, v in times.items()}})
    total = {k: sum(r[f"seconds_{k}"] for r in rows) for k in kinds}
    result = {
        "clients": len(rows),
        "records": sum(r["records"] for r in rows),
        "local_epochs": epochs,
        "dp_batch_size": batch,
        "plain_batch_size": task.settings.batch_size,
        "seconds_per_epoch_plain": total["train_plain"] / epochs,
        "seconds_per_epoch_dp": total["train_dp"] / epochs,
        "seconds_per_fit_plain": total["fit_plain"],
        "seconds_per_fit_dp": total["fit_dp"],
        "ratio_epoch": total["train_dp"] / total["train_plain"],
        "ratio_fit": total["fit_dp"] / total["fit_plain"],
        "median_client_ratio_epoch": statistics.median(r["seconds_train_dp"] / r["seconds_train_plain"] for r in rows),
        "torch_threads": torch.get_num_threads(),
        "per_client": rows,
    }
    path = write_json(args.json or Path("bench/dp.json"), {"config": args.config, "overrides": args.overrides, "overhead": result})
    table = markdown_table(
        [
            "clients",
            "records",
            "batch (plain / DP)",
            "s/epoch non-private",
            "s/epoch DP-SGD",
            "DP / non-private per epoch",
            "s/fit non-private",
            "s/fit DP",
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
                total["fit_plain"],
                total["fit_dp"],
                result["ratio_fit"],
                "≤ 2× per epoch",
            ]
        ],
    )
    body = (
        _section_header("DP-SGD overhead per local epoch (`fedrlhf bench dp`)", args)
        + table
        + (
            f"\n\nSame clients, same process, median of {args.repeats} repetitions per client. *Per epoch*: the "
            f"training epochs of a fit ({epochs} per round), non-private (Adam on the compact model holding the client's "
            "rated item rows, the non-private fit's shared phase) vs DP-SGD (Opacus ghost clipping, Poisson batches, "
            "noise on the full item table, because under record-level DP the rated set is itself private). *Per fit*: "
            "a whole `client.fit` of one round, both including the personal-embedding epochs every fit starts with.\n"
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
    ],
    "record": [],
}
"""Utility levers (issue 13) the grid applies per DP mode unless ``--no-levers``: all are free in
privacy (post-processing of the released mean, or a change inside the one clipped vector each
client already releases), so the ledger and the ε printed are those of the plain mechanism."""


def _run_overrides(mode: str, eps: float, aggregation: str, delta: float, levers: bool = True) -> list[str]:
    out = [f"aggregation.kind={aggregation}"]
    if math.isinf(eps):
        return [*out, "privacy.mode=none"]
    out += [f"privacy.mode={mode}", f"privacy.epsilon={eps}", f"privacy.delta={delta}"]
    if mode == "client":
        out += ["federation.weighting=uniform", "privacy.noise=distributed", "privacy.accountant=rdp"]
    if levers:
        out += USER_LEVEL_LEVERS.get(mode, [])
    return out


def _utility(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..federation.engine import RunOptions, run_federation

    base = list(args.overrides) + ([f"task.num_clients={args.clients}"] if args.clients else [])
    results: list[dict[str, Any]] = []
    grid = []
    for aggregation in args.aggregations:
        for eps in args.epsilons:
            for mode in args.modes if not math.isinf(eps) else ["none"]:
                grid.append((aggregation, eps, mode))
    for aggregation, eps, mode in grid:
        overrides = base + _run_overrides(mode, eps, aggregation, args.delta, args.levers)
        config = load_config(args.config, overrides)
        if mode == "client" and aggregation != "plain":
            overrides += _headroom(config)
            config = load_config(args.config, overrides)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            path = run_federation(config, RunOptions(data_dir=args.data_dir, out=Path(tmp), progress=True))
            summary = json.loads((path / "summary.json").read_text())
        res = {
            "aggregation": aggregation,
            "mode": mode,
            "epsilon_target": eps,
            "epsilon_spent": summary["privacy"].get("epsilon_spent_max"),
            "heldout_accuracy": summary["final"].get("heldout_accuracy"),
            "rounds": summary["rounds_completed"],
            "clients": summary["num_clients"],
            "seconds": time.perf_counter() - t0,
            "overrides": overrides,
        }
        results.append(res)
        print(json.dumps(res))
    path = write_json(
        args.json or Path(f"bench/{(args.section or 'dp-utility').replace('-', '_')}.json"),
        {"config": args.config, "overrides": base, "delta": args.delta, "results": results},
    )
    plot = _plot(results, path.with_suffix(".png"))
    header = ["aggregation", "DP"] + [("∞ (non-private)" if math.isinf(e) else f"ε={e:g}") for e in args.epsilons]
    rows = []
    for aggregation in args.aggregations:
        for mode in args.modes:
            row = [aggregation, mode]
            for e in args.epsilons:
                want = "none" if math.isinf(e) else mode
                hit = [r for r in results if r["aggregation"] == aggregation and r["mode"] == want and r["epsilon_target"] == e]
                row.append(hit[0]["heldout_accuracy"] if hit else "-")
            rows.append(row)
    clients = results[0]["clients"] if results else 0
    body = (
        _section_header("Privacy–utility on ML-100k u1 (`fedrlhf bench dp --utility`)", args)
        + markdown_table(header, rows)
        + (
            f"\n\nHeld-out accuracy after {results[0]['rounds'] if results else '?'} rounds, {clients} clients"
            f"{' (seeded subset: ' + str(args.clients) + ' users)' if args.clients else ''}, δ={args.delta:g}. Record level: Opacus "
            "DP-SGD, σ calibrated per client over all rounds (PRV unless overridden). Client level: DP-FedAvg, uniform weights, "
            "distributed noise (Gaussian shares with plain aggregation, Skellam shares in the quantised domain under SecAgg). "
            + _levers_note(args.levers, args.modes)
            + f"ε spent (ledger, max over clients): {_spent_note(results)}. Plot: `{plot}`.\n"
        )
    )
    _update_doc(args.doc, args.section or "dp-utility", body)
    print(markdown_table(header, rows))
    print(f"results: {path}, plot: {plot}")
    return 0


def _levers_note(levers: bool, modes: list[str]) -> str:
    if not levers:
        return "No utility levers (`--no-levers`). "
    used = {m: USER_LEVEL_LEVERS.get(m, []) for m in modes}
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


def _plot(results: list[dict[str, Any]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    finite = sorted({r["epsilon_target"] for r in results if not math.isinf(r["epsilon_target"])})
    for aggregation in sorted({r["aggregation"] for r in results}):
        base = [r for r in results if r["aggregation"] == aggregation and r["mode"] == "none"]
        if base:
            ax.axhline(
                base[0]["heldout_accuracy"],
                ls=":",
                color="grey" if aggregation == "plain" else "black",
                lw=1,
                label=f"non-private ({aggregation})",
            )
        for mode, marker in (("record", "o"), ("client", "s")):
            pts = sorted(
                (r["epsilon_target"], r["heldout_accuracy"]) for r in results if r["aggregation"] == aggregation and r["mode"] == mode
            )
            if pts:
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    marker=marker,
                    ls="-" if aggregation == "plain" else "--",
                    label=f"{mode}-level, {aggregation}",
                )
    ax.set_xscale("log", base=2)
    if finite:
        ax.set_xticks(finite, [f"{e:g}" for e in finite])
    ax.set_xlabel("ε (δ fixed)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("MovieLens FedRLHF: privacy vs utility")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _section_header(title: str, args: argparse.Namespace) -> str:
    return f"### {title}\n\nConfig `{args.config}` {' '.join('--set ' + o for o in args.overrides)}\n\n"


def _update_doc(doc: Path | None, name: str, body: str) -> None:
    update_section(doc, name, body)
