"""Label Studio 1.23 JSON-export shapes for tests: tasks and annotations built field for field like the
captures in shared/fixtures/label-studio-1.23.2 (train-legacy.json, predict-interactive.json)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

SENTIMENT_CONFIG = (
    '<View><Text name="text" value="$text"/><Choices name="sentiment" toName="text" choice="single">'
    '<Choice value="Positive"/><Choice value="Negative"/></Choices></View>'
)


def choices_config(labels: Sequence[str], name: str = "sentiment", multiple: bool = False, extra: str = "") -> str:
    choices = "".join(f'<Choice value="{label}"/>' for label in labels)
    mode = "multiple" if multiple else "single"
    return (
        f'<View><Text name="text" value="$text"/><Choices name="{name}" toName="text" choice="{mode}">'
        f"{choices}</Choices>{extra}</View>"
    )


def result(choices: Sequence[str], from_name: str = "sentiment", to_name: str = "text", type_: str = "choices") -> dict:
    return {"from_name": from_name, "to_name": to_name, "type": type_, "value": {"choices": list(choices)}}


def annotation(
    ann_id: int,
    task_id: int,
    results: Sequence[dict],
    *,
    created_at: str = "2026-11-28T13:09:18.717143Z",
    updated_at: Optional[str] = None,
    was_cancelled: bool = False,
    ground_truth: bool = False,
    completed_by: int = 1,
    project: int = 1,
) -> dict[str, Any]:
    return {
        "id": ann_id,
        "completed_by": completed_by,
        "result": list(results),
        "was_cancelled": was_cancelled,
        "ground_truth": ground_truth,
        "created_at": created_at,
        "updated_at": updated_at or created_at,
        "draft_created_at": None,
        "lead_time": 3.2,
        "prediction": {},
        "result_count": len(results),
        "unique_id": str(uuid.UUID(int=ann_id)),
        "import_id": None,
        "last_action": None,
        "bulk_created": False,
        "task": task_id,
        "project": project,
        "updated_by": completed_by,
        "parent_prediction": None,
        "parent_annotation": None,
        "last_created_by": None,
    }


def task(task_id: int, data: dict, annotations: Iterable[dict], project: int = 1) -> dict[str, Any]:
    anns = list(annotations)
    return {
        "id": task_id,
        "annotations": anns,
        "file_upload": None,
        "drafts": [],
        "predictions": [],
        "data": data,
        "meta": {},
        "created_at": "2026-11-28T13:09:17.326402Z",
        "updated_at": "2026-11-28T13:09:18.864326Z",
        "inner_id": task_id,
        "total_annotations": sum(not a["was_cancelled"] for a in anns),
        "cancelled_annotations": sum(bool(a["was_cancelled"]) for a in anns),
        "total_predictions": 0,
        "comment_count": 0,
        "unresolved_comment_count": 0,
        "last_comment_updated_at": None,
        "project": project,
        "updated_by": 1,
        "comment_authors": [],
    }


def labelled_export(rows: Sequence[tuple[str, str]], from_name: str = "sentiment", project: int = 1) -> list[dict]:
    """One single-annotator task per (text, label) row."""
    return [
        task(i, {"text": text}, [annotation(i, i, [result([label], from_name=from_name)], project=project)], project)
        for i, (text, label) in enumerate(rows, start=1)
    ]


def write_export(path: Path, tasks: list[dict]) -> Path:
    path.write_text(json.dumps(tasks), encoding="utf-8")
    return path
