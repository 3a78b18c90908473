"""The language-model policy of one client: a causal LM, its LoRA adapters, and the frozen initial policy.

``share: lora`` wraps the model with peft LoRA adapters on every attention and MLP projection; only
the adapter tensors train and only they are federated (the paper's communication saving, §5.2).
The initial policy π_0 is then the same model with the adapters disabled, so no second copy is
kept. ``share: full`` trains and federates every weight and keeps a frozen copy as π_0.

:meth:`Policy.load_shared` writes the global parameters *into the live tensors the trainer
optimises* (``param.data.copy_``), so the next local RL step and the next evaluation start from
exactly the aggregate (the test suite checks this inside TRL's training loop).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch

LORA_TARGETS = ["c_attn", "c_proj", "c_fc"]


class Policy:
    def __init__(self, base_model, tokenizer, *, share: str, lora_rank: int, lora_alpha: float, seed: int) -> None:
        self.tokenizer = tokenizer
        self.share = share
        torch.manual_seed(seed)  # LoRA A matrices are random: every client must build the same ones
        if share == "lora":
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(
                r=lora_rank,
                lora_alpha=lora_alpha,
                lora_dropout=0.0,
                target_modules=LORA_TARGETS,
                fan_in_fan_out=True,
                task_type="CAUSAL_LM",
            )
            self.model = get_peft_model(base_model, config)
            self._reference = None
        elif share == "full":
            self.model = base_model
            self._reference = copy.deepcopy(base_model).eval()
            for p in self._reference.parameters():
                p.requires_grad_(False)
        else:
            raise ValueError(f"share must be lora or full, got {share!r}")
        self.model.eval()
        self.device = next(self.model.parameters()).device
        self._names = [n for n, p in self.model.named_parameters() if p.requires_grad]

    # --------------------------------------------------------------------- shared parameters
    def named_shared(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        params = dict(self.model.named_parameters())
        for n in self._names:
            yield n, params[n]

    def shared_state(self) -> dict[str, np.ndarray]:
        return {n: p.detach().cpu().numpy().astype(np.float32).copy() for n, p in self.named_shared()}

    @torch.no_grad()
    def load_shared(self, shared: Mapping[str, np.ndarray]) -> None:
        for n, p in self.named_shared():
            if n not in shared:
                raise KeyError(f"shared parameters lack {n!r}")
            value = torch.from_numpy(np.require(shared[n], np.float32, "W")).to(p.device)
            if value.shape != p.shape:
                raise ValueError(f"shared parameter {n}: shape {tuple(value.shape)}, policy has {tuple(p.shape)}")
            p.data.copy_(value)

    # --------------------------------------------------------------------- the initial policy
    @contextlib.contextmanager
    def reference(self):
        """The initial policy π_0 (adapters disabled, or the frozen copy)."""
        if self._reference is not None:
            yield self._reference
        else:
            with self.model.disable_adapter():
                yield self.model

    # --------------------------------------------------------------------- sampling and scoring
    def encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        rows = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        return [r if r else [self.tokenizer.eos_token_id] for r in rows]

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float, seed: int) -> list[list[int]]:
        """Sampled completions (cut after the first end-of-text, which is kept, as TRL does)."""
        eos = self.tokenizer.eos_token_id
        ids, mask = (t.to(self.device) for t in _left_pad(prompt_ids, eos))
        torch.manual_seed(seed)
        was_training = self.model.training
        self.model.eval()
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            pad_token_id=eos,
            eos_token_id=eos,
        )
        self.model.train(was_training)
        completions = []
        for row in out[:, ids.shape[1] :].tolist():
            cut = row.index(eos) + 1 if eos in row else len(row)
            completions.append(row[:cut])
        return completions

    def decode(self, completion_ids: Sequence[Sequence[int]]) -> list[str]:
        return self.tokenizer.batch_decode([list(c) for c in completion_ids], skip_special_tokens=True)

    @torch.no_grad()
    def completion_logprobs(self, model, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """log π(y_t | x, y_<t) of every completion token, under ``model``."""
        eos = self.tokenizer.eos_token_id
        p_ids, p_mask = _left_pad(prompt_ids, eos)
        width = max(1, max(len(c) for c in completion_ids))
        c_ids = torch.full((len(completion_ids), width), eos, dtype=torch.long)
        c_mask = torch.zeros_like(c_ids)
        for i, c in enumerate(completion_ids):
            c_ids[i, : len(c)] = torch.tensor(list(c), dtype=torch.long)
            c_mask[i, : len(c)] = 1
        ids = torch.cat([p_ids, c_ids], 1)
        mask = torch.cat([p_mask, c_mask], 1)
        ids, mask, c_ids = ids.to(self.device), mask.to(self.device), c_ids.to(self.device)
        position_ids = (mask.cumsum(1) - 1).clamp_min(0)
        was_training = model.training
        model.eval()
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, p_ids.shape[1] - 1 : -1]
        model.train(was_training)
        lp = torch.log_softmax(logits.float(), -1).gather(-1, c_ids.unsqueeze(-1)).squeeze(-1)
        lp = lp.cpu()
        return [lp[i, : len(c)].numpy().astype(np.float64) for i, c in enumerate(completion_ids)]

    def reference_logprobs(self, completion_ids: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Token log-probabilities of completions on their own (after end-of-text) under π_0: the fluency signal."""
        if not completion_ids:
            return []
        with self.reference() as ref:
            return self.completion_logprobs(ref, [[self.tokenizer.eos_token_id]] * len(completion_ids), completion_ids)

    def kl_to_reference(self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Per-sequence Monte-Carlo KL(π‖π_0) = Σ_t log π(y_t|·) − log π_0(y_t|·) on completions sampled from π."""
        mine = self.completion_logprobs(self.model, prompt_ids, completion_ids)
        with self.reference() as ref:
            base = self.completion_logprobs(ref, prompt_ids, completion_ids)
        return np.asarray([float((a - b).sum()) for a, b in zip(mine, base, strict=False)], dtype=np.float64)


def _left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(list(r), dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask
