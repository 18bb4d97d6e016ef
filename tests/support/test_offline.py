"""Self-tests of the harness that need no Label Studio: datasets and the label-config helper."""

from __future__ import annotations

from collections import Counter
from xml.etree import ElementTree

import pytest

from tests.support import datasets
from tests.support.labelstudio import text_label_config


def test_datasets_load() -> None:
    rt = datasets.rotten_tomatoes()
    assert Counter(label for _, label in rt) == {"fresh": 7403, "rotten": 5405}
    assert all(text for text, _ in rt)

    bbc = datasets.bbc_news()
    assert len(bbc) == 2225
    assert Counter(label for _, label in bbc) == {
        "business": 510,
        "entertainment": 386,
        "politics": 417,
        "sports": 511,
        "tech": 401,
    }
    assert set(datasets.BBC_NEWS_LABELS) == {label for _, label in bbc}
    assert any("\u00a3" in text for text, label in bbc if label == "sports")  # the Latin-1 file decoded

    # deterministic, and balanced when limited
    assert datasets.rotten_tomatoes(limit=20, seed=1) == datasets.rotten_tomatoes(limit=20, seed=1)
    assert datasets.rotten_tomatoes(limit=20, seed=1) != datasets.rotten_tomatoes(limit=20, seed=2)
    assert Counter(label for _, label in datasets.rotten_tomatoes(limit=20)) == {"fresh": 10, "rotten": 10}
    assert Counter(label for _, label in datasets.bbc_news(limit=50)) == dict.fromkeys(datasets.BBC_NEWS_LABELS, 10)
    assert len(datasets.bbc_news(limit=7)) == 7
    assert datasets.bbc_news(seed=5) != datasets.bbc_news(seed=6)
    assert sorted(datasets.bbc_news(seed=5)) == sorted(datasets.bbc_news(seed=6))


def test_label_config_escapes_and_multiple_choice() -> None:
    config = text_label_config(['a "quoted" <label>', "b"], "multiple", "body", from_name="cls", to_name="doc")
    assert 'choice="multiple"' in config and 'value="$body"' in config
    assert 'name="cls" toName="doc"' in config
    choices = ElementTree.fromstring(config).find("Choices")
    assert [c.get("value") for c in choices] == ['a "quoted" <label>', "b"]
    with pytest.raises(ValueError):
        text_label_config(["a"], "several")
