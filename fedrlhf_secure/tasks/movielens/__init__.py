"""FedRLHF on MovieLens (arXiv 2412.15538 §5.1): one client per user, local RLHF with simulated human feedback.

Modules: :mod:`.data` (ML-100K and ml-latest-small loaders), :mod:`.feedback` (simulated humans and
the shaped reward ``R_k = R0 + λ_k H_k``), :mod:`.model` (the policy), :mod:`.train` (the local
RLHF update, with and without DP-SGD), :mod:`.task` (the Task/TaskClient the engine drives and the
audit hooks), :mod:`.baselines` (centralized and local-only), :mod:`.download` (``fedrlhf data``).
"""

from ..base import register_task
from .config import MovieLensConfig
from .task import MovieLensClient, MovieLensTask, make_task

register_task("movielens", MovieLensConfig, make_task)

__all__ = ["MovieLensClient", "MovieLensConfig", "MovieLensTask", "make_task"]
