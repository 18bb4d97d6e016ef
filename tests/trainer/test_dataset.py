"""Building the training set from Label Studio 1.23 exports: which annotation speaks for a task, which tasks
are skipped and why, and the stratified split."""

import json
import os
import random
from collections import Counter
from pathlib import Path

import pytest

from lsbert.labelconfig import parse_label_config
from lsbert.trainer import dataset as ds
from lsbert.trainer.dataset import Example, build_examples, split_examples, tasks_from_export
from tests.trainer.lsexport import SENTIMENT_CONFIG, annotation, choices_config, result, task

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(os.environ.get("LSBERT_SHARED_DIR", REPO.parent / "shared")) / "fixtures" / "label-studio-1.23.2"

SPEC = parse_label_config(SENTIMENT_CONFIG)
THREE = parse_label_config(choices_config(["Positive", "Negative", "Neutral"]))
MULTI = parse_label_config(choices_config(["news", "sports", "tech"], name="topics", multiple=True))


def one(tasks, spec=SPEC):
    examples, report = build_examples(tasks, spec)
    return examples, report


def text_task(task_id, annotations, text="a text"):
    return task(task_id, {"text": text}, annotations)


# --- real captures -----------------------------------------------------------------------------------


def test_legacy_train_body_captured_from_label_studio():
    path = FIXTURES / "train-legacy.json"
    if not path.exists():
        pytest.skip(f"{path} not found (set LSBERT_SHARED_DIR)")
    body = json.loads(path.read_text())["body_json"]
    tasks = tasks_from_export(body)
    examples, report = build_examples(tasks, parse_label_config(body["label_config"]))
    assert [(e.task_id, e.labels) for e in examples] == [(1, ("Positive",)), (2, ("Negative",)), (3, ("Positive",))]
    assert examples[0].text == "I love this product, it works great."
    assert report.as_dict() == {
        "tasks": 3,
        "examples": 3,
        "skipped": {},
        "label_counts": {"Positive": 2, "Negative": 1},
    }


def test_interactive_predict_task_with_annotation_captured_from_label_studio():
    path = FIXTURES / "predict-interactive.json"
    if not path.exists():
        pytest.skip(f"{path} not found (set LSBERT_SHARED_DIR)")
    body = json.loads(path.read_text())["body_json"]
    # The task carries a prediction ("Positive") and the annotator's answer ("Negative"): only the latter counts.
    examples, _ = build_examples(tasks_from_export(body), parse_label_config(body["label_config"]))
    assert [(e.task_id, e.labels) for e in examples] == [(4, ("Negative",))]


def test_export_wrappers():
    tasks = [text_task(1, [])]
    assert tasks_from_export(tasks) is tasks
    assert tasks_from_export({"annotations": tasks}) is tasks
    assert tasks_from_export({"tasks": tasks}) is tasks
    with pytest.raises(ValueError):
        tasks_from_export({"project": 1})


# --- which annotation wins -------------------------------------------------------------------------------


def test_ground_truth_wins_over_a_more_recent_annotation():
    tasks = [
        text_task(
            1,
            [
                annotation(1, 1, [result(["Negative"])], created_at="2026-11-28T10:00:00Z", ground_truth=True),
                annotation(2, 1, [result(["Positive"])], created_at="2026-11-28T12:00:00Z"),
            ],
        )
    ]
    examples, _ = one(tasks)
    assert examples[0].labels == ("Negative",)


def test_most_recent_of_several_annotators_wins():
    tasks = [
        text_task(
            1,
            [
                annotation(
                    5,
                    1,
                    [result(["Negative"])],
                    created_at="2026-11-28T09:00:00Z",
                    updated_at="2026-11-28T13:00:00Z",
                    completed_by=2,
                ),
                annotation(6, 1, [result(["Positive"])], created_at="2026-11-28T12:00:00Z", completed_by=3),
                annotation(7, 1, [result(["Positive"])], created_at="2026-11-28T11:00:00.123456+00:00", completed_by=4),
            ],
        )
    ]
    examples, _ = one(tasks)
    assert examples[0].labels == ("Negative",)  # edited last, though created first


