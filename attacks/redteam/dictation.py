"""Server-dictated configuration: the setup frame asks a node for less protection than its user runs.

A deployment node builds its aggregator and privacy plan from the configuration in the server's
setup frame. A node that obeys a server asking for ``aggregation: plain`` hands it every update in
the clear; one that accepts ``threshold: 1``, no signatures, a server-chosen identity directory, DP
off or a larger ε has given up the protection its user configured. Each case sends the real node
(the host :func:`~.harness.honest_node` builds for the user's config) the weakened setup frame; the
node must refuse it, naming the field. Where it accepts ``plain``, the attack goes on and reads
the victim's update from the fit reply.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aggregation.base import RoundContext
from fedrlhf_secure.config import RunConfig, build_config
from fedrlhf_secure.federation.messages import FitInstruction

from . import node
from .harness import Target, score
from .report import AttackResult

VICTIM = 0
CLAIM = "A node runs with at least the protection its own user configured, whatever the server's setup frame asks for."


def _dictated(target: Target, aggregation: dict[str, Any] | None = None, privacy: dict[str, Any] | None = None) -> RunConfig:
    raw = target.config.to_mapping()
    if aggregation is not None:
        raw["aggregation"] = aggregation
    if privacy is not None:
        raw["privacy"] = {**raw["privacy"], **privacy}
    return build_config(raw, source="<setup frame from the server>")


def _cases(target: Target, workdir: Path) -> list[tuple[str, Callable[[], RunConfig] | None, str]]:
    """(name, dictated config or None when it does not apply, why it does not apply)."""
    kind, priv = target.kind, target.config.privacy
    secure = kind != "plain"

    def same_kind(k: str) -> dict[str, Any]:
        """The user's own aggregation keys when the dictated kind is the user's (noise_bound stays valid)."""
        return target.config.aggregation.to_mapping() if kind == k else {}

    cases: list[tuple[str, Callable[[], RunConfig] | None, str]] = [
        ("dictate-plain", (lambda: _dictated(target, {"kind": "plain"})) if secure else None, "the user runs plain aggregation"),
        (
            "dictate-threshold-1",
            (lambda: _dictated(target, {**same_kind("secagg"), "kind": "secagg", "threshold": 1, "neighbours": 1})) if secure else None,
            "the user runs plain aggregation",
        ),
        (
            "dictate-colluder-bound",
            (lambda: _dictated(target, {**same_kind("secagg"), "kind": "secagg", "colluders": 0.0, "failure_exponent": 2}))
            if kind == "secagg"
            else None,
            f"aggregation.kind is {kind}",
        ),
        # no config can turn signatures off or name an identity path: both keys are gone from the protocol,
        # and a frame that sets them is refused as an unknown key (tests/test_node_policy.py)
        ("dictate-signatures-off", None, "signatures are always on: no config turns them off"),
        ("dictate-identity-dir", None, "identities come from the node's own keys dir; no config key names them"),
        (
            "dictate-dp-off",
            (lambda: _dictated(target, privacy={"mode": "none"})) if priv.mode != "none" else None,
            "the user's config has no DP (privacy.mode: none)",
        ),
        (
            "dictate-epsilon",
            (lambda: _dictated(target, privacy={"epsilon": float(priv.epsilon) * 1000.0})) if priv.mode != "none" else None,
            "the user's config has no DP (privacy.mode: none)",
        ),
    ]
    return cases


def _read_plain_update(target: Target, host, dictated: RunConfig, dim: int, victim: int) -> dict[str, Any]:
    """The node accepted plain aggregation: run its fit and read the victim's update off the wire."""
    from fedrlhf_secure.federation.aggregators import build_aggregator
    from fedrlhf_secure.federation.participant import build_task
    from fedrlhf_secure.federation.update import UpdateCodec

    ids = list(range(target.n))
    agg = build_aggregator(dictated, ids)
    ctx = RoundContext(node.new_session(), 0, tuple(ids), dim)
    task = getattr(host, "task", None) or build_task(dictated, target.data_dir)  # the server knows the task's initial model
    if dictated.privacy.mode != "none":
        node.ask(host, "admit", {"round": 0, "clients": [victim]})
    ans, replies = node.fit(host, ctx, agg.server(ctx), [victim], FitInstruction(0, 1, dictated.seed, task.initial_shared()))
    if not ans.accepted:
        return {"recovered": False, "fit_refused": ans.error}
    reader = agg.server(RoundContext(ctx.session_id, 0, (victim,), dim))
    for cid, frame in replies:
        if cid == victim:
            reader.receive(cid, frame)
    reader.close_stage()
    result = reader.result()
    if dictated.privacy.mode != "none":
        got = None if result is None else result.average
        return {"recovered": got is not None, "note": "the victim's individual (DP-noised) release, read in the clear"}
    fit = task.make_client(victim).fit(task.initial_shared(), _fit_config(dictated, victim))
    truth = UpdateCodec(task.shared_spec(), dictated.federation.sparse_rows).encode(fit)
    return score(None if result is None else result.average, truth)


