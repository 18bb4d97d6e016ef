"""The KServe model: V1 (``/v1/models/{name}:predict``) and Open Inference Protocol V2
(``/v2/models/{name}/infer``) over plain texts, answering label names and per-label probabilities.

Which model answers: ``project`` (V1 body key, or V2 ``parameters.project``) picks a Label Studio project's
model; ``labels`` (and ``multi_label``) asks for a zero-shot answer over those labels; with neither, the
only known project (or ``DEFAULT_PROJECT``) is used.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any, Dict, Optional, Union

import numpy as np
from kserve import Model
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

from lsbert.predictor.errors import UnknownProject
from lsbert.predictor.service import PredictorService, parse_project_id

log = logging.getLogger(__name__)


def _texts(values: Any) -> list[str]:
    if not isinstance(values, (list, tuple)):
        raise InvalidInput("expected a list of texts")
    texts = []
    for i, value in enumerate(values):
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        if isinstance(value, dict):
            value = value.get("text")
        if not isinstance(value, str):
            raise InvalidInput(f"instance {i} is not a text (a string, or an object with a 'text' string)")
        texts.append(value)
    return texts


def _param(params: Any, name: str) -> Any:
    if not params:
        return None
    value = params.get(name)
    # gRPC parameters arrive as InferParameter messages
    for attr in ("string_param", "int64_param", "bool_param"):
        if hasattr(value, attr) and value.HasField(attr):
            return getattr(value, attr)
    return value


class LsbertModel(Model):
    def __init__(self, name: str, service: PredictorService):
        super().__init__(name)
        self.service = service

    def load(self) -> bool:
        self.service.load()
        self.ready = True
        return self.ready

    def stop(self) -> None:
        """Called when KServe's model repository extension unloads the model (and at shutdown). lsbert
        cannot be loaded back through that extension, so liveness fails from now on and the pod restarts
        instead of staying alive but never ready."""
        super().stop()
        if not self.service.unloaded:
            self.service.unloaded = True
            log.error("model %s unloaded: not ready, and GET / (liveness) answers 503 from now on", self.name)

    async def predict(
        self,
        payload: Union[Dict, InferRequest],
        headers: Optional[Dict[str, str]] = None,
        response_headers: Optional[Dict[str, str]] = None,
    ) -> Union[Dict, InferResponse]:
        if isinstance(payload, InferRequest):
            if not payload.inputs:
                raise InvalidInput("the request has no inputs")
            texts = _texts(list(payload.inputs[0].data))
            params = payload.parameters or {}
            if not isinstance(params, dict):
                raise InvalidInput("'parameters' must be a JSON object")
        else:
            if isinstance(payload, (bytes, str)):  # a body sent without a JSON content type
                try:
                    payload = json.loads(payload)
                except ValueError:
                    raise InvalidInput("the request body is not valid JSON") from None
            if not isinstance(payload, dict):
                raise InvalidInput("the request body must be a JSON object")
            texts = _texts(payload.get("instances", payload.get("inputs")))
            parameters = payload.get("parameters")
            if parameters is not None and not isinstance(parameters, dict):
                raise InvalidInput("'parameters' must be a JSON object")
            params = {**(parameters or {}), **payload}
        project_value = _param(params, "project")
        labels = _param(params, "labels")
        if isinstance(labels, str):
            labels = [part.strip() for part in labels.split(",") if part.strip()]
        try:
            project = parse_project_id(project_value) if project_value is not None else None
            classified = await self.service.classify_texts(
                texts, project=project, labels=labels, multi_label=bool(_param(params, "multi_label"))
            )
        except (UnknownProject, ValueError, TypeError) as exc:  # KServe's protocols answer bad input with 400
            raise InvalidInput(str(exc)) from None

        chosen = [list(p.chosen) for p in classified.predictions]
        if isinstance(payload, InferRequest):
            n, width = len(texts), len(classified.labels)
            outputs = [
                InferOutput("label", [n], "BYTES", [c[0] if c else "" for c in chosen]),
                InferOutput(
                    "probabilities",
                    [n, width],
                    "FP32",
                    np.asarray(classified.probabilities, dtype=np.float32).reshape(n, width).flatten().tolist(),
                ),
            ]
            return InferResponse(
                response_id=payload.id or str(uuid.uuid4()),
                model_name=self.name,
                infer_outputs=outputs,
                model_version=classified.version,
                parameters={"labels": ",".join(classified.labels), "model_version": classified.version},
            )
        return {
            "predictions": [
                {"label": c[0] if c else None, "labels": c, "score": p.score, "probabilities": p.probabilities}
                for c, p in zip(chosen, classified.predictions)
            ],
            "labels": list(classified.labels),
            "model_version": classified.version,
        }
