"""The trainer's data set: Label Studio tasks to examples and the train/validation split.

The code lives in :mod:`lsbert.labelstudio.examples` (the predictor's embedding head reads annotations the
same way); this module keeps the trainer's names.
"""

from lsbert.labelstudio.examples import (
    CANCELLED,
    CHOICES_TYPE,
    LABELS_REMOVED,
    MULTIPLE_CHOICES,
    NO_ANNOTATIONS,
    NO_CHOICE,
    NO_TEXT,
    NOT_A_TASK,
    DatasetReport,
    Example,
    annotation_choices,
    build_examples,
    chosen_annotation,
    label_counts,
    select_annotation,
    split_examples,
    task_example,
    tasks_from_export,
)

__all__ = [
    "CANCELLED",
    "CHOICES_TYPE",
    "LABELS_REMOVED",
    "MULTIPLE_CHOICES",
    "NOT_A_TASK",
    "NO_ANNOTATIONS",
    "NO_CHOICE",
    "NO_TEXT",
    "DatasetReport",
    "Example",
    "annotation_choices",
    "build_examples",
    "chosen_annotation",
    "label_counts",
    "select_annotation",
    "split_examples",
    "task_example",
    "tasks_from_export",
]
