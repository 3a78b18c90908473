"""The server's step: how a released mean update Δ̄ becomes the next global model.

FedAvg applies ``θ ← θ + η·Δ̄``. Reddi et al. 2021 ("Adaptive Federated Optimization", Alg. 2)
treat ``−Δ̄`` as a pseudo-gradient and run a server optimizer on it; under client-level DP the
same optimizer on the *noised* mean is DP-FedAdam / DP-FedAvgM. Momentum averages the
independent per-round noise over rounds (its variance shrinks by about (1−β₁)/(1+β₁) relative to
the signal, which adds up), and Adam's per-coordinate scale gives sparse item rows, whose mean
updates are small, a step of the same order as the dense layers'.

Privacy: the optimizer reads only Δ̄, which is already a DP release (noised by the clients'
shares or the server's central noise and accounted in the ledger before it left them), and its
state is a function of past releases alone. It is post-processing (Dwork & Roth 2014, Prop. 2.1):
no ledger entry, no change to ε. ``tests/test_user_level_utility.py`` checks the ledger is
byte-identical with and without it.

The server applies it when it can read the aggregate (:mod:`.round_core`); under CKKS each host
applies it to what it decrypted (:mod:`.participant`), so every host keeps the same state.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..config import ServerOptimizerConfig


class ServerOptimizer:
    """One instance per holder of the global model; :meth:`step` is its only mutator."""

    def __init__(self, config: ServerOptimizerConfig, lr: float) -> None:
        self.config = config
        self.lr = float(lr)
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def step(self, params: Mapping[str, np.ndarray], avg: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``params`` moved by the released mean update ``avg`` (float32 out, float64 state)."""
        kind, b1, b2 = self.config.kind, self.config.beta1, self.config.beta2
        out: dict[str, np.ndarray] = {}
        for k in params:
            d = np.asarray(avg[k], dtype=np.float64)
            if kind == "sgd":
                move = d
            elif kind == "momentum":
                self.m[k] = b1 * self.m.get(k, 0.0) + d
                move = self.m[k]
            else:
                self.m[k] = b1 * self.m.get(k, 0.0) + (1 - b1) * d
                self.v[k] = b2 * self.v.get(k, 0.0) + (1 - b2) * d * d
                move = self.m[k] / (np.sqrt(self.v[k]) + self.config.tau)
            out[k] = (np.asarray(params[k], dtype=np.float64) + self.lr * move).astype(np.float32)
        return out

    # ------------------------------------------------------------------ checkpoint
    def state(self) -> dict[str, np.ndarray]:
        """The optimizer's state as named tensors (for a checkpoint); empty for ``sgd``."""
        return {**{f"m/{k}": np.asarray(v) for k, v in self.m.items()}, **{f"v/{k}": np.asarray(v) for k, v in self.v.items()}}

    def load_state(self, tensors: Mapping[str, np.ndarray]) -> None:
        self.m = {k[2:]: np.asarray(v, dtype=np.float64) for k, v in tensors.items() if k.startswith("m/")}
        self.v = {k[2:]: np.asarray(v, dtype=np.float64) for k, v in tensors.items() if k.startswith("v/")}
