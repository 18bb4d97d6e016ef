"""Zero-shot variants on offline labelled data: which prompt, casing and bias correction to serve.

    .venv/bin/python bench/zeroshot.py [--per-class 200] [--precision auto]

Every text is embedded once with the served ``ZeroShotClassifier`` (the baseline model); each variant then
only embeds its label prompts. Sets: Rotten Tomatoes fresh/rotten and fresh/rotten/plot, BBC News 5 topics
(test data packages, see tests/support/datasets.py), and a hand-written sentiment probe asked with the labels
``positive/negative`` and ``Positive/Negative``. Prints accuracy and macro-F1 per variant and set, then the
calibration of the served variant (mean top probability against accuracy) at the old and the new SCALE.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from sklearn.metrics import f1_score

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lsbert.model.engine import ZeroShotClassifier, similarity_proba  # noqa: E402
from lsbert.model.runtime import select_runtime  # noqa: E402
from tests.support import datasets  # noqa: E402

MINILM = "sentence-transformers/all-MiniLM-L6-v2"

PROBE_POSITIVE = [
    "I love this phone",
    "Best purchase I have made all year.",
    "The service was quick and the staff were lovely.",
    "Works perfectly, highly recommended!",
    "What a great movie, I laughed the whole time.",
    "Super comfortable shoes, I wear them every day.",
    "The food was delicious.",
    "Fantastic battery life.",
    "I am so happy with this laptop.",
    "Five stars, would buy again.",
]
PROBE_NEGATIVE = [
    "This is awful",
    "It broke after two days.",
    "Worst customer service ever.",
    "I want my money back.",
    "The screen is dim and the sound is tinny.",
    "Boring film, I fell asleep.",
    "The room was dirty and smelled bad.",
    "Do not buy this, total waste.",
    "I hate how slow this app is.",
    "Terrible quality, very disappointed.",
]

# A variant: how label prompts are written, and whether the per-label anchor bias is subtracted.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "plain": ("{}",),
    "this-text-is": ("This text is {}.",),
    "this-is": ("This is {}.",),
    "about": ("This text is about {}.",),
    "ensemble": ZeroShotClassifier.TEMPLATES,
}
# The anchor texts of the bias correction served before (revision 1): their mean similarity to a label was
# subtracted as that label's bias.
ANCHORS = ("This text is about something.", "A text.", "Something happened.")
CASINGS: dict[str, Callable[[str], str]] = {"as-given": str, "lower": str.lower}


def load_sets(per_class: int) -> list[tuple[str, list[str], tuple[str, ...]]]:
    """(name, texts, truth labels) per set; each set's labels are the names a project would configure."""
    rt3 = datasets.rotten_tomatoes_with_plot(limit=3 * per_class, seed=1)
    rt2 = [(t, label) for t, label in rt3 if label != "plot"]
    bbc = datasets.bbc_news(limit=5 * per_class, seed=1)
    probe = [(t, "positive") for t in PROBE_POSITIVE] + [(t, "negative") for t in PROBE_NEGATIVE]
    return [
        ("rt-2", [t for t, _ in rt2], tuple(label for _, label in rt2)),
        ("rt-3", [t for t, _ in rt3], tuple(label for _, label in rt3)),
        ("bbc-5", [t for t, _ in bbc], tuple(label for _, label in bbc)),
        ("probe", [t for t, _ in probe], tuple(label for _, label in probe)),
        ("probe-Cap", [t for t, _ in probe], tuple(label.capitalize() for _, label in probe)),
    ]


def label_set(truth: tuple[str, ...]) -> tuple[str, ...]:
    order = ("fresh", "rotten", "plot", "positive", "negative", "Positive", "Negative")
    present = set(truth)
    return tuple(x for x in order if x in present) + tuple(sorted(present - set(order)))


def score(proba: np.ndarray, truth: tuple[str, ...], labels: tuple[str, ...]) -> tuple[float, float]:
    predicted = [labels[i] for i in proba.argmax(axis=1)]
    accuracy = float(np.mean([p == t for p, t in zip(predicted, truth)]))
    return accuracy, float(f1_score(truth, predicted, labels=list(labels), average="macro", zero_division=0))


def variant_proba(
    zs: ZeroShotClassifier,
    embedded: np.ndarray,
    labels: tuple[str, ...],
    templates: tuple[str, ...],
    casing: Callable[[str], str],
    anchors: bool,
    scale: float,
) -> np.ndarray:
    prompts = zs.embed([t.format(casing(label)) for t in templates for label in labels])
    label_emb = prompts.reshape(len(templates), len(labels), -1).mean(axis=0)
    label_emb /= np.linalg.norm(label_emb, axis=1, keepdims=True)
    bias: Optional[np.ndarray] = None
    if anchors:
        bias = (zs.embed(list(ANCHORS)) @ label_emb.T).mean(axis=0)
    sims = embedded @ label_emb.T - (0.0 if bias is None else bias)
    return similarity_proba(sims, scale, False)


