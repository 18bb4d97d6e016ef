"""``lsbert train`` without training: arguments and settings, where the data and config come from, what a
run starts from, and how failures end (exit 1, one line, pointer untouched)."""

import json
from types import SimpleNamespace

import pytest

from lsbert.labelconfig import parse_label_config
from lsbert.trainer.main import build_parser, main, settings_for, start_point
from lsbert.trainer.source import DataSourceError, LabelStudioSource, read_export_file, read_label_config
from tests.trainer.lsexport import SENTIMENT_CONFIG, choices_config, labelled_export, write_export

SPEC = parse_label_config(SENTIMENT_CONFIG)
BASE = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in (
        "LABEL_STUDIO_URL",
        "LABEL_STUDIO_HOST",
        "LABEL_STUDIO_API_KEY",
        "LABEL_STUDIO_ACCESS_TOKEN",
        "LEARNING_RATE",
        "NUM_TRAIN_EPOCHS",
        "TRAIN_BATCH_SIZE",
        "MODEL_DIR",
        "BASELINE_MODEL_NAME",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "models"))


# --- arguments ------------------------------------------------------------------------------------------


def test_overrides_win_over_the_environment(monkeypatch):
    monkeypatch.setenv("LEARNING_RATE", "3e-5")
    monkeypatch.setenv("NUM_TRAIN_EPOCHS", "4")
    args = build_parser().parse_args(
        [
            "--project",
            "7",
            "--lr",
            "1e-4",
            "--batch-size",
            "8",
            "--epochs",
            "0.5",
            "--model-dir",
            "/x",
            "--baseline-model",
            BASE,
            "--max-length",
            "64",
            "--seed",
            "3",
            "--weight-decay",
            "0.1",
            "--no-promote",
        ]
    )
    settings = settings_for(args)
    assert (settings.learning_rate, settings.num_train_epochs, settings.train_batch_size) == (1e-4, 0.5, 8)
    assert (settings.model_dir, settings.baseline_model_name, settings.train_max_length) == ("/x", BASE, 64)
    assert (settings.seed, settings.weight_decay) == (3, 0.1)
    assert args.project == 7 and args.no_promote and args.version is None


def test_defaults_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("LEARNING_RATE", "3e-5")
    settings = settings_for(build_parser().parse_args(["--project", "1"]))
    assert settings.learning_rate == 3e-5 and settings.num_train_epochs == 3


def test_usage_errors(capsys):
    assert main([]) == 2  # --project is required
    assert "--project" in capsys.readouterr().err
    assert main(["--project", "1", "--lr", "5"]) == 2  # validated like the environment variable
    assert "LEARNING_RATE" in capsys.readouterr().err


# --- data sources -----------------------------------------------------------------------------------------


def test_label_config_inline_or_from_a_file(tmp_path):
    path = tmp_path / "config.xml"
    path.write_text(SENTIMENT_CONFIG)
    assert read_label_config(SENTIMENT_CONFIG) == SENTIMENT_CONFIG
    assert read_label_config(f"@{path}") == SENTIMENT_CONFIG
    with pytest.raises(DataSourceError, match="cannot read"):
        read_label_config(f"@{tmp_path / 'missing.xml'}")


def test_export_file_shapes(tmp_path):
    tasks = labelled_export([("good", "Positive")])
    plain = write_export(tmp_path / "export.json", tasks)
    assert read_export_file(plain) == (tasks, None)
    legacy = tmp_path / "train-body.json"
    legacy.write_text(json.dumps({"annotations": tasks, "project": "1.17", "label_config": SENTIMENT_CONFIG}))
    assert read_export_file(legacy) == (tasks, SENTIMENT_CONFIG)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataSourceError, match="not valid JSON"):
        read_export_file(bad)


class ApiError(Exception):
    def __init__(self, status_code):
        super().__init__(f"status_code: {status_code}")
        self.status_code = status_code


class FakeLabelStudio:
    """The slice of label_studio_sdk.LabelStudio the trainer uses."""

    def __init__(self, tasks, config=SENTIMENT_CONFIG, export_status=None):
        self.calls = []
        outer = self

        class Exports:
            def download_sync(self, id, export_type, download_all_tasks):
                outer.calls.append(("export", id, export_type, download_all_tasks))
                if export_status:
                    raise ApiError(export_status)
                data = json.dumps(tasks).encode()
                yield from (data[:10], data[10:])

        class Projects:
            exports = Exports()

            def get(self, id):
                outer.calls.append(("project", id))
                return SimpleNamespace(id=id, label_config=config)

        class Tasks:
            def list(self, project, fields, only_annotated):
                outer.calls.append(("tasks", project, fields, only_annotated))
                return [SimpleNamespace(model_dump=lambda mode, t=t: t) for t in tasks]

        self.projects, self.tasks = Projects(), Tasks()


def test_label_studio_source_reads_the_json_export():
    tasks = labelled_export([("good", "Positive"), ("bad", "Negative")])
    fake = FakeLabelStudio(tasks)
    source = LabelStudioSource("http://ls:8080", "secret-key", client=fake)
    assert source.labelled_tasks(3) == tasks
    assert source.label_config(3) == SENTIMENT_CONFIG
    assert fake.calls == [("export", 3, "JSON", False), ("project", 3)]


