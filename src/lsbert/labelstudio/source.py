"""Where labelled data comes from: a Label Studio project (through label-studio-sdk) or an export file.

Only this module reads annotations from Label Studio (the trainer's data, the predictor's embedding heads).
Nothing here logs the API key or task texts.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

from lsbert.labelstudio.examples import tasks_from_export

log = logging.getLogger(__name__)

EXPORT_TIMEOUT_S = 600.0  # the synchronous export of a large project takes a while


class DataSourceError(RuntimeError):
    """Training data or the labelling config could not be obtained; the message says what to fix."""


def read_label_config(value: str) -> str:
    """``--label-config``: the XML itself, or ``@path`` to a file holding it."""
    if value.startswith("@"):
        path = Path(value[1:]).expanduser()
        try:
            return path.read_text(encoding="utf-8")
        except OSError as exc:
            raise DataSourceError(f"cannot read the labelling config from {path}: {exc.strerror or exc}") from None
    return value


def read_export_file(path: str | Path) -> tuple[list[Any], Optional[str]]:
    """Tasks of a Label Studio JSON export file, and the labelling config if the file carries one (the
    body of a legacy ``POST /train`` does)."""
    path = Path(path).expanduser()
    try:
        with path.open("rb") as fh:
            payload = json.load(fh)
    except OSError as exc:
        raise DataSourceError(f"cannot read the export file {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise DataSourceError(f"the export file {path} is not valid JSON: {exc}") from None
    try:
        tasks = tasks_from_export(payload)
    except ValueError as exc:
        raise DataSourceError(f"{path}: {exc}") from None
    config = payload.get("label_config") if isinstance(payload, dict) else None
    return tasks, config if isinstance(config, str) and config.strip() else None


def _api_error(exc: Exception, what: str) -> DataSourceError:
    status = getattr(exc, "status_code", None)
    if status in (401, 403):
        hint = "check LABEL_STUDIO_API_KEY (a legacy token or a Personal Access Token of a project member)"
    elif status == 404:
        hint = "check the project id and LABEL_STUDIO_URL"
    else:
        hint = "check LABEL_STUDIO_URL and that Label Studio is reachable from here"
    detail = f"HTTP {status}" if status else f"{type(exc).__name__}: {exc}"
    return DataSourceError(f"Label Studio: cannot {what} ({detail}); {hint}")


class LabelStudioSource:
    """The labelled tasks and labelling config of a project, read through label-studio-sdk.

    ``LabelStudio(api_key=...)`` accepts legacy tokens and Personal Access Tokens (it exchanges a PAT for
    an access token itself), which the legacy ``Client`` of the upstream example did not."""

    def __init__(self, url: str, api_key: str, timeout: float = EXPORT_TIMEOUT_S, client=None):
        if client is None:
            from label_studio_sdk import LabelStudio  # heavy import, only when the API is used

            client = LabelStudio(base_url=url, api_key=api_key, timeout=timeout)
        self.url = url
        self.client = client

    def label_config(self, project: int) -> str:
        try:
            config = self.client.projects.get(id=project).label_config
        except Exception as exc:  # the SDK raises ApiError, httpx errors, pydantic errors
            raise _api_error(exc, f"read project {project}") from None
        if not isinstance(config, str) or not config.strip():
            raise DataSourceError(f"Label Studio project {project} has no labelling config yet")
        return config

    def labelled_tasks(self, project: int) -> list[Any]:
        """Tasks with at least one annotation, in JSON export format.

        Uses the project's synchronous JSON export; where that endpoint is missing (Label Studio
        Enterprise answers 404), the tasks API with ``fields=all``."""
        try:
            chunks = self.client.projects.exports.download_sync(
                id=project, export_type="JSON", download_all_tasks=False
            )
            payload = json.loads(b"".join(chunks))
            return tasks_from_export(payload)
        except Exception as exc:
            if getattr(exc, "status_code", None) != 404:
                if isinstance(exc, ValueError) and not hasattr(exc, "status_code"):
                    raise DataSourceError(f"Label Studio: the export of project {project} is not valid JSON") from None
                raise _api_error(exc, f"export project {project}") from None
            log.info("project export unavailable (HTTP 404); reading tasks through the tasks API")
        try:
            return [
                self._task_dict(task)
                for task in self.client.tasks.list(project=project, fields="all", only_annotated=True)
            ]
        except Exception as exc:
            raise _api_error(exc, f"list the tasks of project {project}") from None

    @staticmethod
    def _task_dict(task: Any) -> Any:
        if isinstance(task, dict):
            return task
        dump = getattr(task, "model_dump", None)  # SDK objects are pydantic models
        return dump(mode="json") if dump is not None else task
