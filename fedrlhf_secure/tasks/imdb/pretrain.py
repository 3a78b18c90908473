"""The offline default policy: a small GPT-2 (Radford et al. 2019 architecture) pretrained here.

FedRLHF's IMDb experiment starts from a pretrained GPT-2; with no network and no weights on disk we
build the same architecture from a ``GPT2Config`` and pretrain it with the causal-LM loss on the
public pool of IMDb training reviews (no client's shard) for a few CPU minutes. The result is
cached by a hash of the architecture, the training schedule, the tokenizer and the text, so later
runs load it in a second. Users with weights set ``task.model`` to a path or hub name instead.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .cache import cached_dir, fingerprint, texts_fingerprint
from .config import PolicyModelConfig


def token_blocks(texts: list[str], tokenizer, block_size: int) -> torch.Tensor:
    """Reviews joined by end-of-text and cut into ``block_size`` windows (the GPT-2 recipe)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(eos)
    n = len(stream) // block_size
    if n == 0:
        raise ValueError(f"pretraining text has {len(stream)} tokens, fewer than one block of {block_size}")
    return torch.tensor(stream[: n * block_size], dtype=torch.long).view(n, block_size)


def build_small_gpt2(cfg: PolicyModelConfig, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=max(cfg.block_size, 256),
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    return GPT2LMHeadModel(config)


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch: int = 16) -> float:
    """exp(mean next-token cross-entropy) over ``blocks``."""
    model.eval()
    blocks = blocks.to(next(model.parameters()).device)
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch):
        x = blocks[i : i + batch]
        out = model(input_ids=x, labels=x)
        n = x.numel() - len(x)
        total += float(out.loss) * n
        count += n
    return math.exp(total / count)


def pretrain(model, blocks: torch.Tensor, cfg: PolicyModelConfig, seed: int, progress: bool = True) -> list[float]:
    """AdamW with linear warm-up then cosine decay; returns the loss of every step."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, cfg.pretrain_steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, cfg.pretrain_steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    losses = []
    bar = tqdm(range(cfg.pretrain_steps), desc="pretraining policy", unit="step", disable=not progress, file=sys.stderr)
    for _ in bar:
        idx = torch.randint(len(blocks), (cfg.pretrain_batch,), generator=gen)
        x = blocks[idx].to(next(model.parameters()).device)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        bar.set_postfix_str(f"loss {losses[-1]:.3f}")
    model.eval()
    return losses


def pretrained_small_gpt2(
    cfg: PolicyModelConfig,
    tokenizer,
    train_texts: list[str],
    heldout_texts: list[str],
    seed: int,
    progress: bool = True,
    device: str = "cpu",
) -> tuple[Path, dict]:
    """Path of the cached pretrained policy (built on first use) and its report (time, perplexity)."""
    import transformers

    key = fingerprint(
        {
            "policy": asdict(cfg),
            "vocab": len(tokenizer),
            "tokenizer": tokenizer.name_or_path and Path(tokenizer.name_or_path).name,
            "train": texts_fingerprint(train_texts),
            "heldout": texts_fingerprint(heldout_texts),
            "seed": seed,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }
    )

    def build(out: Path) -> None:
        torch.manual_seed(seed)
        model = build_small_gpt2(cfg, tokenizer).to(device)
        blocks = token_blocks(train_texts, tokenizer, cfg.block_size)
        held = token_blocks(heldout_texts, tokenizer, cfg.block_size)[:64]
        ppl_before = perplexity(model, held)
        t0 = time.perf_counter()
        losses = pretrain(model, blocks, cfg, seed, progress)
        seconds = time.perf_counter() - t0
        report = {
            "seconds": seconds,
            "steps": cfg.pretrain_steps,
            "tokens": cfg.pretrain_steps * cfg.pretrain_batch * cfg.block_size,
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "heldout_perplexity_before": ppl_before,
            "heldout_perplexity": perplexity(model, held),
            "final_loss": float(np.mean(losses[-20:])),
            "train_blocks": int(len(blocks)),
            "heldout_blocks": int(len(held)),
            "device": device,
        }
        model.cpu().save_pretrained(str(out / "model"))
        tokenizer.save_pretrained(str(out / "model"))
        (out / "pretrain.json").write_text(json.dumps(report, indent=2))

    path = cached_dir("policy", key, build)
    return path / "model", json.loads((path / "pretrain.json").read_text())
