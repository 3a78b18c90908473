"""Build the client's half of the privacy plan (:class:`~.plan.ClientPrivacy`) from a run config,
checking the inputs first. (The server's half, :class:`~.server.ServerPrivacy`, needs only the config.)

The checks that need more than the ``privacy:`` section happen here, with errors that name the key:
``privacy.delta`` must be below 1/n (n = records of the largest client at record level, clients at
client level: a δ of 1/n allows "release one person's data outright"); client-level DP refuses
``federation.weighting: examples`` (the sensitivity of an example-weighted mean depends on the
data); the integer masking mode needs the aggregator's quantisation scale and enough
``aggregation.noise_bound`` headroom for the noise shares.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aggregation.base import Aggregator

from ..configtypes import ConfigError
from .accountants import RELATION
from .adaptive_clipping import ClipSchedule, update_noise_multiplier
from .client_level import ClientLevelPlan, IntegerDomain, dp_fedavg_noise_multiplier, share_divisor
from .distributed_dpsgd import DistributedRecordPlan, releases_per_run, steps_per_round
from .ledger import PrivacyLedger
from .noise import NoiseSource
from .plan import ClientPrivacy, NoClientPrivacy
from .record_level import RecordLevelPlan
from .replay import ReleaseStore


def integer_domain(aggregator: Aggregator) -> IntegerDomain | None:
    """The aggregator's integer domain (the scale of its quantiser) when it declares integer inputs;
    None for aggregators that sum floats (then the noise shares are Gaussian floats)."""
    scale = aggregator.capabilities.integer_scale
    return None if scale is None else IntegerDomain(float(scale))


def check_noise_headroom(config: Any, integer: IntegerDomain | None) -> None:
    """The masking aggregator refuses a noise share above its ``noise_bound``: check it fits (10 std) now."""
    if integer is None:
        return
    p = config.privacy
    z = dp_fedavg_noise_multiplier(p.accountant, p.epsilon, p.delta, releases_per_run(config), p.noise_multiplier)
    m = share_divisor(max(1, config.federation.min_clients))
    clip = (
        p.max_grad_norm if p.mode == "record" else largest_vector_clip(config, z)
    )  # record level: the per-record clip of the gradient sum
    share_std = z * integer.scale * clip / math.sqrt(m) * 1.01
    need = math.ceil(10 * share_std)
    bound = int(getattr(config.aggregation.params, "noise_bound", 0))
    if bound < need:
        raise ConfigError(
            f"noise_bound={bound} is too small for the distributed Skellam noise: a client's share may have std "
            f"{share_std:.3g} quantised units (noise multiplier {z:.3f} x scale {integer.scale:g} x clip "
            f"{clip:g} / sqrt({m}) shares at least: m - 1 of m survivors); set aggregation.noise_bound >= {need}",
            source=config.source,
            key="aggregation.noise_bound",
        )


def largest_vector_clip(config: Any, z: float) -> float:
    """The largest L2 bound a client's noise is ever sized for: ``clip_norm``, or with adaptive clipping
    C_aug at the largest C_t the run's rounds can reach (:meth:`.adaptive_clipping.ClipSchedule.max_clip`)."""
    p = config.privacy
    if p.adaptive_clip is None:
        return float(p.clip_norm)
    schedule = ClipSchedule(p.clip_norm, p.adaptive_clip, z)
    return schedule.augmented_clip(schedule.max_clip(config.federation.rounds))


def ledger_header(config: Any) -> dict[str, Any]:
    p = config.privacy
    return {
        "mode": p.mode,
        "relation": RELATION,
        "epsilon_budget": p.epsilon,
        "delta": p.delta,
        "accountant": p.accountant,
        "noise_multiplier": p.noise_multiplier,
        "max_grad_norm": p.max_grad_norm if p.mode == "record" else None,
        "batch_size": p.batch_size if p.mode == "record" else None,
        "clip_norm": p.clip_norm if p.mode == "client" else None,
        "noise": p.noise if p.mode == "client" else None,
        "survivor_fraction": p.survivor_fraction if (p.mode == "client" or distributed_record(p)) else None,
        **({"adaptive_clip": {k: float(v) for k, v in p.adaptive_clip.__dict__.items()}} if p.adaptive_clip is not None else {}),
        "aggregation": config.aggregation.kind,
        "rounds": config.federation.rounds,
        "local_epochs": config.federation.local_epochs,
        **({"record_noise": p.record_noise} if p.mode == "record" and p.record_noise != "local" else {}),
        **({"steps_per_round": steps_per_round(config)} if steps_per_round(config) > 1 else {}),
    }


