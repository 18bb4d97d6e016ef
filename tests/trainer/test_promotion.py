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


def test_the_gate_compares_with_a_serving_embedding_head(tmp_path):
    """Before any fine-tune, a project whose embedding head serves is compared with that head (scored on the
    validation split through the baseline's embeddings), not with zero-shot; a head that does not serve, or
    that was fitted for other labels, leaves zero-shot as the rival."""
    from collections import defaultdict

    from lsbert.labelconfig import ClassificationSpec
    from lsbert.model import ModelKind
    from lsbert.model.engine import ZeroShotClassifier
    from lsbert.model.head import fit
    from lsbert.model.headstate import HeadState, Labelled, head_version
    from lsbert.model.runtime import select_runtime
    from lsbert.store.local import LocalStore
    from lsbert.trainer.dataset import Example
    from lsbert.trainer.promotion import evaluate_serving
    from tests.conftest import MINILM
    from tests.support.datasets import rotten_tomatoes_with_plot

    labels = ("fresh", "rotten", "plot")
    by_label = defaultdict(list)
    for text, label in rotten_tomatoes_with_plot(seed=5):
        by_label[label].append(text)
    train = [(by_label[label][i], label) for i in range(20) for label in labels]
    validation = [Example(by_label[label][20 + i], (label,), i) for i in range(15) for label in labels]
    runtime = select_runtime("fp32", 0)
    encoder = ZeroShotClassifier(MINILM, runtime)
    state = HeadState(MINILM, labels, False)
    for task, (vector, (_, label)) in enumerate(zip(encoder.embed([t for t, _ in train]), train)):
        state.examples[task] = Labelled(vector, (label,), task, float(task))
    _, embeddings, answers = state.arrays()
    state.head = fit(embeddings, answers, labels, False)
    state.version, state.serves = head_version(state.head), True
    store = LocalStore(tmp_path / "models")
    store.write_head(3, state.to_bytes())
    spec = ClassificationSpec("sentiment", "text", "text", labels, False)

    head = evaluate_serving(store, 3, None, spec, validation, runtime, MINILM, threshold=0.5)
    assert head.kind is ModelKind.HEAD and head.version == state.version
    zero_shot = evaluate_serving(store, 4, None, spec, validation, runtime, MINILM, threshold=0.5)
    assert zero_shot.kind is ModelKind.ZEROSHOT and zero_shot.version is None
    assert head.metrics["macro_f1"] > zero_shot.metrics["macro_f1"] + 0.1, (head.metrics, zero_shot.metrics)

    other_labels = ClassificationSpec("sentiment", "text", "text", ("fresh", "rotten"), False)
    assert evaluate_serving(store, 3, None, other_labels, validation, runtime, MINILM, threshold=0.5).kind is (
        ModelKind.ZEROSHOT
    )
    state.serves = False
    store.write_head(3, state.to_bytes())
    assert evaluate_serving(store, 3, None, spec, validation, runtime, MINILM, threshold=0.5).kind is ModelKind.ZEROSHOT


def test_a_head_that_saw_the_validation_tasks_is_refitted_without_them():
    """The head learns from every annotation, the trainer's validation split included: the gate scores a head
    refitted on the other examples, the same way, so a fine-tune is not held to the head's training score."""
    from lsbert.model.head import fit
    from lsbert.model.headstate import HeadState, Labelled
    from lsbert.trainer.dataset import Example
    from lsbert.trainer.promotion import head_without

    rng = np.random.default_rng(0)
    labels = ("a", "b")
    vectors = rng.normal(size=(60, 16)).astype(np.float32)
    answers = [(labels[int(v[0] > 0)],) for v in vectors]
    state = HeadState("baseline", labels, False)
    for task, (vector, answer) in enumerate(zip(vectors, answers)):
        state.examples[task] = Labelled(vector, answer, task, float(task))
    state.head = fit(vectors, answers, labels, False)
    validation = [Example(f"text {t}", answers[t], t) for t in range(40, 60)]

    refitted = head_without(state, validation)
    expected = fit(vectors[:40], answers[:40], labels, False)
    assert refitted.examples == 40 and np.allclose(refitted.coef, expected.coef, atol=1e-5)
    assert not np.allclose(refitted.coef, state.head.coef, atol=1e-3)
    # validation tasks it never saw: the stored head itself
    assert head_without(state, [Example("x", ("a",), 999)]) is state.head
