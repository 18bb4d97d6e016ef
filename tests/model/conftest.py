"""Real offline data sets, embedded once per test session with the real baseline model (MiniLM)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from lsbert.model.engine import ZeroShotClassifier
from lsbert.model.runtime import select_runtime
from tests.conftest import MINILM
from tests.support import datasets

TRAIN_PER_CLASS = 30


@dataclass(frozen=True)
class Split:
    """Labelled examples in labelling order: the first ``TRAIN_PER_CLASS`` of each label are for fitting."""

    labels: tuple[str, ...]
    texts: list[str]
    truth: list[str]
    embedded: np.ndarray

    def train(self, per_class: int) -> tuple[np.ndarray, list[list[str]]]:
        taken = self._train_index(per_class)
        return self.embedded[taken], [[self.truth[i]] for i in taken]

    def test(self) -> tuple[np.ndarray, np.ndarray]:
        """Held-out embeddings and their label indices (never among any ``train`` examples)."""
        held = np.setdiff1d(np.arange(len(self.truth)), self._train_index(TRAIN_PER_CLASS))
        return self.embedded[held], np.array([self.labels.index(self.truth[i]) for i in held])

    def _train_index(self, per_class: int) -> np.ndarray:
        assert per_class <= TRAIN_PER_CLASS
        taken: list[int] = []
        for label in self.labels:
            taken += [i for i, t in enumerate(self.truth) if t == label][:per_class]
        return np.array(sorted(taken))


@pytest.fixture(scope="session")
def zero_shot() -> ZeroShotClassifier:
    # 128 tokens: a BBC article's headline and first paragraphs, which carry its topic
    return ZeroShotClassifier(MINILM, select_runtime(), max_length=128)


def _split(zero_shot: ZeroShotClassifier, rows: list[tuple[str, str]], labels: tuple[str, ...]) -> Split:
    texts = [t for t, _ in rows]
    return Split(labels, texts, [label for _, label in rows], zero_shot.embed(texts))


@pytest.fixture(scope="session")
def rotten_tomatoes_3(zero_shot: ZeroShotClassifier) -> Split:
    """Fresh and rotten reviews and plot summaries: 90 per class (30 to fit, 60 held out)."""
    rows = datasets.rotten_tomatoes_with_plot(limit=3 * 90, seed=2)
    return _split(zero_shot, rows, ("fresh", "rotten", "plot"))


@pytest.fixture(scope="session")
def bbc(zero_shot: ZeroShotClassifier) -> Split:
    """BBC News in five topics: 70 per class (30 to fit, 40 held out)."""
    return _split(zero_shot, datasets.bbc_news(limit=5 * 70, seed=2), datasets.BBC_NEWS_LABELS)


@pytest.fixture(scope="session")
def bbc_headlines(bbc: Split) -> list[tuple[str, str]]:
    """The first line (headline) of each BBC article with its topic."""
    return [(text.splitlines()[0].strip(), label) for text, label in zip(bbc.texts, bbc.truth)]
