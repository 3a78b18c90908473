"""Run configuration: YAML presets in ``configs/``, ``--set key=value`` overrides, typed sections.

A config file has five sections; ``task`` and ``aggregation`` are plug-ins whose extra keys are
validated by the plug-in's own dataclass::

    seed: 0
    task: {kind: movielens, split: u1, ...}
    federation: {rounds: 5, local_epochs: 5, fraction: 1.0, ...}
    aggregation: {kind: plain}          # or secagg / ckks with their parameters
    privacy: {mode: none}               # or record / client with epsilon, delta...
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from aggregation.base import spec_for

from .configtypes import ConfigError, convert, from_mapping, to_mapping
from .privacy.config import PrivacyConfig
from .tasks.base import task_spec

__all__ = ["ConfigError", "FederationConfig", "RunConfig", "load_config", "parse_overrides"]


@dataclass(frozen=True)
class ServerOptimizerConfig:
    """How the server turns the released mean update Δ̄ into a model step (``federation.server_optimizer``).

    ``sgd``: FedAvg's ``θ ← θ + η·Δ̄``. ``momentum``: FedAvgM (Hsu, Qi & Brown 2019),
    ``m ← β₁·m + Δ̄``, ``θ ← θ + η·m``. ``adam``: FedAdam (Reddi et al. 2021, Alg. 2; with DP noise
    on Δ̄ this is DP-FedAdam), ``m ← β₁·m + (1−β₁)·Δ̄``, ``v ← β₂·v + (1−β₂)·Δ̄²``,
    ``θ ← θ + η·m/(√v + τ)``. η is ``federation.server_lr``. Every kind reads only the released
    (noised) aggregate, so it is post-processing: it costs no privacy and the ledger is unchanged.

    ``average_counts``: divide each sparse row's summed update by the mean of its touch-count
    estimates over the rounds released so far instead of this round's alone (a client's rated items
    do not change between rounds, so under client-level DP each round re-releases the same counts
    with fresh noise; :mod:`.federation.server_optimizer`).
    """

    kind: Literal["sgd", "momentum", "adam"] = "sgd"
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    average_counts: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.beta1 < 1:
            raise ValueError(f"federation.server_optimizer.beta1 must be in [0, 1), got {self.beta1}")
        if not 0 <= self.beta2 < 1:
            raise ValueError(f"federation.server_optimizer.beta2 must be in [0, 1), got {self.beta2}")
        if not self.tau > 0:
            raise ValueError(f"federation.server_optimizer.tau must be > 0, got {self.tau}")


@dataclass(frozen=True)
class FederationConfig:
    """The round loop.

    ``weighting``: ``examples`` weights each update by its client's example count (FedAvg);
    ``uniform`` gives every client weight 1 (required for client-level DP, whose sensitivity
    analysis assumes a plain mean). ``sparse_rows``: normalise sparse embedding rows by the weight
    of the clients that touched them (``touched``) or by all clients (``all``, plain FedAvg).
    """

    rounds: int = 5
    local_epochs: int = 5
    fraction: float = 1.0
    min_clients: int = 2
    server_lr: float = 1.0
    weighting: Literal["examples", "uniform"] = "examples"
    sparse_rows: Literal["touched", "all"] = "touched"
    touch_scale: float = 1.0
    """The touch indicators enter the update vector as ``touch_scale × 1`` (the engine divides their
    sum back by it). Under client-level DP they share the clip norm with the model delta: a small
    scale leaves the delta most of the norm at the price of noisier per-row counts
    (:mod:`.federation.update`)."""
    touch_floor: float = 0.5
    """A row's update is divided by at least this many (estimated) touching clients: noisy counts
    near zero must not blow a row's update up."""
    server_optimizer: ServerOptimizerConfig = field(default_factory=ServerOptimizerConfig)
    workers: int = 1
    dropout_rate: float = 0.0
    """Simulated probability that a selected client drops out during aggregation."""

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"federation.rounds must be >= 1, got {self.rounds}")
        if self.local_epochs < 1:
            raise ValueError(f"federation.local_epochs must be >= 1, got {self.local_epochs}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"federation.fraction must be in (0, 1], got {self.fraction}")
        if self.min_clients < 1:
            raise ValueError(f"federation.min_clients must be >= 1, got {self.min_clients}")
        if self.workers < 1:
            raise ValueError(f"federation.workers must be >= 1, got {self.workers}")
        if not 0 <= self.dropout_rate < 1:
            raise ValueError(f"federation.dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if not 0 < self.touch_scale <= 1:
            raise ValueError(f"federation.touch_scale must be in (0, 1], got {self.touch_scale}")
        if not self.touch_floor > 0:
            raise ValueError(f"federation.touch_floor must be > 0, got {self.touch_floor}")


@dataclass(frozen=True)
class PluginSection:
    kind: str
    params: Any

    def to_mapping(self) -> dict[str, Any]:
        return {"kind": self.kind, **to_mapping(self.params)}


@dataclass(frozen=True)
class RunConfig:
    task: PluginSection
    aggregation: PluginSection
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    seed: int = 0
    baselines: tuple[str, ...] = ()
    source: str | None = None

    def to_mapping(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "task": self.task.to_mapping(),
            "federation": to_mapping(self.federation),
            "aggregation": self.aggregation.to_mapping(),
            "privacy": to_mapping(self.privacy),
            "baselines": list(self.baselines),
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_mapping(), sort_keys=False)


_TOP_KEYS = {"seed", "task", "federation", "aggregation", "privacy", "baselines"}


def _plugin(section: str, raw: Any, lookup, source: str | None) -> PluginSection:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"expected a mapping with a 'kind' key, got {raw!r}", source=source, key=section)
    if "kind" not in raw:
        raise ConfigError("missing required key 'kind'", source=source, key=section)
    kind = raw["kind"]
    try:
        spec = lookup(kind)
    except KeyError as exc:
        raise ConfigError(str(exc.args[0]), source=source, key=f"{section}.kind") from exc
    params = from_mapping(spec.config_cls, {k: v for k, v in raw.items() if k != "kind"}, key=section, source=source)
    return PluginSection(kind, params)


def build_config(raw: Mapping[str, Any], *, source: str | None = None) -> RunConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError("a config must be a YAML mapping", source=source)
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"unknown key {', '.join(unknown)}; known top-level keys: {', '.join(sorted(_TOP_KEYS))}", source=source)
    if "task" not in raw:
        raise ConfigError("missing required section 'task'", source=source)
    task = _plugin("task", raw["task"], task_spec, source)
    aggregation = _plugin("aggregation", raw.get("aggregation", {"kind": "plain"}), spec_for, source)
    privacy = from_mapping(PrivacyConfig, raw.get("privacy"), key="privacy", source=source)
    fed_raw = dict(raw.get("federation") or {})
    if privacy.mode == "client" and "weighting" not in fed_raw:
        # client-level DP calibrates its noise for a plain mean of clipped updates: unless the user
        # says otherwise (and is then told why not), the federation weights clients uniformly
        fed_raw["weighting"] = "uniform"
    federation = from_mapping(FederationConfig, fed_raw, key="federation", source=source)
    seed = convert(int, raw.get("seed", 0), key="seed", source=source)
    baselines = tuple(convert(list[str], raw.get("baselines", []), key="baselines", source=source))
    return RunConfig(task, aggregation, federation, privacy, seed, baselines, source)


