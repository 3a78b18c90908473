"""``fedrlhf bench flower``: per-round cost of the Flower transport against the in-process engine.

Same config (a synthetic ``vector`` task: ``n`` clients, one shared vector of ``d`` floats, local
"training" is a seeded draw, so the task costs nothing), same seed, measured side by side:

* **engine**: the embedded default, every client in this process (:mod:`aggregation.driver`);
* **node protocol**: the deployment's server loop and client hosts, linked by direct calls —
  what the per-node framing and staging cost without a network;
* **Flower**: a TLS SuperLink with authenticated SuperNodes on loopback, ``flwr run``.

The overhead is the difference of the per-round medians (and their ratio); the Flower column
includes a fresh ``flwr-clientapp`` process per message and node, which is how flwr 1.42 runs
ClientApps.

Each Flower exchange is split into where its time went (:func:`~fedrlhf_secure.transport.server_app.exchange_timing`,
written by the ServerApp to ``flower_timing.json`` in the run directory): the ServerApp's push,
the wait until Flower started the node's ClientApp process (the SuperNode's idle poll and the
SuperExec's task poll), that process's start-up, our compute (relay to the client host and its
work), and the way back; medians over the run's exchanges, for the node that answered last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from .report import markdown_table, update_section, write_json

MODULE = "fedrlhf_secure.bench.vector_task"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clients", type=int, default=10, help="clients per round (default 10)")
    p.add_argument("--dim", type=int, default=100_000, help="parameters per update (default 100000)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per measurement (default 3)")
    p.add_argument("--nodes", type=int, default=3, help="SuperNodes the clients are spread over (round-robin, default 3)")
    p.add_argument(
        "--modes", nargs="+", default=["plain", "secagg"], choices=["plain", "secagg"], help="aggregations to measure over Flower"
    )
    p.add_argument("--json", type=Path, default=Path("bench/flower.json"), help="where the JSON results go (default bench/flower.json)")
    p.add_argument("--doc", type=Path, default=None, help="also rewrite this Markdown file's section (e.g. BENCHMARKS.md; default: print)")


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


PARTS = ("push", "node_poll", "process_start", "compute", "return")


def breakdown(run: Path) -> dict:
    """Medians over the run's Flower exchanges (setup included) of each part of an exchange, in seconds."""
    from ..transport.server_app import TIMING_FILE

    exchanges = json.loads((run / TIMING_FILE).read_text())["exchanges"]
    out: dict = {"exchanges": len(exchanges), "wall": statistics.median(e["wall"] for e in exchanges)}
    for part in PARTS:
        values = [e[part] for e in exchanges if part in e]
        out[part] = statistics.median(values) if values else None
    return out


def run(args: argparse.Namespace) -> int:
    import importlib

    import yaml

    importlib.import_module(MODULE)
    from ..config import load_config
    from ..federation.engine import RunOptions, run_federation, run_remote_federation
    from ..federation.links import InProcessLink
    from ..federation.participant import ParticipantHost
    from ..federation.policy import NodePolicy
    from ..progress import bar as progress_bar
    from ..transport.local_deployment import LocalDeployment, partition

    results = []
    load_start = os.getloadavg()[0]  # the machine may be shared: its load belongs beside the timings
    with tempfile.TemporaryDirectory(prefix="fedrlhf-bench-flower-") as tmp_s:
        tmp = Path(tmp_s)
        groups = partition(list(range(args.clients)), args.nodes)
        bar = progress_bar(3 * len(args.modes), "bench flower", "run")
        t0 = time.perf_counter()
        # the operator's own nodes: their policy admits exactly the modes being measured
        policy = NodePolicy(aggregation=tuple(args.modes))
        with LocalDeployment(tmp / "deployment", groups, task_modules=[MODULE], policy=policy) as dep:
            startup = time.perf_counter() - t0
            for mode in args.modes:
                raw = {
                    "seed": 0,
                    "task": {"kind": "vector", "clients": args.clients, "dim": args.dim},
                    "federation": {"rounds": args.rounds, "local_epochs": 1, "min_clients": 2, "sparse_rows": "all"},
                    "aggregation": {"kind": mode},
                }
                path = tmp / f"{mode}.yaml"
                path.write_text(yaml.safe_dump(raw), encoding="utf-8")
                config = load_config(path)
                bar.set_postfix_str(f"{mode}: engine")
                engine = _rows(run_federation(config, RunOptions(out=tmp / f"engine-{mode}", progress=False)))
                bar.update(1)
                bar.set_postfix_str(f"{mode}: node protocol")
                hosts = {i: ParticipantHost(g, None, policy=policy) for i, g in enumerate(groups)}
                nodes = _rows(
                    run_remote_federation(
                        config, InProcessLink(hosts), dict(enumerate(groups)), RunOptions(out=tmp / f"nodes-{mode}", progress=False)
                    )
                )
                bar.update(1)
                bar.set_postfix_str(f"{mode}: Flower")
                flower_run = dep.run(path, tmp / f"flower-{mode}", stage_timeout=300.0, timeout=3000)
                flower = _rows(flower_run)
                split = breakdown(flower_run)
                bar.update(1)
                e = statistics.median(r["seconds"] for r in engine)
                n = statistics.median(r["seconds"] for r in nodes)
                f = statistics.median(r["seconds"] for r in flower)
                res = {
                    "mode": mode,
                    "clients": args.clients,
                    "dim": args.dim,
                    "supernodes": args.nodes,
                    "rounds": args.rounds,
                    "engine_s_per_round": e,
                    "node_protocol_s_per_round": n,
                    "flower_s_per_round": f,
                    "flower_overhead_s_per_round": f - e,
                    "flower_over_engine": f / e,
                    "flower_stages_per_round": statistics.median(r["transport_stages"] for r in flower) + 1,
                    "flower_payload_bytes_per_round": statistics.median(r["transport_envelope_bytes"] for r in flower),
                    "bytes_up_per_client": flower[-1]["bytes_up_per_client"],
                    "flower_exchange_s": split,
                    "engine_rounds_s": [r["seconds"] for r in engine],
                    "flower_rounds_s": [r["seconds"] for r in flower],
                }
                results.append(res)
                print(json.dumps({k: v for k, v in res.items() if not k.endswith("rounds_s")}))
        bar.close()
    load = f"{load_start:.1f} → {os.getloadavg()[0]:.1f}"
    write_json(args.json, {"deployment_startup_s": startup, "load_average_1min": load, "results": results})
    write_report(args.doc, results, startup, load)
    print(f"results: {args.json}" + (f" and {args.doc}" if args.doc else ""))
    return 0