def test_equal_timestamps_fall_back_to_the_annotation_id():
    stamp = "2026-11-28T13:09:18.717143Z"
    tasks = [
        text_task(
            1,
            [
                annotation(9, 1, [result(["Negative"])], created_at=stamp),
                annotation(3, 1, [result(["Positive"])], created_at=stamp),
            ],
        )
    ]
    assert one(tasks)[0][0].labels == ("Negative",)


def test_cancelled_annotations_are_skipped():
    tasks = [
        text_task(1, [annotation(1, 1, [], was_cancelled=True)]),
        text_task(
            2,
            [
                annotation(2, 2, [result(["Positive"])], created_at="2026-11-28T10:00:00Z"),
                # Newer, but the annotator pressed Skip (LS may keep a result on a cancelled annotation).
                annotation(3, 2, [result(["Negative"])], created_at="2026-11-28T12:00:00Z", was_cancelled=True),
            ],
        ),
    ]
    examples, report = one(tasks)
    assert [(e.task_id, e.labels) for e in examples] == [(2, ("Positive",))]
    assert report.skipped == {ds.CANCELLED: 1}


def test_empty_annotations_are_skipped():
    tasks = [
        text_task(1, [annotation(1, 1, [])]),
        text_task(
            2,
            [
                annotation(2, 2, [result(["Negative"])], created_at="2026-11-28T10:00:00Z"),
                annotation(3, 2, [], created_at="2026-11-28T12:00:00Z"),
                annotation(4, 2, [result([])], created_at="2026-11-28T12:30:00Z"),
            ],
        ),
        text_task(3, []),
    ]
    examples, report = one(tasks)
    assert [(e.task_id, e.labels) for e in examples] == [(2, ("Negative",))]
    assert report.skipped == {ds.NO_CHOICE: 1, ds.NO_ANNOTATIONS: 1}


def test_results_of_other_controls_are_ignored():
    config = (
        '<View><Text name="text" value="$text"/><Text name="title" value="$title"/>'
        '<Choices name="sentiment" toName="text" choice="single">'
        '<Choice value="Positive"/><Choice value="Negative"/></Choices>'
        '<Choices name="quality" toName="text"><Choice value="Positive"/><Choice value="Bad"/></Choices>'
        '<Choices name="sentiment2" toName="title"><Choice value="Negative"/></Choices></View>'
    )
    spec = parse_label_config(config)
    tasks = [
        text_task(
            1,
            [
                annotation(
                    1,
                    1,
                    [
                        result(["Positive"], from_name="quality"),  # same label name, another control
                        result(["Negative"], from_name="sentiment2", to_name="title"),
                        {
                            "from_name": "sentiment",
                            "to_name": "text",
                            "type": "textarea",
                            "value": {"text": ["Negative"]},
                        },
                        result(["Negative"]),
                    ],
                )
            ],
        ),
        text_task(2, [annotation(2, 2, [result(["Positive"], from_name="quality")])]),
        text_task(3, [annotation(3, 3, [result(["Positive"], to_name="title")])]),
    ]
    examples, report = one(tasks, spec)
    assert [(e.task_id, e.labels) for e in examples] == [(1, ("Negative",))]
    assert report.skipped == {ds.NO_CHOICE: 2}


# --- labels --------------------------------------------------------------------------------------------


def test_multi_label_keeps_every_choice_in_order():
    tasks = [
        task(1, {"text": "x"}, [annotation(1, 1, [result(["tech", "news"], from_name="topics")])]),
        task(2, {"text": "y"}, [annotation(2, 2, [result(["sports"], from_name="topics")])]),
    ]
    examples, report = build_examples(tasks, MULTI)
    assert [e.labels for e in examples] == [("tech", "news"), ("sports",)]
    assert report.label_counts == {"news": 1, "sports": 1, "tech": 1}


def test_single_choice_control_needs_exactly_one_label():
    # e.g. the config was switched from choice="multiple" to single after annotating
    tasks = [text_task(1, [annotation(1, 1, [result(["Positive", "Negative"])])])]
    examples, report = one(tasks)
    assert examples == [] and report.skipped == {ds.MULTIPLE_CHOICES: 1}


def test_labels_removed_from_the_config_are_dropped():
    tasks = [
        text_task(1, [annotation(1, 1, [result(["Neutral"])])]),  # Neutral was removed: nothing left
        task(2, {"text": "x"}, [annotation(2, 2, [result(["gaming", "tech"], from_name="topics")])]),
    ]
    examples, report = build_examples(tasks[:1], SPEC)
    assert examples == [] and report.skipped == {ds.LABELS_REMOVED: 1}
    examples, report = build_examples(tasks[1:], MULTI)
    assert examples[0].labels == ("tech",) and report.skipped == {}


