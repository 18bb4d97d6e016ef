"""From Label Studio tasks to labelled examples: pure functions, no I/O (the trainer's data set and the
predictor's embedding head read annotations alike).

One example per task. Which annotation speaks for a task:

1. annotations that were cancelled (``was_cancelled``, the annotator pressed "Skip") are ignored;
2. so are annotations with no answer for the served ``Choices`` control (empty ``result``, or results of
   other controls only);
3. of the rest, a ground-truth annotation wins; otherwise the most recent one (``updated_at``, then
   ``created_at``, then ``id``).

The chosen annotation's choices are kept if the current config still has them; a task left with no label
(or, for a single-choice control, with more than one) is skipped. Every skipped task is counted under
one reason, so a training log can say why the data set is smaller than the project.
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional, Sequence

if TYPE_CHECKING:  # annotations only: the training loop imports Example without the XML parser
    from lsbert.labelconfig import ClassificationSpec

CHOICES_TYPE = "choices"

# Reasons a task yields no example (keys of DatasetReport.skipped).
NO_ANNOTATIONS = "no_annotations"  # task has no annotation at all
CANCELLED = "cancelled"  # every annotation was cancelled (skipped by the annotator)
NO_CHOICE = "no_choice"  # no non-cancelled annotation answers the served Choices control
LABELS_REMOVED = "labels_not_in_config"  # the chosen answer only names labels the config no longer has
MULTIPLE_CHOICES = "multiple_choices"  # single-choice control, but the answer names several labels
NO_TEXT = "no_text"  # task data lacks the text field, or it is not a non-empty string
NOT_A_TASK = "not_a_task"  # an export entry that is not a task object


@dataclass(frozen=True)
class Example:
    text: str
    labels: tuple[str, ...]  # exactly one for a single-choice control
    task_id: Optional[int] = None
    # Which annotation gave the labels, and when it was last changed (seconds since the epoch); not part of
    # an example's identity.
    annotation_id: Optional[int] = field(default=None, compare=False)
    changed_at: Optional[float] = field(default=None, compare=False)

    @property
    def label(self) -> str:
        """The label a stratified split groups by: the only one, or the first of several."""
        return self.labels[0]


@dataclass
class DatasetReport:
    tasks: int = 0
    examples: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    label_counts: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            "examples": self.examples,
            "skipped": dict(self.skipped),
            "label_counts": dict(self.label_counts),
        }


def tasks_from_export(payload: Any) -> list[Any]:
    """The task list of a Label Studio JSON export (a list), or of a legacy ``/train`` body
    (``{"annotations": [...]}``) or a ``{"tasks": [...]}`` wrapper."""
    if isinstance(payload, list):
        return payload
    if isinstance(payload, Mapping):
        for key in ("tasks", "annotations"):
            value = payload.get(key)
            if isinstance(value, list):
                return value
    raise ValueError("not a Label Studio JSON export: expected a list of tasks")


def _timestamp(value: Any) -> Optional[datetime]:
    if not isinstance(value, str) or not value:
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"  # fromisoformat accepts "Z" only from Python 3.11
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


_EPOCH = datetime.min.replace(tzinfo=timezone.utc)


def _recency(annotation: Mapping[str, Any]) -> tuple[datetime, datetime, int]:
    updated = _timestamp(annotation.get("updated_at"))
    created = _timestamp(annotation.get("created_at"))
    ident = annotation.get("id")
    return (updated or created or _EPOCH, created or _EPOCH, ident if isinstance(ident, int) else -1)


def annotation_choices(annotation: Mapping[str, Any], spec: ClassificationSpec) -> list[str]:
    """The choices an annotation gives for the served control, in order, without duplicates."""
    chosen: list[str] = []
    result = annotation.get("result")
    if not isinstance(result, list):
        return chosen
    for region in result:
        if not isinstance(region, Mapping):
            continue
        if (
            region.get("from_name") != spec.from_name
            or region.get("to_name") != spec.to_name
            or str(region.get("type", "")).lower() != CHOICES_TYPE
        ):
            continue
        value = region.get("value")
        choices = value.get("choices") if isinstance(value, Mapping) else None
        if isinstance(choices, str):
            choices = [choices]
        if not isinstance(choices, list):
            continue
        for choice in choices:
            if isinstance(choice, str) and choice not in chosen:
                chosen.append(choice)
    return chosen


def changed_at(annotation: Mapping[str, Any]) -> Optional[float]:
    """When an annotation was last changed (``updated_at``, else ``created_at``), in seconds since the epoch."""
    stamp = _timestamp(annotation.get("updated_at")) or _timestamp(annotation.get("created_at"))
    return stamp.timestamp() if stamp else None


def select_annotation(
    annotations: Iterable[Any], spec: ClassificationSpec
) -> tuple[Optional[list[str]], Optional[str]]:
    """``(choices, None)`` of the annotation that speaks for the task, or ``(None, reason)``."""
    _, choices, reason = chosen_annotation(annotations, spec)
    return choices, reason


def chosen_annotation(
    annotations: Iterable[Any], spec: ClassificationSpec
) -> tuple[Optional[Mapping[str, Any]], Optional[list[str]], Optional[str]]:
    """``(annotation, choices, None)`` of the annotation that speaks for the task, or ``(None, None, reason)``."""
    usable: list[tuple[bool, tuple, list[str], Mapping[str, Any]]] = []
    seen = cancelled = 0
    for annotation in annotations:
        if not isinstance(annotation, Mapping):
            continue
        seen += 1
        if annotation.get("was_cancelled"):
            cancelled += 1
            continue
        choices = annotation_choices(annotation, spec)
        if choices:
            usable.append((bool(annotation.get("ground_truth")), _recency(annotation), choices, annotation))
    if not usable:
        if seen == 0:
            return None, None, NO_ANNOTATIONS
        return None, None, CANCELLED if cancelled == seen else NO_CHOICE
    _, _, choices, annotation = max(usable, key=lambda item: (item[0], item[1]))
    return annotation, choices, None


def task_example(task: Any, spec: ClassificationSpec) -> tuple[Optional[Example], Optional[str]]:
    """One task → ``(Example, None)`` or ``(None, reason it was skipped)``."""
    if not isinstance(task, Mapping):
        return None, NOT_A_TASK
    annotations = task.get("annotations")
    annotation, choices, reason = chosen_annotation(annotations if isinstance(annotations, list) else [], spec)
    if annotation is None or choices is None:
        return None, reason
    known = set(spec.labels)
    labels = tuple(choice for choice in choices if choice in known)
    if not labels:
        return None, LABELS_REMOVED
    if not spec.multi_label and len(labels) > 1:
        return None, MULTIPLE_CHOICES
    data = task.get("data")
    text = data.get(spec.data_key) if isinstance(data, Mapping) else None
    if not isinstance(text, str) or not text.strip():
        return None, NO_TEXT
    task_id = task.get("id")
    annotation_id = annotation.get("id")
    return (
        Example(
            text=text,
            labels=labels,
            task_id=task_id if isinstance(task_id, int) else None,
            annotation_id=annotation_id
            if isinstance(annotation_id, int) and not isinstance(annotation_id, bool)
            else None,
            changed_at=changed_at(annotation),
        ),
        None,
    )


def build_examples(tasks: Sequence[Any], spec: ClassificationSpec) -> tuple[list[Example], DatasetReport]:
    """Examples for the served control, in task order, and a report of what was skipped and why."""
    examples: list[Example] = []
    skipped: Counter[str] = Counter()
    for task in tasks:
        example, reason = task_example(task, spec)
        if example is None:
            skipped[reason or NOT_A_TASK] += 1
        else:
            examples.append(example)
    report = DatasetReport(
        tasks=len(tasks),
        examples=len(examples),
        skipped=dict(sorted(skipped.items())),
        label_counts=label_counts(examples, spec.labels),
    )
    return examples, report


def label_counts(examples: Iterable[Example], labels: Sequence[str]) -> dict[str, int]:
    """How many examples carry each label, in config order (labels with no example count 0)."""
    counts = Counter(label for example in examples for label in example.labels)
    return {label: counts.get(label, 0) for label in labels}


def _order_key(example: Example) -> tuple:
    # Independent of the order the API returned tasks in, so a split depends only on the data and seed.
    return (example.task_id if example.task_id is not None else -1, example.text, example.labels)


def split_examples(
    examples: Sequence[Example], validation_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Stratified, deterministic train/validation split.

    Examples are grouped by their (first) label; each group gives ``n * fraction`` (rounded half up) examples to
    validation but always keeps at least one for training, so a label seen once is trained on, never only
    evaluated. The same examples and seed always give the same split, whatever order they came in.
    """
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    groups: dict[str, list[Example]] = defaultdict(list)
    for example in examples:
        groups[example.label].append(example)
    rng = random.Random(seed)
    train: list[Example] = []
    validation: list[Example] = []
    for label in sorted(groups):
        group = sorted(groups[label], key=_order_key)
        rng.shuffle(group)
        n_val = min(len(group) - 1, math.floor(len(group) * validation_fraction + 0.5))
        validation.extend(group[:n_val])
        train.extend(group[n_val:])
    rng.shuffle(train)
    rng.shuffle(validation)
    return train, validation
