"""L2 clipping of a client's whole update (DP-FedAvg, McMahan et al. 2018, Alg. 1 ``ClipFn``)."""

from __future__ import annotations

import numpy as np


def clip_l2(vector: np.ndarray, clip_norm: float) -> np.ndarray:
    """``v · min(1, C / ||v||₂)``: the update keeps its direction and has norm at most C.

    The norm is computed in float64 and the result is scaled down by a hair more than needed, so
    the float32 result never exceeds C through rounding.
    """
    v = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(v.astype(np.float64)))
    if norm <= clip_norm:
        return v.copy()
    return (v.astype(np.float64) * (clip_norm / norm) * (1 - 1e-6)).astype(np.float32)