def _fit_config(config: RunConfig, cid: int):
    from fedrlhf_secure.federation.participant import client_seed
    from fedrlhf_secure.tasks.base import FitConfig

    return FitConfig(round=0, local_epochs=1, seed=client_seed(config.seed, 0, cid), dp_sgd=None)


def _node_keys(target: Target) -> dict[str, Any]:
    """The node's key directory from the real key ceremony (``fedrlhf keys``) for the user's config:
    the SecAgg identity registry of every client of the round (secagg, and ckks's mask round) and,
    for ckks, the victim's key package."""
    if target.kind not in ("ckks", "secagg"):
        return {}
    if "node_keys" not in target._cache:
        from fedrlhf_secure.keys import deal_run_keys, deal_secagg_identities

        root = target.workdir / "key-ceremony"
        root.mkdir(parents=True, exist_ok=True)
        (root / "config.yaml").write_text(target.config.to_yaml(), encoding="utf-8")
        deal_run_keys(root / "config.yaml", [[VICTIM]], root / "server", [root / "node"], root / "dealer")
        others = [c for c in range(target.n) if c != VICTIM]
        deal_secagg_identities([[VICTIM], others], root / "server", [root / "node", root / "others"], root / "identities")
        target._cache["node_keys"] = root / "node"
    return {"keys_dir": target._cache["node_keys"]}


def _node(target: Target, workdir: Path, keys: dict[str, Any]):
    if target.remote_node is not None:
        return target.remote_node
    if target.node_socket is not None:
        from .node import SocketNode

        return SocketNode(target.node_socket)
    return target.make_host([VICTIM], target.task(), workdir, **keys)


def dictation(target: Target) -> list[AttackResult]:
    results = []
    keys = {} if target.node_socket is not None or target.remote_node is not None else _node_keys(target)
    with tempfile.TemporaryDirectory(dir=target.workdir) as tmp:
        control = node.setup(_node(target, Path(tmp), keys), target.config, range(target.n))
    if not control.accepted:  # a refusal below would prove nothing
        return [AttackResult("dictate-control", "error", f"the node refuses the user's own config: {control.error[:120]}", CLAIM)]
    victim = int(control.message.header["clients"][0])  # the first client the node hosts
    for name, make, why in _cases(target, target.workdir):
        if make is None:
            results.append(AttackResult(name, "skipped", f"not weaker than the user's config: {why}", CLAIM))
            continue
        with tempfile.TemporaryDirectory(dir=target.workdir) as tmp:
            dictated = make()
            host = _node(target, Path(tmp), keys)
            ans = node.setup(host, dictated, range(target.n))
            asked = {"aggregation": dictated.aggregation.to_mapping(), "privacy_mode": dictated.privacy.mode}
            if dictated.privacy.mode != "none":
                asked["epsilon"] = dictated.privacy.epsilon
            ev: dict[str, Any] = {"asked": asked}
            if not ans.accepted:
                ev["refusal"] = ans.error
                results.append(AttackResult(name, "refused", f"node refused: {ans.error[:100]}", CLAIM, ev))
                continue
            ev["setup_reply"] = dict(ans.message.header)
            if getattr(host, "config", None) is not None:  # an in-process node: what it now runs
                ev["node_runs"] = {"aggregation": host.config.aggregation.to_mapping(), "privacy_mode": host.config.privacy.mode}
            summary = f"node accepted {_short(asked)}"
            if dictated.aggregation.kind == "plain":
                read = _read_plain_update(target, host, dictated, int(ans.message.header.get("dim", target.dim)), victim)
                ev["plain_read"] = read
                if read.get("recovered") and "max_abs_error" in read:
                    summary += f"; victim's update read in the clear, max error {read['max_abs_error']:.1e}"
                elif read.get("recovered"):
                    summary += "; victim's DP-noised release read in the clear"
            results.append(AttackResult(name, "recovered", summary, CLAIM, ev))
    return results


def _short(asked: dict[str, Any]) -> str:
    shown = ("kind", "threshold", "neighbours", "colluders", "failure_exponent")
    agg = {k: v for k, v in asked["aggregation"].items() if v is not None and k in shown}
    out = ", ".join(f"{k}={v}" for k, v in agg.items())
    out += f", privacy={asked['privacy_mode']}"
    if "epsilon" in asked:
        out += f", ε={asked['epsilon']:g}"
    return out
