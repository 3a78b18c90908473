"""Judges of held-out generations that no client trains against (so reward hacking cannot pass for success).

* :class:`~fedrlhf_secure.tasks.imdb.evaluation.EvaluationClassifier` (TF-IDF + logistic regression,
  scikit-learn) trained on IMDb **test** reviews no client's reward sees: the headline judge.
* :func:`lexicon_scores`: a fixed sentiment lexicon, a model with nothing to fit. A policy that games
  the clients' bag-of-words rewards with odd tokens moves the classifier but not the lexicon, so
  the two disagreeing is the warning sign.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

POSITIVE_WORDS = frozenset(
    "good great excellent wonderful amazing awesome beautiful best brilliant enjoy enjoyed enjoyable fantastic favorite "
    "favourite fun funny love loved lovely masterpiece perfect perfectly superb touching recommend highly impressive "
    "incredible outstanding delightful charming classic strong well nice pleasant fine glad happy beautifully moving "
    "powerful gem remarkable terrific fascinating".split()
)
NEGATIVE_WORDS = frozenset(
    "bad worst awful terrible boring waste poor horrible stupid dull disappointing disappointed disappointment "
    "ridiculous mess lame pathetic annoying weak worse fails failed unfunny pointless mediocre crap garbage hate hated "
    "poorly badly sadly unfortunately avoid dreadful laughable forgettable tedious ugly wrong problem".split()
)
_WORD = re.compile(r"[a-z']+")


def lexicon_scores(texts: Sequence[str]) -> np.ndarray:
    """Per text, (#positive − #negative lexicon words) / max(1, #positive + #negative), in [-1, 1]."""
    out = np.zeros(len(texts), dtype=np.float64)
    for i, t in enumerate(texts):
        words = _WORD.findall(t.lower())
        pos = sum(w in POSITIVE_WORDS for w in words)
        neg = sum(w in NEGATIVE_WORDS for w in words)
        out[i] = (pos - neg) / max(1, pos + neg)
    return out
