import pytest

from lsbert.labelconfig import LabelConfigError, parse_label_config

SENTIMENT = (
    '<View><Text name="text" value="$text"/><Choices name="sentiment" toName="text" choice="single">'
    '<Choice value="Positive"/><Choice value="Negative"/></Choices></View>'
)


def test_single_choice_config_from_label_studio():
    spec = parse_label_config(SENTIMENT)
    assert (spec.from_name, spec.to_name, spec.data_key) == ("sentiment", "text", "text")
    assert spec.labels == ("Positive", "Negative")
    assert spec.multi_label is False and spec.text_is_url is False


def test_multiple_choice_alias_and_other_data_key():
    spec = parse_label_config(
        '<View><Header value="Topics"/><Text name="body" value="$article" valueType="url"/>'
        '<Choices name="topic" toName="body" choice="multiple" showInLine="true">'
        '<Choice value="Sport"/><Choice value="Politics" alias="pol"/><Choice value="Sport"/></Choices></View>'
    )
    assert spec.data_key == "article" and spec.text_is_url
    assert spec.labels == ("Sport", "pol")
    assert spec.multi_label


def test_serves_the_choices_bound_to_text_not_other_controls():
    spec = parse_label_config(
        '<View><Image name="img" value="$image"/>'
        '<Choices name="quality" toName="img"><Choice value="Blurry"/></Choices>'
        '<Text name="t" value="$text"/>'
        '<Choices name="c" toName="t"><Choice value="A"/><Choice value="B"/></Choices></View>'
    )
    assert spec.from_name == "c" and spec.labels == ("A", "B")


def test_fingerprint_changes_with_labels():
    a = parse_label_config(SENTIMENT)
    b = parse_label_config(
        SENTIMENT.replace('<Choice value="Negative"/>', '<Choice value="Negative"/><Choice value="Neutral"/>')
    )
    assert a.fingerprint != b.fingerprint


@pytest.mark.parametrize(
    "xml, message",
    [
        ("", "empty"),
        ("<View><Text name='t' value='$text'/>", "not valid XML"),
        (
            "<View><Text name='t' value='$text'/><Labels name='l' toName='t'><Label value='X'/></Labels></View>",
            "no <Choices>",
        ),
        (
            "<View><Image name='i' value='$img'/><Choices name='c' toName='i'><Choice value='X'/></Choices></View>",
            "bound",
        ),
        ("<View><Text name='t' value='$text'/><Choices name='c' toName='t'></Choices></View>", "no <Choice>"),
        (
            "<View><Text name='t' value='text'/><Choices name='c' toName='t'><Choice value='X'/></Choices></View>",
            "$field",
        ),
        ('<!DOCTYPE x [<!ENTITY a "aaaa">]><View>&a;</View>', "not valid XML"),
    ],
)
def test_configs_lsbert_cannot_serve_are_explained(xml, message):
    with pytest.raises(LabelConfigError, match=message.replace("$", r"\$")):
        parse_label_config(xml)
