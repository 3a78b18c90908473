"""FedRLHF on IMDb (arXiv 2412.15538 §5.2): a GPT-2 policy aligned to positive sentiment with TRL.

Modules: :mod:`.config` (the ``task:`` section), :mod:`.data` (reviews, client shards, public pool,
held-out prompts), :mod:`.tokenizer`, :mod:`.pretrain` (the offline small GPT-2), :mod:`.cache`,
:mod:`.policy` (LoRA adapters, π_0, sampling, KL), :mod:`.reward` (per-client classifier and shaped
reward), :mod:`.evaluation` (the separate judge), :mod:`.task` (the Task/TaskClient with GRPO).
"""

from ..base import register_task
from .config import IMDbConfig, PolicyModelConfig
from .task import IMDbClient, IMDbTask, make_task

register_task("imdb", IMDbConfig, make_task)

__all__ = ["IMDbClient", "IMDbConfig", "IMDbTask", "PolicyModelConfig", "make_task"]
