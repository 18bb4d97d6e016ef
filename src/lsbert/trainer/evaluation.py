"""Scoring a finished fine-tune: the new model and the serving one on the same validation examples, and
the ``promotion`` record that goes into the version's lsbert.json."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from lsbert.labelconfig import ClassificationSpec
from lsbert.model.decision import predicted_labels
from lsbert.trainer.dataset import Example
from lsbert.trainer.loop import predict_proba
from lsbert.trainer.metrics import classification_metrics
from lsbert.trainer.promotion import PromotionDecision, evaluate_serving


@dataclass
class Evaluation:
    metrics: dict[str, Any]
    serving_metrics: Optional[dict[str, Any]]
    serving: dict[str, Any]  # {"kind", "version"[, "note"]} of the model compared with
    seconds: float

    @property
    def score(self) -> Optional[float]:
        return self.metrics.get("macro_f1")

    @property
    def serving_score(self) -> Optional[float]:
        return self.serving_metrics["macro_f1"] if self.serving_metrics else None


def evaluate(
    ctx: dict[str, Any], model: Any, tokenizer: Any, validation: Sequence[Example], progress: Callable[[str], None]
) -> Evaluation:
    """The new model, then the serving one, on the same validation examples."""
    started = time.perf_counter()
    spec: ClassificationSpec = ctx["spec"]
    if not validation:
        return Evaluation({}, None, {"kind": None, "version": None}, 0.0)
    proba = predict_proba(
        model, tokenizer, [e.text for e in validation], spec.multi_label, ctx["runtime"], ctx["max_length"]
    )
    predicted = predicted_labels(proba, ctx["labels"], spec.multi_label, ctx["threshold"])
    metrics = classification_metrics([e.labels for e in validation], predicted, spec.labels, spec.multi_label)
    progress(
        f"eval: new model accuracy {metrics['accuracy']:.4f} macro-F1 {metrics['macro_f1']:.4f} "
        f"on {len(validation)} examples"
    )
    for label, row in metrics["per_label"].items():
        progress(
            f"eval:   {label}: precision {row['precision']:.3f} recall {row['recall']:.3f} "
            f"f1 {row['f1']:.3f} support {row['support']}"
        )
    serving = evaluate_serving(
        ctx["store"],
        ctx["project"],
        ctx["serving_version"],
        spec,
        validation,
        ctx["runtime"],
        ctx["base_model"],
        ctx["max_length"],
        ctx["token"],
        threshold=ctx["threshold"],
    )
    described = {"kind": serving.kind.value, "version": serving.version}
    if serving.note:
        described["note"] = serving.note
    progress(
        f"eval: serving model ({serving.describe()}) accuracy {serving.metrics['accuracy']:.4f} "
        f"macro-F1 {serving.metrics['macro_f1']:.4f}"
    )
    return Evaluation(metrics, serving.metrics, described, time.perf_counter() - started)


def promotion_record(
    decision: PromotionDecision,
    no_promote: bool,
    serving_at_start: Optional[str],
    serving_now: Optional[str],
    serving: dict[str, Any],
) -> dict[str, Any]:
    """The ``promotion`` section of lsbert.json: the gate's decision (``eligible``) and what is done
    (``promoted``): nothing with --no-promote, nor when another run promoted a version meanwhile (the
    comparison was against a model that no longer serves)."""
    promote, reason = decision.promoted, decision.reason
    if promote and no_promote:
        promote, reason = False, f"--no-promote (the gate would promote: {decision.reason})"
    elif promote and serving_now != serving_at_start:
        promote, reason = False, f"the promoted version changed during training ({serving_at_start} -> {serving_now})"
    return {
        **decision.as_dict(),
        "promoted": promote,
        "eligible": decision.promoted,
        "reason": reason,
        "serving": serving,
    }