def test_label_counts_follow_the_config_order_and_include_unused_labels():
    tasks = [
        text_task(i, [annotation(i, i, [result([label])])])
        for i, label in enumerate(["Neutral", "Negative", "Neutral"])
    ]
    _, report = build_examples(tasks, THREE)
    assert list(report.label_counts.items()) == [("Positive", 0), ("Negative", 1), ("Neutral", 2)]


# --- text ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [{}, {"text": None}, {"text": 42}, {"text": ["a"]}, {"text": "   "}, {"other": "x"}])
def test_tasks_without_usable_text_are_skipped_and_counted(data):
    tasks = [
        task(1, data, [annotation(1, 1, [result(["Positive"])])]),
        text_task(2, [annotation(2, 2, [result(["Negative"])])]),
    ]
    examples, report = one(tasks)
    assert [e.task_id for e in examples] == [2]
    assert report.skipped == {ds.NO_TEXT: 1}
    assert report.tasks == 2 and report.examples == 1


def test_text_comes_from_the_configured_data_key():
    spec = parse_label_config(
        '<View><Text name="review" value="$body"/><Choices name="s" toName="review">'
        '<Choice value="A"/><Choice value="B"/></Choices></View>'
    )
    tasks = [task(1, {"body": "the body", "text": "not this"}, [annotation(1, 1, [result(["B"], "s", "review")])])]
    examples, _ = build_examples(tasks, spec)
    assert examples == [Example("the body", ("B",), 1)]


def test_garbage_entries_do_not_crash():
    messy = text_task(3, [annotation(3, 3, [None, {"from_name": "sentiment"}, result(["Positive"])])])
    messy["annotations"][:0] = [None, "x"]
    tasks = ["not a task", None, {"id": 1}, {"id": 2, "annotations": "x", "data": {"text": "t"}}, messy]
    examples, report = one(tasks)
    assert [e.task_id for e in examples] == [3]
    assert report.skipped == {ds.NOT_A_TASK: 2, ds.NO_ANNOTATIONS: 2}


# --- split ---------------------------------------------------------------------------------------------


def make_examples(counts: dict[str, int]) -> list[Example]:
    out, i = [], 0
    for label, n in counts.items():
        for _ in range(n):
            out.append(Example(f"text {i}", (label,), i))
            i += 1
    return out


def test_split_is_stratified():
    examples = make_examples({"a": 50, "b": 30, "c": 10, "d": 1})
    train, val = split_examples(examples, 0.2, seed=1)
    assert Counter(e.label for e in val) == {"a": 10, "b": 6, "c": 2}  # d, seen once, is only trained on
    assert Counter(e.label for e in train) == {"a": 40, "b": 24, "c": 8, "d": 1}
    assert sorted(e.task_id for e in train + val) == list(range(91))


def test_split_is_deterministic_and_independent_of_input_order():
    examples = make_examples({"a": 40, "b": 25})
    shuffled = examples[:]
    random.Random(3).shuffle(shuffled)
    first = split_examples(examples, 0.25, seed=7)
    assert split_examples(shuffled, 0.25, seed=7) == first
    assert split_examples(examples, 0.25, seed=8)[1] != first[1]


def test_split_keeps_one_training_example_per_label():
    train, val = split_examples(make_examples({"a": 2, "b": 1}), 0.9, seed=0)
    assert Counter(e.label for e in train) == {"a": 1, "b": 1} and [e.label for e in val] == ["a"]


def test_split_with_no_validation_fraction():
    examples = make_examples({"a": 5, "b": 5})
    train, val = split_examples(examples, 0.0, seed=0)
    assert val == [] and len(train) == 10


def test_multi_label_split_stratifies_by_first_label():
    examples = [Example(f"t{i}", ("news", "tech") if i % 2 else ("sports",), i) for i in range(20)]
    _, val = split_examples(examples, 0.2, seed=0)
    assert Counter(e.label for e in val) == {"news": 2, "sports": 2}


def test_split_rejects_a_bad_fraction():
    with pytest.raises(ValueError):
        split_examples([], 1.0, seed=0)
