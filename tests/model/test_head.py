"""The embedding head on real MiniLM embeddings of real offline data sets (tests/model/conftest.py)."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from lsbert.model import head
from lsbert.model.engine import ZeroShotClassifier
from tests.model.conftest import Split


def accuracy(proba: np.ndarray, truth: np.ndarray) -> float:
    return float((proba.argmax(axis=1) == truth).mean())


def expected_calibration_error(proba: np.ndarray, truth: np.ndarray) -> float:
    top = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == truth).astype(float)
    bins = np.minimum((top * 10).astype(int), 9)
    return float(sum(abs(correct[bins == b].mean() - top[bins == b].mean()) * (bins == b).mean() for b in set(bins)))


def log_loss(proba: np.ndarray, truth: np.ndarray) -> float:
    return float(-np.log(np.maximum(proba[np.arange(len(truth)), truth], 1e-12)).mean())


@pytest.mark.parametrize(("data", "margin"), [("rotten_tomatoes_3", 0.15), ("bbc", 0.05)])
@pytest.mark.parametrize("per_class", [10, 30])
def test_the_head_beats_zero_shot_on_held_out_tasks(request, zero_shot: ZeroShotClassifier, data, margin, per_class):
    split: Split = request.getfixturevalue(data)
    x_test, truth = split.test()
    zero_shot_accuracy = accuracy(zero_shot.proba_from_embeddings(x_test, split.labels, False), truth)
    fitted = head.fit(*split.train(per_class), split.labels, False)
    head_accuracy = accuracy(fitted.predict_proba(x_test), truth)
    print(f"{data} {per_class}/class: head {head_accuracy:.3f}, zero-shot {zero_shot_accuracy:.3f}")
    assert head_accuracy >= zero_shot_accuracy + margin


@pytest.mark.parametrize("data", ["rotten_tomatoes_3", "bbc"])
def test_head_probabilities_are_calibrated_on_held_out_tasks(request, data):
    split: Split = request.getfixturevalue(data)
    x_test, truth = split.test()
    x, answers = split.train(30)
    calibrated = head.fit(x, answers, split.labels, False).predict_proba(x_test)
    raw = head.fit(x, answers, split.labels, False, calibrate=False).predict_proba(x_test)
    ece, raw_ece = expected_calibration_error(calibrated, truth), expected_calibration_error(raw, truth)
    losses = log_loss(raw, truth), log_loss(calibrated, truth)
    print(f"{data}: ECE {raw_ece:.3f} -> {ece:.3f}, log-loss {losses[0]:.3f} -> {losses[1]:.3f}")
    assert ece <= 0.12
    assert log_loss(calibrated, truth) <= log_loss(raw, truth) + 0.05
    # calibration scales the scores, never the decisions
    assert (calibrated.argmax(axis=1) == raw.argmax(axis=1)).all()


def test_multi_label_head_learns_texts_about_two_topics(zero_shot: ZeroShotClassifier, bbc_headlines):
    labels = tuple(sorted({label for _, label in bbc_headlines}))
    rng = np.random.default_rng(0)
    texts, answers = [], []
    for i, (headline, label) in enumerate(bbc_headlines):
        if i % 3 == 0:
            texts.append(headline)
            answers.append([label])
            continue
        other = [j for j, (_, lab) in enumerate(bbc_headlines) if lab != label]
        j = int(rng.choice(other))
        texts.append(f"{headline}. {bbc_headlines[j][0]}.")
        answers.append([label, bbc_headlines[j][1]])
    embedded = zero_shot.embed(texts)
    fit_n = 200
    fitted = head.fit(embedded[:fit_n], answers[:fit_n], labels, multi_label=True)
    truth = np.array([[label in a for label in labels] for a in answers[fit_n:]], dtype=np.int8)
    decided = (fitted.predict_proba(embedded[fit_n:]) >= 0.5).astype(np.int8)
    head_f1 = head.macro_f1(truth, decided, multi_label=True)
    zero = (zero_shot.proba_from_embeddings(embedded[fit_n:], labels, True) >= 0.5).astype(np.int8)
    zero_f1 = head.macro_f1(truth, zero, multi_label=True)
    print(f"multi-label macro-F1: head {head_f1:.3f}, zero-shot {zero_f1:.3f}")
    assert head_f1 >= 0.6 and head_f1 >= zero_f1 + 0.05
    # texts about two topics get two labels far more often than texts about one
    two = np.array([len(a) == 2 for a in answers[fit_n:]])
    assert decided[two].sum(axis=1).mean() > decided[~two].sum(axis=1).mean() + 0.4
    assessed = head.assess(embedded[:fit_n], answers[:fit_n], labels, True, None)
    assert assessed.head_score is not None and assessed.head_serves


@pytest.mark.parametrize(("data", "minority", "few"), [("rotten_tomatoes_3", "plot", 8), ("bbc", "tech", 5)])
def test_class_weights_help_the_minority_class(request, data, minority, few):
    split: Split = request.getfixturevalue(data)
    x_all, answers_all = split.train(30)
    keep = [i for i, a in enumerate(answers_all) if a[0] != minority]
    keep += [i for i, a in enumerate(answers_all) if a[0] == minority][:few]  # 30 of the others each
    x, answers = x_all[keep], [answers_all[i] for i in keep]
    x_test, truth = split.test()
    rare = split.labels.index(minority)
    weighted = head.fit(x, answers, split.labels, False).predict_proba(x_test).argmax(axis=1)
    target = np.array([split.labels.index(a[0]) for a in answers])
    unweighted = LogisticRegression(C=head.C, max_iter=head.MAX_ITER).fit(x, target).predict(x_test)
    recall = (weighted[truth == rare] == rare).mean()
    recall_unweighted = (unweighted[truth == rare] == rare).mean()
    print(f"{data} {minority} recall: weighted {recall:.3f}, unweighted {recall_unweighted:.3f}")
    assert recall >= recall_unweighted + 0.2


def test_a_label_never_seen_is_never_chosen(rotten_tomatoes_3: Split, bbc: Split):
    x, answers = rotten_tomatoes_3.train(10)
    seen = [i for i, a in enumerate(answers) if a[0] != "plot"]
    labels = ("fresh", "rotten", "plot", "neutral")
    x_test, _ = rotten_tomatoes_3.test()
    for multi_label in (False, True):
        fitted = head.fit(x[seen], [answers[i] for i in seen], labels, multi_label)
        proba = fitted.predict_proba(np.concatenate([x_test, bbc.embedded]))
        assert proba[:, 2:].max() < 1e-6, multi_label
        if not multi_label:
            assert set(proba.argmax(axis=1)) <= {0, 1}
    # a single label seen: every text gets it
    only = [i for i, a in enumerate(answers) if a[0] == "fresh"]
    proba = head.fit(x[only], [answers[i] for i in only], labels, False).predict_proba(x_test)
    assert (proba.argmax(axis=1) == 0).all()


def test_assess_serves_the_head_only_with_enough_labels(zero_shot: ZeroShotClassifier, rotten_tomatoes_3: Split):
    labels = rotten_tomatoes_3.labels
    for per_class, serves in ((3, False), (10, True), (30, True)):
        x, answers = rotten_tomatoes_3.train(per_class)
        zs = zero_shot.proba_from_embeddings(x, labels, False)
        assessed = head.assess(x, answers, labels, False, zs)
        assert assessed.examples == 3 * per_class
        assert assessed.head_serves is serves
        assert not assessed.zero_shot_loses
    # a head that clearly wins out of fold still does not serve on a handful of labels
    few = head.Assessment(examples=9, head_score=0.9, zero_shot_score=0.3, prior_score=0.2, fewest=3)
    assert not few.head_serves
    # nor when it wins by less than the margin
    close = head.Assessment(
        examples=90, head_score=0.5, zero_shot_score=0.5 - head.MARGIN / 2, prior_score=0.2, fewest=30
    )
    assert not close.head_serves


def test_zero_shot_that_loses_to_the_prior_is_flagged(rotten_tomatoes_3: Split):
    x, answers = rotten_tomatoes_3.train(10)
    labels = rotten_tomatoes_3.labels
    # mostly fresh and rotten; a zero-shot that always answers "plot", the rarest label, does worse than
    # always answering the commonest one
    keep = [i for i, a in enumerate(answers) if a[0] != "plot" or i % 5 == 0]
    x, answers = x[keep], [answers[i] for i in keep]
    always_wrong = np.tile(np.array([0.0, 0.0, 1.0], dtype=np.float32), (len(x), 1))
    assessed = head.assess(x, answers, labels, False, always_wrong)
    assert assessed.zero_shot_score is not None and assessed.prior_score is not None
    assert assessed.zero_shot_score < assessed.prior_score
    assert assessed.zero_shot_loses
    # too few labels to tell
    assert not head.assess(x[:6], answers[:6], labels, False, always_wrong[:6]).zero_shot_loses


def test_what_serves_follows_the_held_out_scores():
    enough = {"examples": 60, "fewest": 20}
    # the head beats both rivals
    assert head.Assessment(head_score=0.7, zero_shot_score=0.4, prior_score=0.3, **enough).serving == "head"
    # zero-shot holds its own and the head does not beat it by the margin
    assert head.Assessment(head_score=0.41, zero_shot_score=0.4, prior_score=0.3, **enough).serving == "zeroshot"
    # zero-shot loses to the prior: the better of the head and the prior answers
    assert head.Assessment(head_score=0.35, zero_shot_score=0.1, prior_score=0.3, **enough).serving == "head"
    assert head.Assessment(head_score=0.25, zero_shot_score=0.1, prior_score=0.3, **enough).serving == "prior"
    # a head with too few examples of a label never answers, even against a losing zero-shot
    few = head.Assessment(examples=60, head_score=0.9, zero_shot_score=0.1, prior_score=0.3, fewest=1)
    assert few.serving == "prior"


@pytest.mark.parametrize("multi_label", [False, True])
def test_the_prior_answers_the_commonest_label_with_its_frequency(rotten_tomatoes_3: Split, multi_label):
    x, answers = rotten_tomatoes_3.train(10)
    labels = (*rotten_tomatoes_3.labels, "never")
    keep = [i for i, a in enumerate(answers) if a[0] != "plot" or i % 5 == 0]  # plot: the rarest
    x, answers = x[keep], [answers[i] for i in keep]
    fitted = head.prior(x, answers, labels, multi_label)
    proba = fitted.predict_proba(x)
    assert np.allclose(proba, proba[0]), "the prior ignores the text"
    frequency = {label: sum(label in a for a in answers) / len(answers) for label in labels}
    if multi_label:
        assert [labels[j] for j in np.flatnonzero(proba[0] >= 0.5)] == [], "no label is on most texts"
        assert proba[0][labels.index("fresh")] == pytest.approx(frequency["fresh"], abs=0.01)
    else:
        assert proba[0].argmax() == max(range(3), key=lambda j: frequency[labels[j]])
        assert proba[0][:3] == pytest.approx([frequency[label] for label in labels[:3]], abs=0.01)
    assert proba[0][labels.index("never")] < 0.05
    assert head.Head.from_bytes(fitted.to_bytes()).labels == labels


def test_round_trip_keeps_the_head_and_refuses_anything_else(rotten_tomatoes_3: Split):
    x, answers = rotten_tomatoes_3.train(10)
    fitted = head.fit(x, answers, rotten_tomatoes_3.labels, False)
    raw = fitted.to_bytes()
    back = head.Head.from_bytes(raw)
    assert back.labels == fitted.labels and back.multi_label is False and back.examples == 30
    np.testing.assert_array_equal(back.predict_proba(x), fitted.predict_proba(x))

    def npz(**arrays) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    def meta(**fields) -> np.ndarray:
        base = {"format": head.FORMAT, "labels": list(fitted.labels), "multi_label": False, "examples": 30}
        return np.frombuffer(json.dumps({**base, **fields}).encode(), np.uint8)

    tampered = [
        b"",
        b"not a zip at all",
        raw[: len(raw) // 2],
        npz(coef=fitted.coef, intercept=fitted.intercept, meta=meta(format=head.FORMAT + 1)),
        npz(coef=fitted.coef, intercept=fitted.intercept, meta=meta(labels=["fresh", "rotten"])),
        npz(coef=fitted.coef, intercept=fitted.intercept),
        npz(coef=fitted.coef, intercept=fitted.intercept, meta=meta(), extra=np.zeros(3)),
        npz(coef=fitted.coef * np.nan, intercept=fitted.intercept, meta=meta()),
        npz(coef=fitted.coef, intercept=fitted.intercept, meta=meta(multi_label="yes")),
        # an object array can only be read by unpickling it: refused, never run
        npz(coef=np.array([object()], dtype=object), intercept=fitted.intercept, meta=meta()),
    ]
    for bad in tampered:
        with pytest.raises(ValueError):
            head.Head.from_bytes(bad)
    assert b"pickle" not in raw.lower()


@pytest.mark.parametrize("dim", [384, 768])
def test_fit_and_assess_stay_fast_at_the_example_cap(bbc: Split, dim: int):
    """5,000 examples (more are cut to the most recent 5,000), 384 or 768 dimensions (BERT-base), built
    from real embeddings (with noise; a random rotation of them fills 768 dimensions)."""
    rng = np.random.default_rng(0)
    pick = rng.integers(0, len(bbc.truth), head.MAX_EXAMPLES + 500)
    x = bbc.embedded[pick] + rng.normal(scale=0.02, size=(len(pick), bbc.embedded.shape[1]))
    if dim == 768:
        rotation, _ = np.linalg.qr(rng.normal(size=(x.shape[1], x.shape[1])))
        x = np.hstack([x, x @ rotation])
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    answers = [[bbc.truth[i]] for i in pick]
    started = time.perf_counter()
    fitted = head.fit(x, answers, bbc.labels, False)
    fit_s = time.perf_counter() - started
    started = time.perf_counter()
    assessed = head.assess(x, answers, bbc.labels, False, None)
    assess_s = time.perf_counter() - started
    print(f"{len(x)} x {dim}: fit {fit_s:.2f} s, assess {assess_s:.2f} s")
    assert fitted.examples == head.MAX_EXAMPLES and fitted.coef.shape == (5, dim)
    assert assessed.examples == head.ASSESS_EXAMPLES and assessed.head_serves
    assert fit_s < 10 and assess_s < 10
