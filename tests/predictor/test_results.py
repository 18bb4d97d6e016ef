import numpy as np

from lsbert.labelconfig import parse_label_config
from lsbert.predictor.results import decide, project_probabilities, task_text, to_label_studio

SPEC = parse_label_config(
    '<View><Text name="text" value="$text"/><Choices name="s" toName="text">'
    '<Choice value="Positive"/><Choice value="Negative"/></Choices></View>'
)


def test_labels_missing_from_the_config_are_dropped_and_renormalised():
    probs = np.array([[0.5, 0.3, 0.2]], dtype=np.float32)
    kept, labels = project_probabilities(probs, ("Neutral", "Positive", "Negative"), SPEC)
    assert labels == ("Positive", "Negative")
    np.testing.assert_allclose(kept, [[0.6, 0.4]], rtol=1e-5)
    prediction = decide(kept[0], labels, False, 0.5)
    assert prediction.chosen == ("Positive",) and abs(prediction.score - 0.6) < 1e-5


def test_multi_label_uses_threshold():
    prediction = decide(np.array([0.9, 0.2, 0.6]), ("a", "b", "c"), True, 0.5)
    assert prediction.chosen == ("a", "c")
    assert 0.5 < prediction.score <= 1.0


def test_label_studio_shape():
    item = to_label_studio(decide(np.array([0.1, 0.9]), SPEC.labels, False, 0.5), SPEC, "v7")
    assert item["model_version"] == "v7" and abs(item["score"] - 0.9) < 1e-6
    (region,) = item["result"]
    assert region["from_name"] == "s" and region["to_name"] == "text" and region["type"] == "choices"
    assert region["value"] == {"choices": ["Negative"]}
    assert to_label_studio(None, SPEC, "v7")["result"] == []


def test_task_text_reasons():
    assert task_text({"data": {"text": "hi"}}, "text") == ("hi", None)
    for task, reason in [
        ({"data": {}}, "no field"),
        ({"data": {"text": 3}}, "not a string"),
        ({"data": {"text": "  "}}, "empty"),
        ({}, "no data"),
        ("x", "not an object"),
    ]:
        text, why = task_text(task, "text")
        assert text is None and reason in why
