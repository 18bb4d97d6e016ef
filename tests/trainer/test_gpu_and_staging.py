"""A trainer given a GPU it cannot use stops at once with a clear message (REQUIRE_CUDA), and a finished
model is staged on the cache volume, not in /tmp."""

from pathlib import Path

import pytest

from lsbert.gpu import CudaUnavailable, assigned_devices, check_cuda, cuda_required
from lsbert.trainer.main import _publish, main, staging_root
from tests.trainer.lsexport import SENTIMENT_CONFIG, labelled_export, write_export


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in (
        "LABEL_STUDIO_URL",
        "LABEL_STUDIO_HOST",
        "LABEL_STUDIO_API_KEY",
        "REQUIRE_CUDA",
        "NVIDIA_VISIBLE_DEVICES",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.parametrize(
    "env, setting, required",
    [
        ({}, None, False),
        ({"NVIDIA_VISIBLE_DEVICES": "all"}, None, False),  # an image default, not an allocation
        ({"NVIDIA_VISIBLE_DEVICES": "void"}, None, False),
        ({"NVIDIA_VISIBLE_DEVICES": "GPU-3b1c2d9e-0000-1111-2222-333344445555"}, None, True),
        ({"NVIDIA_VISIBLE_DEVICES": "0,1"}, None, True),
        ({"NVIDIA_VISIBLE_DEVICES": "0"}, False, False),  # turned off
        ({}, True, True),
    ],
)
def test_when_cuda_is_required(env, setting, required):
    assert cuda_required(setting, env) is required


def test_the_message_names_the_gpu_the_cause_and_the_switch():
    env = {"NVIDIA_VISIBLE_DEVICES": "GPU-abc"}
    with pytest.raises(CudaUnavailable) as info:
        check_cuda(None, "lsbert train", env, state=lambda: (False, "this torch (2.9.0+cpu) is a CPU-only build"))
    message = str(info.value)
    assert message.startswith("lsbert train: GPU(s) GPU-abc were assigned but CUDA is not usable: ")
    assert "CPU-only build" in message and "REQUIRE_CUDA=false" in message
    check_cuda(None, "lsbert train", env, state=lambda: (True, ""))  # usable: no error
    check_cuda(False, "lsbert train", env, state=lambda: (False, "x"))  # off: no error
    assert assigned_devices(env) == "GPU-abc"


def test_trainer_without_usable_cuda_stops_before_touching_data_or_store(tmp_path, monkeypatch, capsys):
    """This machine has no GPU: with REQUIRE_CUDA=true the real torch says CUDA is unusable."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a usable GPU")
    monkeypatch.setenv("REQUIRE_CUDA", "true")
    export = write_export(tmp_path / "e.json", labelled_export([("good", "Positive"), ("bad", "Negative")] * 4))
    assert main(["--project", "1", "--export-file", str(export), "--label-config", SENTIMENT_CONFIG]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lsbert train: error: training: a GPU was required")
    assert "CUDA is not usable" in err[0]
    assert not (tmp_path / "models" / "1").exists(), "no version reserved"


def test_an_assigned_gpu_with_the_check_off_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", "GPU-3b1c2d9e")
    monkeypatch.setenv("REQUIRE_CUDA", "false")
    export = write_export(tmp_path / "e.json", labelled_export([("good", "Neutral")]))
    assert main(["--project", "1", "--export-file", str(export), "--label-config", SENTIMENT_CONFIG]) == 1
    err = capsys.readouterr().err
    assert "CUDA" not in err and "labels_not_in_config 1" in err  # failed later, for the data


class _Saves:
    """Writes one file where save_pretrained is asked to, and remembers where."""

    def __init__(self, name):
        self.name, self.dirs = name, []

    def save_pretrained(self, directory):
        self.dirs.append(Path(directory))
        (Path(directory) / self.name).write_text("{}")


def test_the_model_is_staged_on_the_cache_volume(tmp_path):
    from lsbert.store import open_store

    staging = staging_root(str(tmp_path / "cache"))
    assert staging == tmp_path / "cache" / "staging" and staging.is_dir()
    store = open_store(str(tmp_path / "models"))
    version = store.next_version(1, "finetuned_model")
    model, tokenizer = _Saves("config.json"), _Saves("tokenizer.json")
    metadata = {"labels": ["a", "b"], "promotion": {"promoted": False, "reason": "test"}}
    _publish(store, 1, version, model, tokenizer, metadata, 5, lambda line: None, staging)
    assert model.dirs[0].parent == staging and tokenizer.dirs == model.dirs
    assert list(staging.iterdir()) == [], "the staging directory is removed after the save"
    assert (tmp_path / "models" / "1" / version / "config.json").is_file()
