"""Classification metrics on the validation split: pure functions over label names.

Single-label: accuracy and macro-F1, plus precision/recall/F1/support per label.
Multi-label: subset accuracy (every label of an example right), micro- and macro-F1, per label the same
four numbers. Predictions are label names (``lsbert.model.decision`` turns probabilities into them with
the serving threshold).

Macro averages run over the labels that occur in the truth or in the predictions (scikit-learn's default
when no label list is given): a label absent from both says nothing about the model and would only drag
every model's score down alike. A precision or recall with a zero denominator counts as 0.
"""

from __future__ import annotations

from typing import Any, Collection, Optional, Sequence


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else 0.0


def _f1(precision: float, recall: float) -> float:
    return _ratio(2 * precision * recall, precision + recall)


def _per_label(tp: dict[str, int], fp: dict[str, int], fn: dict[str, int], labels: Sequence[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for label in labels:
        precision = _ratio(tp[label], tp[label] + fp[label])
        recall = _ratio(tp[label], tp[label] + fn[label])
        out[label] = {
            "precision": precision,
            "recall": recall,
            "f1": _f1(precision, recall),
            "support": tp[label] + fn[label],
        }
    return out


def _macro_f1(per_label: dict[str, dict], tp, fp, fn) -> float:
    present = [label for label in per_label if tp[label] + fp[label] + fn[label] > 0]
    return _ratio(sum(per_label[label]["f1"] for label in present), len(present))


def _ordered_labels(labels: Sequence[str], *seen: Collection[str]) -> list[str]:
    ordered = list(dict.fromkeys(labels))
    for group in seen:
        for label in sorted(set(group) - set(ordered)):
            ordered.append(label)
    return ordered


def single_label_metrics(
    y_true: Sequence[str], y_pred: Sequence[Optional[str]], labels: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-label scores for one label per example (a None prediction is a miss)."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    names = _ordered_labels(labels, y_true, [p for p in y_pred if p is not None])
    tp = dict.fromkeys(names, 0)
    fp = dict.fromkeys(names, 0)
    fn = dict.fromkeys(names, 0)
    correct = 0
    for truth, pred in zip(y_true, y_pred):
        if truth == pred:
            correct += 1
            tp[truth] += 1
        else:
            if pred is not None:
                fp[pred] += 1
            fn[truth] += 1
    per_label = _per_label(tp, fp, fn, names)
    return {
        "examples": len(y_true),
        "accuracy": _ratio(correct, len(y_true)),
        "macro_f1": _macro_f1(per_label, tp, fp, fn),
        "per_label": per_label,
    }


def multi_label_metrics(
    y_true: Sequence[Collection[str]], y_pred: Sequence[Collection[str]], labels: Sequence[str]
) -> dict[str, Any]:
    """Subset accuracy, micro/macro-F1 and per-label scores for label sets."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true label sets but {len(y_pred)} predictions")
    names = _ordered_labels(labels, *(set(t) for t in y_true), *(set(p) for p in y_pred))
    tp = dict.fromkeys(names, 0)
    fp = dict.fromkeys(names, 0)
    fn = dict.fromkeys(names, 0)
    exact = 0
    for truth, pred in zip(y_true, y_pred):
        truth, pred = set(truth), set(pred)
        exact += truth == pred
        for label in truth & pred:
            tp[label] += 1
        for label in pred - truth:
            fp[label] += 1
        for label in truth - pred:
            fn[label] += 1
    per_label = _per_label(tp, fp, fn, names)
    micro_p = _ratio(sum(tp.values()), sum(tp.values()) + sum(fp.values()))
    micro_r = _ratio(sum(tp.values()), sum(tp.values()) + sum(fn.values()))
    subset_accuracy = _ratio(exact, len(y_true))
    return {
        "examples": len(y_true),
        "subset_accuracy": subset_accuracy,
        "accuracy": subset_accuracy,  # same key as single-label, for dashboards
        "micro_f1": _f1(micro_p, micro_r),
        "macro_f1": _macro_f1(per_label, tp, fp, fn),
        "per_label": per_label,
    }


def classification_metrics(
    y_true: Sequence[Sequence[str]], y_pred: Sequence[Sequence[str]], labels: Sequence[str], multi_label: bool
) -> dict[str, Any]:
    """Metrics for label tuples (one per example): multi-label metrics, or single-label on the first label."""
    if multi_label:
        return multi_label_metrics(y_true, y_pred, labels)
    return single_label_metrics([t[0] for t in y_true], [p[0] if p else None for p in y_pred], labels)
