"""LoRA adapters that average soundly: FFA-LoRA (Sun et al., "Improving LoRA in privacy-preserving
federated learning", ICLR 2024).

A LoRA layer adds ΔW = (α/r)·B·A to a frozen weight. FedAvg of separately averaged factors gives
mean(B)·mean(A), which is not mean(B·A): the aggregate is not the average of what the clients
learned (the "product error", :func:`product_error`). FFA-LoRA initialises A from a seed every
client shares, freezes it, and trains and federates only B (initialised to zero, so the first
model is exactly the base model). Then ΔW_k = (α/r)·B_k·A with the same A for every client, and
Σ w_k ΔW_k = (α/r)·(Σ w_k B_k)·A: averaging B *is* averaging the updates, exactly, under any
weighting, secure aggregation or DP noise (noise added to B maps linearly into ΔW). Sun et al. also
show that freezing A halves the coordinates DP noise lands on at no loss of accuracy.
"""

from __future__ import annotations

import numpy as np
import torch

from ..imdb.policy import Policy
from .config import LoRAConfig


class LoRAPolicy(Policy):
    """A causal LM with peft LoRA adapters; ``shared_state`` lists only the federated tensors
    (``lora_B`` under FFA-LoRA, ``lora_A`` and ``lora_B`` under naive averaging).

    Sampling, log-probabilities and KL to π_0 (the adapters disabled) come from :class:`Policy`."""

    def __init__(self, base_model, tokenizer, lora: LoRAConfig, seed: int) -> None:
        from peft import LoraConfig, get_peft_model

        self.tokenizer = tokenizer
        self.share = "lora"
        self.scheme = lora.scheme
        torch.manual_seed(seed)  # every client builds the same A (FFA-LoRA's shared seeded initialisation)
        config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules=list(lora.targets), task_type="CAUSAL_LM")
        try:
            self.model = get_peft_model(base_model, config)
        except ValueError as exc:
            names = sorted({n.rsplit(".", 1)[-1] for n, m in base_model.named_modules() if isinstance(m, torch.nn.Linear)})
            raise ValueError(f"task.lora.targets {list(lora.targets)} match no layer of this model; its linear layers are {names}") from exc
        if lora.scheme == "ffa":
            for name, p in self.model.named_parameters():
                if "lora_A" in name:
                    p.requires_grad_(False)
        self._reference = None
        self.model.eval()
        self.device = next(self.model.parameters()).device
        self._names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.trainable = frozenset(self._names)


def product_error(a_list: list[np.ndarray], b_list: list[np.ndarray], weights: np.ndarray | None = None) -> dict[str, float]:
    """How far aggregating LoRA factors is from aggregating the clients' updates ΔW_k = B_k·A_k.

    Returns the relative Frobenius error ‖agg − mean_k(B_k A_k)‖ / ‖mean_k(B_k A_k)‖ for naive
    averaging (mean(B)·mean(A)) and for FFA-LoRA (mean(B)·A with A shared: only defined, and then
    zero up to rounding, when every A_k is the same)."""
    w = np.full(len(a_list), 1.0 / len(a_list)) if weights is None else np.asarray(weights, dtype=np.float64) / np.sum(weights)
    a = [np.asarray(x, dtype=np.float64) for x in a_list]
    b = [np.asarray(x, dtype=np.float64) for x in b_list]
    target = sum(wk * bk @ ak for wk, ak, bk in zip(w, a, b, strict=True))
    denom = max(float(np.linalg.norm(target)), 1e-30)
    naive = sum(wk * bk for wk, bk in zip(w, b, strict=True)) @ sum(wk * ak for wk, ak in zip(w, a, strict=True))
    out = {"naive": float(np.linalg.norm(naive - target)) / denom}
    if all(np.array_equal(a[0], ak) for ak in a[1:]):
        ffa = sum(wk * bk for wk, bk in zip(w, b, strict=True)) @ a[0]
        out["ffa"] = float(np.linalg.norm(ffa - target)) / denom
    return out


def lora_factors(policy: LoRAPolicy) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per adapted module, its (A, B) as float64 arrays (for :func:`product_error`)."""
    a, b = {}, {}
    for name, p in policy.model.named_parameters():
        if "lora_A" in name:
            a[name.replace(".lora_A", "")] = p.detach().cpu().double().numpy().copy()
        elif "lora_B" in name:
            b[name.replace(".lora_B", "")] = p.detach().cpu().double().numpy().copy()
    return {k: (a[k], b[k]) for k in a}
