"""A tiny deterministic task for engine tests: known deltas, a sparse table, a personal vector."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedrlhf_secure.privacy.dpsgd import DPSGDReport
from fedrlhf_secure.tasks.base import FitConfig, FitResult, ParamEntry, ParamSpec, Task, TaskClient, register_task

ROWS = 6


@dataclass(frozen=True)
class ToyConfig:
    clients: int = 4
    lr: float = 0.5


class ToyClient(TaskClient):
    """Client ``c`` pulls ``w`` towards ``c`` and touches table rows ``c % 6`` and ``(c+1) % 6``."""

    def __init__(self, cid: int, cfg: ToyConfig) -> None:
        self.client_id = cid
        self.cfg = cfg
        self.personal = np.full(3, 1000.0 + cid, dtype=np.float32) + np.arange(3, dtype=np.float32) / 7
        self.rows = [cid % ROWS, (cid + 1) % ROWS]

    def num_examples(self) -> int:
        return self.client_id + 1

    def fit(self, shared: Mapping[str, np.ndarray], config: FitConfig) -> FitResult:
        rng = np.random.default_rng(config.seed)
        w = shared["w"]
        delta_w = self.cfg.lr * (np.full_like(w, float(self.client_id)) - w) + rng.normal(0, 1e-3, w.shape).astype(np.float32)
        table = np.zeros((ROWS, 2), dtype=np.float32)
        touched = np.zeros(ROWS, dtype=bool)
        for r in self.rows:
            table[r] = 1.0 + self.client_id
            touched[r] = True
        self.personal += 1.0
        return FitResult(
            {"w": delta_w.astype(np.float32), "table": table},
            self.num_examples(),
            {"table": touched},
            {"loss": float(np.abs(delta_w).mean())},
        )

    def evaluate(self, shared: Mapping[str, np.ndarray]) -> dict[str, float]:
        err = float(np.abs(shared["w"] - self.client_id).mean())
        correct = int(err < 1.5)
        return {"correct": correct, "n": 1, "accuracy": float(correct), "err": err}

    def personal_state(self) -> dict[str, np.ndarray]:
        return {"personal": self.personal.copy()}

    def load_personal_state(self, state) -> None:
        self.personal = np.asarray(state["personal"], dtype=np.float32).copy()


class ToyTask(Task):
    name = "toy"

    def __init__(self, cfg: ToyConfig) -> None:
        self.cfg = cfg

    def client_ids(self) -> list[int]:
        return list(range(self.cfg.clients))

    def shared_spec(self) -> ParamSpec:
        return ParamSpec((ParamEntry("w", (4,)), ParamEntry("table", (ROWS, 2), sparse_rows=True)))

    def initial_shared(self) -> dict[str, np.ndarray]:
        return {"w": np.zeros(4, np.float32), "table": np.zeros((ROWS, 2), np.float32)}

    def make_client(self, client_id: int) -> TaskClient:
        return ToyClient(client_id, self.cfg)


def _factory(cfg: ToyConfig, data_dir: Path | None, seed: int) -> ToyTask:
    return ToyTask(cfg)


register_task("toy", ToyConfig, _factory)


class DPToyClient(ToyClient):
    """The toy client, reporting the DP-SGD it was asked to run (as a real task's Opacus loop does)."""

    def fit(self, shared: Mapping[str, np.ndarray], config: FitConfig) -> FitResult:
        res = super().fit(shared, config)
        s = config.dp_sgd
        if s is not None:
            res.dp_sgd = DPSGDReport.of(s, config.local_epochs * round(1 / s.sample_rate))
        return res


class DPToyTask(ToyTask):
    name = "toy-dp"

    def make_client(self, client_id: int) -> TaskClient:
        return DPToyClient(client_id, self.cfg)


register_task("toy-dp", ToyConfig, lambda cfg, data_dir, seed: DPToyTask(cfg))


def toy_config(**fed) -> dict:
    return {
        "seed": 3,
        "task": {"kind": "toy", "clients": 4},
        "federation": {"rounds": 2, "local_epochs": 1, "min_clients": 2, **fed},
        "aggregation": {"kind": "plain"},
    }
