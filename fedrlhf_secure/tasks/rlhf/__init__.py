"""Federated RLHF on a causal LM with TRL (``task.kind: rlhf``); IMDb is its preset (``data: imdb``).

Modules: :mod:`.config` (the ``task:`` section), :mod:`.models` (SmolLM2-135M from the ``llm`` extra,
local paths, hub names, the tiny test model), :mod:`.data` (TRL's data formats, partitions, the IMDb
preset), :mod:`.lora` (FFA-LoRA), :mod:`.trainers` (TRL's DPO, reward model, GRPO), :mod:`.judges`,
:mod:`.task` (the Task/TaskClient and the audit hooks).
"""

from ..base import register_task
from .config import LoRAConfig, RLHFConfig
from .models import TinyModelConfig
from .task import RLHFClient, RLHFTask, make_task

register_task("rlhf", RLHFConfig, make_task)

__all__ = ["LoRAConfig", "RLHFClient", "RLHFConfig", "RLHFTask", "TinyModelConfig", "make_task"]