def distributed_record(p: Any) -> bool:
    """Record level with the noise added once for the federation (:mod:`.distributed_dpsgd`)."""
    return p.mode == "record" and getattr(p, "record_noise", "local") != "local"


def check_record_noise(config: Any, aggregator: Aggregator) -> None:
    """``privacy.record_noise`` distributed/central: the combinations that would not protect what they claim exit 2."""
    p = config.privacy
    src = config.source
    if config.federation.weighting != "uniform":
        raise ConfigError(
            f"privacy.record_noise: {p.record_noise} sums the clients' clipped gradients (one record moves the sum by at "
            "most 2 x max_grad_norm); example weights would scale one client's records; set federation.weighting: uniform",
            source=src,
            key="federation.weighting",
        )
    if p.audit_canaries:
        raise ConfigError(
            f"privacy.audit_canaries: {p.audit_canaries} puts record canaries inside each client's Opacus DP-SGD step, "
            f"which privacy.record_noise: {p.record_noise} does not take; use privacy.audit_canaries: 0 and audit with "
            "`fedrlhf audit RUN` (a gradient-canary re-run sized to the claim), or privacy.record_noise: local",
            source=src,
            key="privacy.audit_canaries",
        )
    if p.record_noise == "central" and not aggregator.capabilities.server_reads_result:
        from .server import central_noise_unreadable

        raise central_noise_unreadable(config, aggregator)
    if p.record_noise == "distributed" and aggregator.kind == "plain":
        raise ConfigError(
            "privacy.record_noise: distributed under aggregation: plain would show the server each client's gradient sum "
            "with only 1/sqrt(m-1) of the noise (m = the round's survivors): use aggregation: secagg or ckks, or "
            "privacy.record_noise: central (the server adds the noise and is trusted with the un-noised sum)",
            source=src,
            key="privacy.record_noise",
        )


def check_inputs(config: Any, client_sizes: Mapping[int, int], num_clients: int | None = None) -> None:
    """``num_clients`` is the federation's client count when ``client_sizes`` covers only some clients
    (one node's, in a deployment); the client-level δ < 1/n check is about all n clients."""
    p = config.privacy
    src = config.source
    if p.epsilon is not None and not p.epsilon > 0:
        raise ConfigError(f"must be > 0, got {p.epsilon}", source=src, key="privacy.epsilon")
    if p.mode == "record":
        if not p.max_grad_norm > 0:
            raise ConfigError(f"must be > 0, got {p.max_grad_norm}", source=src, key="privacy.max_grad_norm")
        largest = max(client_sizes.items(), key=lambda kv: kv[1], default=(None, 0))
        if largest[1] > 0 and p.delta >= 1.0 / largest[1]:
            raise ConfigError(
                f"δ={p.delta:g} must be < 1/n = {1 / largest[1]:.3g} (client {largest[0]} has n={largest[1]} records)",
                source=src,
                key="privacy.delta",
            )
    elif p.mode == "client":
        if not p.clip_norm > 0:
            raise ConfigError(f"must be > 0, got {p.clip_norm}", source=src, key="privacy.clip_norm")
        n = len(client_sizes) if num_clients is None else int(num_clients)
        if p.delta >= 1.0 / n:
            raise ConfigError(f"δ={p.delta:g} must be < 1/n = {1 / n:.3g} (n = {n} clients)", source=src, key="privacy.delta")
        drop = config.federation.dropout_rate
        if p.noise == "distributed" and drop > 0 and p.survivor_fraction > 1 - drop:
            raise ConfigError(
                f"survivor_fraction={p.survivor_fraction:g} with federation.dropout_rate={drop:g}: the noise shares are sized "
                f"for more survivors than a typical round keeps, so rounds would be discarded; set privacy.survivor_fraction "
                f"<= {1 - drop:g} (a smaller value adds more noise per client)",
                source=src,
                key="privacy.survivor_fraction",
            )
        if p.adaptive_clip is not None:
            z = dp_fedavg_noise_multiplier(p.accountant, p.epsilon, p.delta, config.federation.rounds, p.noise_multiplier)
            try:
                update_noise_multiplier(z, p.adaptive_clip.count_noise)
            except ValueError as exc:
                raise ConfigError(str(exc), source=src, key="privacy.adaptive_clip.count_noise") from exc
        if config.federation.weighting != "uniform":
            raise ConfigError(
                "client-level DP needs federation.weighting: uniform (noise is calibrated for a plain mean; example "
                "weights would let one client's influence grow with its data)",
                source=src,
                key="federation.weighting",
            )


