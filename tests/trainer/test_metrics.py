"""Validation metrics against values computed by hand."""

import numpy as np
import pytest

from lsbert.model.decision import predicted_labels
from lsbert.trainer.metrics import classification_metrics, multi_label_metrics, single_label_metrics


def test_single_label_by_hand():
    # a: tp 2, fn 1 (a->b)        P 1    R 2/3  F1 0.8
    # b: tp 1, fp 1, fn 1 (b->c)  P 1/2  R 1/2  F1 0.5
    # c: tp 1, fp 1               P 1/2  R 1    F1 2/3
    # d: in the config, never seen nor predicted: listed, left out of the macro average
    m = single_label_metrics(["a", "a", "a", "b", "b", "c"], ["a", "a", "b", "b", "c", "c"], ["a", "b", "c", "d"])
    assert m["examples"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m["per_label"]["a"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert m["per_label"]["b"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert m["per_label"]["c"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert m["per_label"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert list(m["per_label"]) == ["a", "b", "c", "d"]


def test_a_label_only_predicted_counts_in_the_macro_average():
    m = single_label_metrics(["a", "a"], ["a", "b"], ["a", "b"])
    # a: P 1 R 1/2 F1 2/3; b: P 0 R 0 (no support) F1 0 -> macro (2/3 + 0) / 2
    assert m["macro_f1"] == pytest.approx(1 / 3)
    assert m["accuracy"] == 0.5


def test_a_missing_prediction_is_a_miss_without_a_false_positive():
    m = single_label_metrics(["a", "b"], ["a", None], ["a", "b"])
    assert m["accuracy"] == 0.5
    assert m["per_label"]["a"]["precision"] == 1.0 and m["per_label"]["b"]["recall"] == 0.0


def test_perfect_and_empty():
    assert single_label_metrics(["x", "y"], ["x", "y"], ["x", "y"])["macro_f1"] == 1.0
    empty = single_label_metrics([], [], ["x"])
    assert empty["accuracy"] == 0.0 and empty["macro_f1"] == 0.0 and empty["examples"] == 0
    with pytest.raises(ValueError):
        single_label_metrics(["x"], [], ["x"])


def test_multi_label_by_hand():
    truth = [{"a", "b"}, {"a"}, {"c"}, set()]
    pred = [{"a"}, {"a", "c"}, {"c"}, {"b"}]
    m = multi_label_metrics(truth, pred, ["a", "b", "c"])
    # exact matches: only example 2
    assert m["subset_accuracy"] == 0.25 and m["accuracy"] == 0.25
    # a: tp 2 -> F1 1; b: fp 1, fn 1 -> F1 0; c: tp 1, fp 1 -> P 1/2 R 1 F1 2/3
    assert m["per_label"]["a"] == pytest.approx({"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2})
    assert m["per_label"]["b"] == pytest.approx({"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1})
    assert m["per_label"]["c"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert m["macro_f1"] == pytest.approx((1 + 0 + 2 / 3) / 3)
    # micro: tp 3, fp 2, fn 1 -> P 0.6, R 0.75, F1 2/3
    assert m["micro_f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)


def test_predicted_labels_from_probabilities():
    proba = np.array([[0.2, 0.7, 0.1], [0.5, 0.49, 0.6], [0.1, 0.2, 0.3]], dtype=np.float32)
    labels = ["a", "b", "c"]
    assert predicted_labels(proba, labels, False, 0.5) == [("b",), ("c",), ("c",)]
    assert predicted_labels(proba, labels, True, 0.5) == [("b",), ("a", "c"), ()]
    assert predicted_labels(proba, labels, True, 0.3) == [("b",), ("a", "b", "c"), ("c",)]
    assert predicted_labels(np.zeros((0, 3)), labels, False, 0.5) == []
    with pytest.raises(ValueError):
        predicted_labels(proba, ["a", "b"], False, 0.5)


def test_classification_metrics_dispatches_on_label_tuples():
    single = classification_metrics([("a",), ("b",)], [("a",), ("a",)], ["a", "b"], multi_label=False)
    assert single["accuracy"] == 0.5 and "micro_f1" not in single
    multi = classification_metrics([("a", "b"), ("b",)], [("a", "b"), ()], ["a", "b"], multi_label=True)
    assert multi["subset_accuracy"] == 0.5 and multi["micro_f1"] == pytest.approx(2 * 1 * 2 / 3 / (1 + 2 / 3))