def test_label_studio_source_falls_back_to_the_tasks_api_where_export_is_missing():
    tasks = labelled_export([("good", "Positive")])
    fake = FakeLabelStudio(tasks, export_status=404)
    assert LabelStudioSource("http://ls", "k", client=fake).labelled_tasks(3) == tasks
    assert fake.calls[-1] == ("tasks", 3, "all", True)


def test_label_studio_errors_say_what_to_fix_without_the_key():
    source = LabelStudioSource("http://ls", "secret-key", client=FakeLabelStudio([], export_status=401))
    with pytest.raises(DataSourceError, match="LABEL_STUDIO_API_KEY") as err:
        source.labelled_tasks(3)
    assert "secret-key" not in str(err.value)
    with pytest.raises(DataSourceError, match="no labelling config"):
        LabelStudioSource("http://ls", "k", client=FakeLabelStudio([], config="")).label_config(3)


# --- where a run starts from --------------------------------------------------------------------------------


def parent(labels, multi=False, base=BASE):
    return {"labels": labels, "multi_label": multi, "base_model": base}


def test_first_run_starts_from_the_base_model():
    start = start_point(SPEC, BASE, None, None)
    assert start.parent_version is None and start.labels == ("Positive", "Negative")


def test_continue_from_the_promoted_checkpoint_keeping_its_label_order():
    start = start_point(SPEC, BASE, "m-0003", parent(["Negative", "Positive"]))
    assert start.parent_version == "m-0003"
    assert start.labels == ("Negative", "Positive")  # the parent's head is reused as is


@pytest.mark.parametrize(
    "meta, why",
    [
        (parent(["Positive", "Negative", "Neutral"]), "labels changed"),
        (parent(["Positive"]), "labels changed"),
        (parent(["Positive", "Negative"], multi=True), "multi-label"),
        (parent(["Positive", "Negative"], base="bert-base-uncased"), "another base model"),
        (None, "labels changed"),
    ],
)
def test_restart_from_the_base_model_when_the_task_changed(meta, why):
    start = start_point(SPEC, BASE, "m-0003", meta)
    assert start.parent_version is None and start.labels == SPEC.labels and why in start.reason


# --- failures -------------------------------------------------------------------------------------------------


def test_no_label_studio_and_no_export_file_is_a_one_line_error(capsys):
    assert main(["--project", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "LABEL_STUDIO_URL" in err and "Traceback" not in err


def test_export_without_config_and_without_label_studio(tmp_path, capsys):
    export = write_export(tmp_path / "e.json", labelled_export([("good", "Positive")]))
    assert main(["--project", "1", "--export-file", str(export)]) == 1
    assert "--label-config" in capsys.readouterr().err


def test_config_without_choices(tmp_path, capsys):
    export = write_export(tmp_path / "e.json", labelled_export([("good", "Positive")]))
    config = '<View><Text name="text" value="$text"/></View>'
    assert main(["--project", "1", "--export-file", str(export), "--label-config", config]) == 1
    assert "no <Choices>" in capsys.readouterr().err


def test_no_usable_annotations_fails_before_loading_a_model(tmp_path, capsys):
    export = write_export(tmp_path / "e.json", labelled_export([("good", "Neutral")]))
    assert main(["--project", "1", "--export-file", str(export), "--label-config", SENTIMENT_CONFIG]) == 1
    out, err = capsys.readouterr()
    assert "labels_not_in_config 1" in err and "skipped tasks: labels_not_in_config 1" in out


def test_an_existing_version_is_refused(tmp_path, capsys):
    from lsbert.store import open_store

    store = open_store(str(tmp_path / "models"))
    version = store.next_version(1, "finetuned_model")
    source = tmp_path / "ckpt"
    source.mkdir()
    (source / "config.json").write_text("{}")
    store.save(1, version, source, {"labels": ["Positive", "Negative"]})
    export = write_export(tmp_path / "e.json", labelled_export([("good", "Positive")]))
    assert (
        main(
            [
                "--project",
                "1",
                "--version",
                version,
                "--export-file",
                str(export),
                "--label-config",
                choices_config(["Positive", "Negative"]),
            ]
        )
        == 1
    )
    assert "already exists" in capsys.readouterr().err


# --- what is done with the gate's decision ----------------------------------------------------------------


def test_promotion_record_applies_the_gate():
    from lsbert.trainer.evaluation import promotion_record
    from lsbert.trainer.promotion import decide

    serving = {"kind": "finetuned", "version": "m-0001"}
    passed, failed = decide(0.8, 0.7, 0.0, 10), decide(0.6, 0.7, 0.0, 10)
    record = promotion_record(passed, False, "m-0001", "m-0001", serving)
    assert record["promoted"] is record["eligible"] is True and record["serving"] == serving
    assert (record["score"], record["serving_score"], record["margin"]) == (0.8, 0.7, 0.0)
    record = promotion_record(failed, False, "m-0001", "m-0001", serving)
    assert record["promoted"] is record["eligible"] is False and "below" in record["reason"]
    record = promotion_record(passed, True, "m-0001", "m-0001", serving)
    assert record["promoted"] is False and record["eligible"] is True and "--no-promote" in record["reason"]
    # Another run promoted m-0002 while this one trained: the comparison was against a stale model.
    record = promotion_record(passed, False, "m-0001", "m-0002", serving)
    assert record["promoted"] is False and "changed during training (m-0001 -> m-0002)" in record["reason"]
    assert promotion_record(passed, False, None, "m-0002", serving)["promoted"] is False
