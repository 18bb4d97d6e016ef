"""The promotion gate, and how the serving model's probabilities are mapped onto the current labels."""

import numpy as np
import pytest

from lsbert.trainer.promotion import NO_VALIDATION, decide, predictions_for, restrict_proba


@pytest.mark.parametrize(
    "score, serving, margin, promoted",
    [
        (0.80, 0.70, 0.0, True),
        (0.70, 0.70, 0.0, True),  # a tie promotes: the new model saw more data
        (0.69, 0.70, 0.0, False),
        (0.69, 0.70, 0.02, True),
        (0.67, 0.70, 0.02, False),
        (0.0, 0.0, 0.0, True),
    ],
)
def test_promote_iff_score_at_least_serving_minus_margin(score, serving, margin, promoted):
    decision = decide(score, serving, margin, validation_size=50)
    assert decision.promoted is promoted
    assert (decision.score, decision.serving_score, decision.margin) == (score, serving, margin)
    assert f"{score:.4f}" in decision.reason and f"{serving:.4f}" in decision.reason


def test_no_validation_data_promotes():
    decision = decide(None, None, 0.0, validation_size=0)
    assert decision.promoted and decision.reason == NO_VALIDATION
    assert decide(0.1, 0.9, 0.0, validation_size=0).promoted


def test_float_noise_does_not_block_an_equal_score():
    assert decide(0.1 + 0.2, 0.3, 0.0, 10).promoted


def test_decision_as_dict():
    assert decide(0.5, 0.4, 0.1, 3).as_dict() == {
        "promoted": True,
        "reason": decide(0.5, 0.4, 0.1, 3).reason,
        "score": 0.5,
        "serving_score": 0.4,
        "margin": 0.1,
    }


def test_restrict_proba_reorders_and_fills_unknown_labels():
    proba = np.array([[0.1, 0.6, 0.3]], dtype=np.float32)  # over the checkpoint's labels
    out = restrict_proba(proba, ["old", "b", "a"], ["a", "b", "new"])
    np.testing.assert_allclose(out, [[0.3, 0.6, 0.0]])
    assert restrict_proba(np.zeros((0, 2)), ["a", "b"], ["a"]).shape == (0, 1)


def test_predictions_for_each_kind_of_head():
    labels = ["a", "b", "c"]
    proba = np.array([[0.6, 0.7, 0.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    # softmax head or single-label config: argmax of the known labels; nothing known -> no prediction
    for multi_label, model_multi_label in ((False, False), (False, True), (True, False)):
        assert predictions_for(proba, labels, multi_label, model_multi_label, threshold=0.5) == [("b",), ()]
    # sigmoid head for a multi-label config: the serving threshold (MULTI_LABEL_THRESHOLD), not a fixed 0.5
    assert predictions_for(proba, labels, multi_label=True, model_multi_label=True, threshold=0.5) == [("a", "b"), ()]
    assert predictions_for(proba, labels, multi_label=True, model_multi_label=True, threshold=0.65) == [("b",), ()]