def write_report(doc: Path | None, results: list[dict], startup: float, load: str = "not recorded") -> None:
    """The ``flower`` section of BENCHMARKS.md from this benchmark's results."""
    rows = [
        [
            r["mode"],
            r["clients"],
            r["dim"],
            r["supernodes"],
            r["engine_s_per_round"],
            r["node_protocol_s_per_round"],
            r["flower_s_per_round"],
            r["flower_overhead_s_per_round"],
            r["flower_over_engine"],
            r["flower_stages_per_round"],
            r["flower_payload_bytes_per_round"],
        ]
        for r in results
    ]
    split_rows = [
        [r["mode"], r["flower_exchange_s"]["exchanges"], r["flower_exchange_s"]["wall"], *(r["flower_exchange_s"][p] for p in PARTS)]
        for r in results
    ]
    split_table = markdown_table(
        [
            "mode",
            "exchanges in run",
            "exchange wall s",
            "ServerApp push s",
            "node poll + SuperExec s",
            "ClientApp process start s",
            "our compute s",
            "reply back s",
        ],
        split_rows,
    )
    table = markdown_table(
        [
            "mode",
            "clients",
            "d",
            "SuperNodes",
            "engine s/round",
            "node protocol s/round",
            "Flower s/round",
            "Flower overhead s/round",
            "Flower / engine",
            "Flower exchanges/round",
            "node-frame bytes/round (fit + aggregation)",
        ],
        rows,
    )
    rounds = results[0]["rounds"] if results else 0
    nodes = results[0]["supernodes"] if results else 0
    body = (
        f"### Flower transport vs in-process (`fedrlhf bench flower`)\n\n{table}\n\n"
        f"Medians over {rounds} rounds, measured side by side in one run (synthetic `vector` task: local training is a "
        "seeded draw, so the time is transport and aggregation). Exchanges: the fit stage, the aggregation stages and "
        "the evaluation; each is one Flower Message per SuperNode, handled by a `flwr-clientapp` process forked from the node's "
        "warm ClientApp zygote. "
        f"Deployment start-up (SuperLink, {nodes} SuperNodes, client hosts, TLS, node registration): {startup:.1f} s, once.\n\n"
        f"Where an exchange's time goes (medians over the run's exchanges, the node that answered last):\n\n{split_table}\n\n"
        "Node poll: from the ServerApp's push until the node's `flwr-clientapp` started (the SuperNode's idle "
        "poll, 3 s hard-coded in flwr 1.42 and capped at 0.3 s by our SuperNode runner, then the SuperExec's task poll, "
        "`FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.2`). Process start: the launcher's interpreter, the fork from the zygote, "
        "Flower pulling, verifying (signature) and installing the app bundle, up to our handler. Our compute: the relay "
        "to the client host and its work. Reply back: the ClientApp's push, the SuperNode's reply poll (0.3 s cap) "
        "and the ServerApp's pull back-off (50-250 ms). Stamps from the ServerApp's and ClientApp's clocks, comparable "
        f"because loopback runs on one machine. Load average (1 min) at the start and end of the benchmark: {load}."
    )
    update_section(doc, "flower", body)