def build_client_privacy(
    config: Any,
    client_sizes: dict[int, int],
    ledger_dir: Path,
    resume: bool,
    aggregator: Aggregator,
    *,
    num_clients: int | None = None,
    noise: NoiseSource | None = None,
) -> ClientPrivacy:
    """The clients' half of the plan; ``resume=True`` reopens the existing ledger with the ε already spent.

    ``client_sizes`` may be a subset of the federation's clients (a deployment node builds the plan
    for the clients it hosts, and keeps their ledger); ``num_clients`` is then the federation-wide
    count, the one public number the client-level plan needs beyond its own clients (δ < 1/n, and
    the masking quantiser's scale, which depends on how many clients are summed).
    """
    p = config.privacy
    if p.mode == "none":
        return NoClientPrivacy()
    noise = noise or NoiseSource()
    total = len(client_sizes) if num_clients is None else int(num_clients)
    check_inputs(config, client_sizes, total)
    ledger_dir = Path(ledger_dir)
    releases = ReleaseStore(ledger_dir.parent / "checkpoint" / "privacy-releases")
    if distributed_record(p):
        check_record_noise(config, aggregator)
        integer = integer_domain(aggregator) if p.record_noise == "distributed" else None
        check_noise_headroom(config, integer)
        return DistributedRecordPlan(
            rounds=config.federation.rounds,
            max_grad_norm=p.max_grad_norm,
            noise=p.record_noise,
            budget=p.epsilon,
            delta=p.delta,
            accountant=p.accountant,
            noise_multiplier=p.noise_multiplier,
            survivor_fraction=p.survivor_fraction,
            min_clients=config.federation.min_clients,
            integer=integer,
            ledger=PrivacyLedger(ledger_dir, ledger_header(config), resume=resume),
            releases=releases,
            noise_source=noise,
            steps_per_round=steps_per_round(config),
        )
    if p.mode == "record":
        ledger = PrivacyLedger(ledger_dir, ledger_header(config), resume=resume)
        return RecordLevelPlan(
            client_sizes=client_sizes,
            rounds=config.federation.rounds,
            local_epochs=config.federation.local_epochs,
            batch_size=p.batch_size,
            max_grad_norm=p.max_grad_norm,
            budget=p.epsilon,
            delta=p.delta,
            accountant=p.accountant,
            noise_multiplier=p.noise_multiplier,
            ledger=ledger,
            releases=releases,
            noise=noise,
            per_sample=p.per_sample,
        )
    if p.noise == "central" and not aggregator.capabilities.server_reads_result:
        from .server import central_noise_unreadable

        raise central_noise_unreadable(config, aggregator)
    if p.adaptive_clip is not None and not aggregator.capabilities.server_reads_result:
        raise ConfigError(
            f"adaptive clipping needs the released count of each round, which the server reads and broadcasts; under the "
            f"{aggregator.kind} aggregator only the clients read the aggregate (use plain or secagg, or drop privacy.adaptive_clip)",
            source=config.source,
            key="privacy.adaptive_clip",
        )
    integer = integer_domain(aggregator) if p.noise == "distributed" else None
    check_noise_headroom(config, integer)
    ledger = PrivacyLedger(ledger_dir, ledger_header(config), resume=resume)
    plan = ClientLevelPlan(
        rounds=config.federation.rounds,
        clip_norm=p.clip_norm,
        noise=p.noise,
        budget=p.epsilon,
        delta=p.delta,
        accountant=p.accountant,
        noise_multiplier=p.noise_multiplier,
        survivor_fraction=p.survivor_fraction,
        min_clients=config.federation.min_clients,
        integer=integer,
        ledger=ledger,
        releases=releases,
        noise_source=noise,
        adaptive=p.adaptive_clip,
    )
    return plan
