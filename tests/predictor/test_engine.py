"""The inference engine on the real pretrained model."""

import random

import numpy as np
import pytest

from lsbert.model.engine import ZeroShotClassifier
from lsbert.model.runtime import cpu_supports_bf16, select_runtime
from tests.conftest import MINILM

TEXTS = [
    "I love this product, it works great.",
    "Terrible, broke after a day.",
    "awful café ☕ – naïve",
    "A delightful, moving film with a wonderful cast.",
    "What a waste of two hours.",
    "It was fine.",
    "Shares fell 3% after the earnings call.",
    "The striker scored twice in the final.",
    "Parliament passed the budget after a long debate.",
    "The new phone has a faster chip.",
] * 3
LABELS = ("Positive", "Negative")


@pytest.fixture(scope="module")
def fp32():
    return ZeroShotClassifier(MINILM, select_runtime("fp32"), batch_size=4)


def test_results_come_back_in_input_order_whatever_the_batching(fp32):
    base = fp32.predict_proba(TEXTS, LABELS, False)
    order = list(range(len(TEXTS)))
    random.Random(0).shuffle(order)
    shuffled = fp32.predict_proba([TEXTS[i] for i in order], LABELS, False)
    np.testing.assert_allclose(shuffled, base[order], atol=1e-4)
    # the same texts one at a time give the same numbers as in a padded batch
    single = np.concatenate([fp32.predict_proba([t], LABELS, False) for t in TEXTS[:5]])
    np.testing.assert_allclose(single, base[:5], atol=1e-4)


def test_long_texts_are_truncated_not_failed(fp32):
    probs = fp32.predict_proba(["word " * 200_000, "short"], LABELS, False)
    assert probs.shape == (2, 2) and np.isfinite(probs).all()


@pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no bf16 support")
def test_bf16_agrees_with_fp32_on_a_fixed_set(fp32):
    bf16 = ZeroShotClassifier(MINILM, select_runtime("bf16"), batch_size=4)
    assert bf16.encoder.runtime.precision == "bf16"
    a = fp32.predict_proba(TEXTS, ("sport", "business", "politics", "technology"), False)
    b = bf16.predict_proba(TEXTS, ("sport", "business", "politics", "technology"), False)
    agree = (a.argmax(1) == b.argmax(1)).mean()
    assert agree >= 0.9, f"bf16 and fp32 top labels agree on only {agree:.0%}"
    assert np.abs(a - b).max() < 0.15


def test_zero_shot_is_not_a_random_head(fp32):
    texts = [
        "The striker scored twice in the final.",
        "Parliament passed the budget after a long debate.",
        "Shares fell 3% after the earnings call.",
        "The new phone has a faster chip.",
    ]
    labels = ("sport", "politics", "business", "technology")
    predicted = fp32.predict_proba(texts, labels, False).argmax(1)
    assert (predicted == np.arange(4)).sum() >= 3
