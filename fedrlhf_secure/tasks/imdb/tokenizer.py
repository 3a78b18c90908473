"""The policy's tokenizer: GPT-2's BPE from the data directory, or a smaller byte-level BPE trained here.

The offline default trains a byte-level BPE (the GPT-2 scheme) of ``vocab_size`` tokens on the public
pool of reviews. A small vocabulary matters on CPU: with GPT-2's 50,257 tokens the output layer of
a 128-wide model alone costs 6.4 M multiply-adds per token, more than the rest of the network.
"""

from __future__ import annotations

from pathlib import Path

from .cache import cached_dir, fingerprint, texts_fingerprint

EOS = "<|endoftext|>"


def _finish(tok):
    tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # generation continues prompts from their right end
    return tok


def gpt2_tokenizer(data_dir: Path | None):
    from transformers import GPT2TokenizerFast

    if data_dir is None:
        raise FileNotFoundError("task.tokenizer=gpt2 needs a data directory holding tokenizers/gpt2 (--data-dir or FEDRLHF_DATA_DIR)")
    path = Path(data_dir) / "tokenizers" / "gpt2"
    for name in ("vocab.json", "merges.txt"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"GPT-2 tokenizer file missing: {path / name}")
    return _finish(GPT2TokenizerFast(vocab_file=str(path / "vocab.json"), merges_file=str(path / "merges.txt")))


def trained_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE trained on ``texts`` (cached by the texts' and the size's hash)."""
    import tokenizers
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    key = fingerprint({"texts": texts_fingerprint(texts), "vocab_size": vocab_size, "tokenizers": tokenizers.__version__})

    def build(out: Path) -> None:
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False)
        GPT2TokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, unk_token=EOS).save_pretrained(str(out))

    path = cached_dir("tokenizer", key, build)
    return _finish(GPT2TokenizerFast.from_pretrained(str(path)))


def model_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path)
    if tok.eos_token is None:
        raise ValueError(f"tokenizer of {name_or_path!r} has no end-of-text token; a causal LM policy needs one")
    return _finish(tok)
