"""``lsbert train`` end to end on real data: MiniLM fine-tuned on Rotten Tomatoes snippets from a Label Studio
export into a local checkpoint store; the promotion gate; and runs that never touch the pointer (--no-promote,
killed mid-training, terminated)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lsbert.store import METADATA_FILE, open_store
from tests.support.datasets import rotten_tomatoes
from tests.trainer.lsexport import choices_config, labelled_export, write_export

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
PROJECT = 1
LABELS = ("fresh", "rotten")
N_EXPORT, N_HELD_OUT = 250, 400
REPO = Path(__file__).resolve().parents[2]
# 250 snippets are few for MiniLM: a higher learning rate and 3 short epochs (~40 steps) get clearly above chance.
HYPER = ["--epochs", "3", "--lr", "2e-4", "--batch-size", "16", "--max-length", "128", "--seed", "42"]
STEP_LINE = re.compile(r"epoch \d+/\d+ step \d+/\d+ loss [\d.]+ lr \S+ samples/s [\d.]+ eta \d+m\d\ds")


@pytest.fixture(scope="module")
def data():
    rows = rotten_tomatoes(limit=N_EXPORT + N_HELD_OUT, seed=5)
    return rows[:N_EXPORT], rows[N_EXPORT:]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("train")
    export = labelled_export(data[0], from_name="verdict", project=PROJECT)
    # Realistic noise: a skipped task and one whose text field is missing.
    export[0]["annotations"][0]["was_cancelled"] = True
    export[1]["data"] = {"title": "no text field"}
    (root / "config.xml").write_text(choices_config(LABELS, name="verdict"))
    return {
        "root": root,
        "export": write_export(root / "export.json", export),
        "models": root / "models",
        "args": [
            "--project",
            str(PROJECT),
            "--export-file",
            str(root / "export.json"),
            "--label-config",
            f"@{root / 'config.xml'}",
            "--model-dir",
            str(root / "models"),
            "--baseline-model",
            MINILM,
        ],
    }


def run_in_process(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    import torch

    threads = torch.get_num_threads()
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        from lsbert.trainer.main import main

        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(args)
    torch.set_num_threads(threads)  # main() sets it process-wide
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def first_run(workspace):
    # PROMOTION_MARGIN=1 promotes whatever the scores: the runs below need a promoted version to protect.
    # One thread: predictable on a busy 2-core machine, where OpenMP threads of this process spin.
    rc, out, err = run_in_process(workspace["args"] + HYPER + ["--threads", "1"], {"PROMOTION_MARGIN": "1.0"})
    assert rc == 0, f"lsbert train failed:\n{out}\n{err}"
    store = open_store(str(workspace["models"]))
    (info,) = store.versions(PROJECT)
    return {
        "out": out,
        "err": err,
        "store": store,
        "version": info.version,
        "meta": store.metadata(PROJECT, info.version),
    }


def test_a_version_is_saved_with_its_metadata(first_run):
    meta, version = first_run["meta"], first_run["version"]
    assert meta["format"] == 1 and meta["project"] == PROJECT and meta["version"] == version
    assert meta["labels"] == list(LABELS) and meta["multi_label"] is False
    assert (meta["from_name"], meta["to_name"], meta["data_key"]) == ("verdict", "text", "text")
    assert meta["base_model"] == MINILM and meta["parent_version"] is None
    hp = meta["hyperparameters"]
    assert (hp["learning_rate"], hp["num_train_epochs"], hp["batch_size"], hp["max_length"], hp["seed"]) == (
        2e-4,
        3,
        16,
        128,
        42,
    )
    assert hp["weight_decay"] == 0.01 and hp["precision"] in ("bf16", "fp32") and hp["steps"] > 0
    d = meta["data"]
    assert (d["tasks"], d["examples"]) == (N_EXPORT, N_EXPORT - 2)
    assert d["skipped"] == {"cancelled": 1, "no_text": 1}
    assert d["train"] + d["validation"] == d["examples"] and abs(d["validation"] - 0.2 * d["examples"]) <= 1
    assert sum(d["label_counts"].values()) == d["examples"]
    assert set(meta["timings"]) == {"download_s", "train_s", "eval_s", "total_s"}
    assert meta["train_samples_per_second"] > 0 and meta["created_at"]
    assert meta["metrics"]["examples"] == d["validation"] and set(meta["metrics"]["per_label"]) == set(LABELS)
    assert meta["baseline_metrics"]["examples"] == d["validation"]
    files = {p.name for p in first_run["store"].local_path(PROJECT, version).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", METADATA_FILE} <= files


def test_the_promotion_decision_is_recorded_and_applied(first_run):
    promotion, store = first_run["meta"]["promotion"], first_run["store"]
    assert promotion["score"] == first_run["meta"]["metrics"]["macro_f1"]
    assert promotion["serving_score"] == first_run["meta"]["baseline_metrics"]["macro_f1"]
    assert promotion["serving"] == {"kind": "zeroshot", "version": None}  # nothing fine-tuned served before
    assert promotion["margin"] == 1.0
    assert promotion["promoted"] is (promotion["score"] >= promotion["serving_score"] - 1.0) is True
    assert store.promoted(PROJECT) == first_run["version"]
    assert "promotion: PROMOTED" in first_run["out"]


def test_the_model_learned_above_chance_on_held_out_data(first_run, data):
    import torch

    from lsbert.model.engine import SequenceClassifier
    from lsbert.model.runtime import Runtime

    assert first_run["meta"]["metrics"]["accuracy"] > 0.5
    classifier = SequenceClassifier(
        first_run["store"].local_path(PROJECT, first_run["version"]), Runtime(torch.device("cpu"), None)
    )
    assert classifier.labels == LABELS and classifier.multi_label is False
    held_out = data[1]
    proba = classifier.predict_proba([text for text, _ in held_out])
    accuracy = sum(LABELS[int(i)] == label for i, (_, label) in zip(proba.argmax(axis=1), held_out)) / len(held_out)
    print(f"held-out accuracy {accuracy:.3f}, validation {first_run['meta']['metrics']['accuracy']:.3f}")
    assert accuracy >= 0.6, f"held-out accuracy {accuracy:.3f} (chance 0.5)"


def test_progress_lines_for_kubectl_logs(first_run):
    out = first_run["out"]
    assert f"data: {N_EXPORT} tasks -> {N_EXPORT - 2} examples" in out
    assert "data: label counts: fresh " in out and "data: skipped tasks: cancelled 1, no_text 1" in out
    steps = [line for line in out.splitlines() if STEP_LINE.search(line)]
    assert len(steps) >= 3 * 3, out  # several lines per epoch
    assert any("epoch 3/3" in line for line in steps)
    assert re.search(r"eval: new model accuracy [\d.]+ macro-F1 [\d.]+", out)
    assert re.search(r"eval: serving model \(zeroshot\) accuracy", out)
    # No task text in the log.
    assert not any(text[:40] in out for text, _ in rotten_tomatoes(limit=N_EXPORT + N_HELD_OUT, seed=5)[:N_EXPORT])


def test_no_promote_continues_from_the_promoted_version_and_leaves_the_pointer(first_run, workspace):
    store, v1 = first_run["store"], first_run["version"]
    rc, out, err = run_in_process(
        workspace["args"] + HYPER + ["--epochs", "1", "--threads", "1", "--no-promote"], {"PROMOTION_MARGIN": "1.0"}
    )
    assert rc == 0, f"{out}\n{err}"
    v2 = store.versions(PROJECT)[-1].version
    assert v2 != v1 and store.promoted(PROJECT) == v1
    meta = store.metadata(PROJECT, v2)
    assert meta["parent_version"] == v1
    assert meta["promotion"]["promoted"] is False and meta["promotion"]["eligible"] is True
    assert "--no-promote" in meta["promotion"]["reason"]
    assert meta["promotion"]["serving"] == {"kind": "finetuned", "version": v1}
    assert "not promoted" in out


def start_training(workspace, extra_env=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABEL_STUDIO_")}
    env.update({"HF_HUB_OFFLINE": "1", "PROMOTION_MARGIN": "1.0", "PYTHONUNBUFFERED": "1", **(extra_env or {})})
    # Many epochs: the run is certainly still training when it is stopped.
    cmd = [sys.executable, "-m", "lsbert.trainer", *workspace["args"], *HYPER, "--epochs", "100"]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_training(proc, timeout=180.0) -> str:
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if STEP_LINE.search(line):
            return "".join(seen)
    proc.kill()
    pytest.fail("training never started:\n" + "".join(seen))


def store_state(models: Path):
    store = open_store(str(models))
    return store.promoted(PROJECT), [v.version for v in store.versions(PROJECT)]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "terminated"])
def test_a_run_stopped_mid_training_leaves_the_previous_version_serving(first_run, workspace, sig):
    before = store_state(workspace["models"])
    assert before[0] is not None
    proc = start_training(workspace)
    try:
        wait_for_training(proc)
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert store_state(workspace["models"]) == before  # same pointer, no new complete version
    if sig == signal.SIGTERM:
        assert proc.returncode == 143 and "terminated" in rest
    else:
        assert proc.returncode == -signal.SIGKILL
    store = open_store(str(workspace["models"]))
    assert store.metadata(PROJECT, before[0])["version"] == before[0]