def parse_overrides(pairs: Sequence[str]) -> list[tuple[list[str], Any]]:
    """``key.sub=value`` strings -> (path, YAML-parsed value)."""
    out = []
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        path = [p for p in key.strip().split(".") if p]
        if not path:
            raise ConfigError(f"--set has an empty key in {pair!r}")
        out.append((path, yaml.safe_load(value)))
    return out


def apply_overrides(raw: dict[str, Any], overrides: Sequence[tuple[list[str], Any]]) -> dict[str, Any]:
    for path, value in overrides:
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {'.'.join(path)}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return raw


def read_yaml(path: Path, what: str = "config") -> Any:
    """The parsed YAML of ``path``; a missing file or bad YAML is a :class:`ConfigError` naming it."""
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML ({exc})", source=str(path)) from exc


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML config, apply ``--set`` overrides, validate every section."""
    path = Path(path)
    raw = read_yaml(path)
    base = dict(raw or {})
    parsed = parse_overrides(overrides)
    try:
        return build_config(apply_overrides(_deepcopy(base), parsed), source=str(path))
    except ConfigError as exc:
        blamed = _blame_override(exc, overrides, parsed)
        if blamed is None:
            raise
        try:
            build_config(base, source=str(path))
        except ConfigError:
            raise exc from None  # the file itself is wrong too: name the file
        raise ConfigError(str(exc).removeprefix(f"{path}: "), source=f"--set {blamed}", key=None) from None


def _blame_override(exc: ConfigError, given: Sequence[str], parsed: Sequence[tuple[list[str], Any]]) -> str | None:
    """The ``--set`` pair an error is about (its dotted key is in the message), or None."""
    text = str(exc)
    for pair, (keys, _) in zip(given, parsed, strict=True):
        dotted = ".".join(keys)
        if exc.key == dotted or dotted in text:
            return pair
    return None


def config_from_dict(raw: Mapping[str, Any], overrides: Sequence[str] = ()) -> RunConfig:
    raw = apply_overrides(_deepcopy(raw), parse_overrides(overrides))
    return build_config(raw, source="<dict>")


def _deepcopy(raw: Mapping[str, Any]) -> dict[str, Any]:
    import copy

    return copy.deepcopy(dict(raw))
