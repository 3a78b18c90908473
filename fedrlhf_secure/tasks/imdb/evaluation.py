"""The judge: a sentiment classifier no client trains against.

Scoring generations with the clients' own reward classifiers would reward the policy for fooling
them (reward hacking looks like success). The evaluation classifier is a different model family
(TF-IDF word uni/bigrams + logistic regression, scikit-learn) trained on held-out **test** reviews
that no client's reward has seen; its accuracy on further held-out reviews is reported with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class EvaluationClassifier:
    pipeline: object
    heldout_accuracy: float

    @classmethod
    def train(
        cls, texts: Sequence[str], labels: np.ndarray, check_texts: Sequence[str], check_labels: np.ndarray, seed: int
    ) -> EvaluationClassifier:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        if len(set(np.asarray(labels).tolist())) < 2:
            raise ValueError("the evaluation classifier needs both positive and negative reviews")
        pipe = make_pipeline(
            TfidfVectorizer(ngram_range=(1, 2), min_df=2, max_features=100_000, sublinear_tf=True),
            LogisticRegression(C=4.0, max_iter=1000, random_state=seed),
        )
        pipe.fit(list(texts), np.asarray(labels))
        acc = float((pipe.predict(list(check_texts)) == np.asarray(check_labels)).mean()) if len(check_texts) else float("nan")
        return cls(pipe, acc)

    def prob_positive(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0)
        return self.pipeline.predict_proba(list(texts))[:, 1].astype(np.float64)
