"""Reading a Label Studio labelling config: which ``Choices`` control lsbert serves, on which text.

Pure functions over the XML; no I/O. lsbert serves the first ``Choices`` control that is bound (``toName``)
to a ``Text`` or ``HyperText`` object and is not ``perRegion``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from xml.etree.ElementTree import Element

from defusedxml import ElementTree as SafeET

TEXT_OBJECTS = frozenset({"Text", "HyperText"})
MULTIPLE = "multiple"


class LabelConfigError(ValueError):
    """The labelling config cannot be served by a text classifier; the message says why."""


@dataclass(frozen=True)
class ClassificationSpec:
    """What lsbert predicts for one project: a Choices control over one text field."""

    from_name: str
    to_name: str
    data_key: str
    labels: tuple[str, ...]
    multi_label: bool
    text_is_url: bool = False  # <Text valueType="url">: the task holds a link to the text, not the text

    @property
    def fingerprint(self) -> str:
        """Short stable id of the label set, so a zero-shot model_version changes when the labels do."""
        digest = hashlib.sha1("\x1f".join((*self.labels, str(self.multi_label))).encode()).hexdigest()
        return digest[:6]


def _objects(root: Element) -> dict[str, Element]:
    return {name: el for el in root.iter() if el.tag in TEXT_OBJECTS and (name := el.get("name"))}


def _data_key(text_el: Element) -> str:
    value = (text_el.get("value") or "").strip()
    if not value.startswith("$") or len(value) < 2:
        raise LabelConfigError(
            f'<{text_el.tag} name="{text_el.get("name")}"> needs value="$field" naming the task data field, '
            f"got value={value!r}"
        )
    return value[1:]


def _labels(choices_el: Element) -> tuple[str, ...]:
    labels: list[str] = []
    for choice in choices_el.iter("Choice"):
        # With alias set, Label Studio stores the alias in results instead of the value.
        name = choice.get("alias") or choice.get("value")
        if name and name not in labels:
            labels.append(name)
    return tuple(labels)


def parse_label_config(xml: str) -> ClassificationSpec:
    """Return the classification lsbert serves for this config, or raise LabelConfigError."""
    if not isinstance(xml, str) or not xml.strip():
        raise LabelConfigError("the labelling config is empty")
    try:
        root = SafeET.fromstring(xml)
    except Exception as exc:  # defusedxml raises ParseError and its own DTD/entity errors
        raise LabelConfigError(f"the labelling config is not valid XML: {exc}") from None
    objects = _objects(root)
    seen_choices = False
    for el in root.iter("Choices"):
        seen_choices = True
        if el.get("perRegion", "").lower() == "true":
            continue
        to_name = (el.get("toName") or "").split(",")[0].strip()
        if to_name not in objects:
            continue
        labels = _labels(el)
        if len(labels) < 1:
            raise LabelConfigError(f'<Choices name="{el.get("name")}"> has no <Choice> values')
        return ClassificationSpec(
            from_name=el.get("name") or "choices",
            to_name=to_name,
            data_key=_data_key(objects[to_name]),
            labels=labels,
            multi_label=(el.get("choice") or "single").lower() == MULTIPLE,
            text_is_url=(objects[to_name].get("valueType") or "").lower() == "url",
        )
    if not seen_choices:
        raise LabelConfigError("the labelling config has no <Choices> control; lsbert classifies text with <Choices>")
    raise LabelConfigError("no <Choices> control in the labelling config is bound (toName) to a <Text> object")