def calibration(proba: np.ndarray, truth: tuple[str, ...], labels: tuple[str, ...]) -> tuple[float, float, float]:
    """Accuracy, mean top probability and expected calibration error (10 equal-width bins)."""
    top = proba.max(axis=1)
    correct = np.array([labels[i] == t for i, t in zip(proba.argmax(axis=1), truth)], dtype=float)
    bins = np.minimum((top * 10).astype(int), 9)
    ece = sum(abs(correct[bins == b].mean() - top[bins == b].mean()) * (bins == b).mean() for b in np.unique(bins))
    return float(correct.mean()), float(top.mean()), float(ece)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--old-scale", type=float, default=30.0, help="the SCALE served before, for comparison")
    parser.add_argument("--cache", help="an .npz to keep the text embeddings in between runs (same options only)")
    args = parser.parse_args()

    zs = ZeroShotClassifier(MINILM, select_runtime(args.precision))
    sets = load_sets(args.per_class)
    started = time.perf_counter()
    if args.cache and Path(args.cache).is_file():
        with np.load(args.cache) as cached:
            embedded = {name: cached[name] for name in cached.files}
    else:
        embedded = {name: zs.embed(texts) for name, texts, _ in sets}
        if args.cache:
            np.savez(args.cache, **embedded)
    print(f"embedded {sum(len(t) for _, t, _ in sets)} texts in {time.perf_counter() - started:.1f} s")

    print(f"\n{'variant':<34}" + "".join(f"{name:>17}" for name, _, _ in sets) + f"{'mean acc':>10}")
    print(f"{'':<34}" + "".join(f"{'acc':>9}{'mF1':>8}" for _ in sets))
    results: dict[str, float] = {}
    for template_name, templates in TEMPLATES.items():
        for casing_name, casing in CASINGS.items():
            for anchors in (True, False):
                name = f"{template_name}/{casing_name}/{'anchors' if anchors else 'no-anchors'}"
                row, accs = "", []
                for set_name, _, truth in sets:
                    labels = label_set(truth)
                    proba = variant_proba(zs, embedded[set_name], labels, templates, casing, anchors, 1.0)
                    accuracy, macro = score(proba, truth, labels)
                    accs.append(accuracy)
                    row += f"{accuracy:>9.3f}{macro:>8.3f}"
                results[name] = float(np.mean(accs))
                print(f"{name:<34}{row}{results[name]:>10.3f}")
    best = max(results, key=results.__getitem__)
    print(f"\nbest mean accuracy: {best} ({results[best]:.3f})")

    print(f"\nserved ZeroShotClassifier (revision {zs.REVISION}, SCALE {zs.SCALE}): accuracy, macro-F1, calibration;")
    print(f"old: revision 1 ('This text is {{}}.', anchor bias correction, SCALE {args.old_scale})")
    print(f"{'set':<11}{'acc':>7}{'mF1':>7}   {'old: mean top-p':>16}{'ECE':>7}   {'new: mean top-p':>16}{'ECE':>7}")
    for set_name, _, truth in sets:
        labels = label_set(truth)
        served = zs.proba_from_embeddings(embedded[set_name], labels, False)
        accuracy, macro = score(served, truth, labels)
        old = variant_proba(zs, embedded[set_name], labels, ("This text is {}.",), str, True, args.old_scale)
        _, old_top, old_ece = calibration(old, truth, labels)
        _, new_top, new_ece = calibration(served, truth, labels)
        print(
            f"{set_name:<11}{accuracy:>7.3f}{macro:>7.3f}   {old_top:>16.3f}{old_ece:>7.3f}   {new_top:>16.3f}{new_ece:>7.3f}"
        )
    print("\nSCALE sweep for the served prompts: log-loss per set (sum over sets), mean top probability per set")
    for scale in (5.0, 10.0, 12.0, 15.0, 20.0, 30.0, 40.0):
        losses, tops = [], []
        for set_name, _, truth in sets:
            labels = label_set(truth)
            proba = similarity_proba(zs.similarities(embedded[set_name], labels), scale, False)
            index = np.array([labels.index(t) for t in truth])
            losses.append(float(-np.log(np.maximum(proba[np.arange(len(index)), index], 1e-12)).mean()))
            tops.append(float(proba.max(axis=1).mean()))
        detail = " ".join(f"{loss:.3f}/{top:.2f}" for loss, top in zip(losses, tops))
        print(f"  SCALE {scale:>5.1f}: log-loss sum {sum(losses):.3f}   {detail}")
    probe = zs.predict_proba(["I love this phone", "This is awful"], ("positive", "negative"), False)
    print(f"\n'I love this phone' -> positive {probe[0, 0]:.2f}; 'This is awful' -> negative {probe[1, 1]:.2f}")


if __name__ == "__main__":
    main()
