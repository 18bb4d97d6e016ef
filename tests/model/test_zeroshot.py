"""Zero-shot (label-prompt similarity) on the real baseline model: right on plain sentiment, modest in its
confidence where it is little better than a guess."""

from __future__ import annotations

import numpy as np
import pytest

from lsbert.model.engine import ZeroShotClassifier
from tests.model.conftest import Split

POSITIVE = [
    "I love this phone",
    "Best purchase I have made all year.",
    "The service was quick and the staff were lovely.",
    "Works perfectly, highly recommended!",
    "What a great movie, I laughed the whole time.",
]
NEGATIVE = [
    "This is awful",
    "It broke after two days.",
    "Worst customer service ever.",
    "Boring film, I fell asleep.",
    "Terrible quality, very disappointed.",
]


@pytest.mark.parametrize("labels", [("positive", "negative"), ("Positive", "Negative"), ("negative", "positive")])
def test_plain_sentiment_gets_the_obvious_answer(zero_shot: ZeroShotClassifier, labels):
    proba = zero_shot.predict_proba(POSITIVE + NEGATIVE, labels, False)
    positive = [label.lower() for label in labels].index("positive")
    said_positive = proba.argmax(axis=1) == positive
    assert said_positive[0], f"'I love this phone' called {labels[int(proba[0].argmax())]} ({proba[0].max():.2f})"
    assert not said_positive[len(POSITIVE)], "'This is awful' called positive"
    right = said_positive[: len(POSITIVE)].sum() + (~said_positive[len(POSITIVE) :]).sum()
    assert right >= 8, f"{right} of {len(said_positive)} right"


def test_confidence_is_modest_where_zero_shot_is_little_better_than_a_guess(
    zero_shot: ZeroShotClassifier, rotten_tomatoes_3: Split
):
    x, truth = rotten_tomatoes_3.test()
    proba = zero_shot.proba_from_embeddings(x, rotten_tomatoes_3.labels, False)
    accuracy = float((proba.argmax(axis=1) == truth).mean())
    mean_top = float(proba.max(axis=1).mean())
    print(f"reviews/plots: accuracy {accuracy:.3f}, mean top probability {mean_top:.3f}")
    assert accuracy >= 0.38  # chance is 1/3
    assert mean_top <= accuracy + 0.2


def test_zero_shot_sorts_news_topics(zero_shot: ZeroShotClassifier, bbc: Split):
    x, truth = bbc.test()
    proba = zero_shot.proba_from_embeddings(x, bbc.labels, False)
    accuracy = float((proba.argmax(axis=1) == truth).mean())
    print(f"BBC topics: accuracy {accuracy:.3f}, mean top probability {proba.max(axis=1).mean():.3f}")
    assert accuracy >= 0.75


def test_scores_from_embeddings_are_the_served_scores(zero_shot: ZeroShotClassifier):
    texts = POSITIVE + NEGATIVE
    labels = ("positive", "negative", "neutral")
    for multi_label in (False, True):
        served = zero_shot.predict_proba(texts, labels, multi_label)
        np.testing.assert_allclose(zero_shot.proba_from_embeddings(zero_shot.embed(texts), labels, multi_label), served)
    single = zero_shot.predict_proba(texts, labels, False)
    np.testing.assert_allclose(single.sum(axis=1), 1.0, atol=1e-5)
