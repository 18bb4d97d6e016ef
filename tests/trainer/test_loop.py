"""The training loop's parts, and a whole multi-label ``lsbert train`` run on a tiny randomly initialised BERT
(seconds, no download: MiniLM's tokenizer with a 2-layer, 32-wide encoder)."""

from __future__ import annotations

import contextlib
import io
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lsbert.model.engine import SequenceClassifier
from lsbert.model.runtime import Runtime
from lsbert.model.text import truncation_length
from lsbert.trainer.dataset import Example
from lsbert.trainer.loop import (
    Hyperparameters,
    fine_tune,
    label_targets,
    length_grouped_batches,
    linear_schedule,
    load_for_training,
    pad_batch,
    predict_proba,
)
from tests.trainer.lsexport import annotation, choices_config, result, task, write_export

CPU = Runtime(torch.device("cpu"), None)
TOPICS = ("news", "sports", "tech")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel

    from lsbert.modelsource import resolve

    minilm = Path(resolve("sentence-transformers/all-MiniLM-L6-v2"))
    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (minilm / name).exists():
            shutil.copy(minilm / name, path / name)
    return path


def test_length_grouped_batches_cover_every_example_once_with_similar_lengths():
    rng = random.Random(0)
    lengths = [rng.randint(5, 120) for _ in range(1000)]
    batches = length_grouped_batches(lengths, 16, random.Random(1))
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert all(len(b) <= 16 for b in batches) and sum(len(b) < 16 for b in batches) <= 2
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    assert padded < 1.05 * sum(lengths)  # random batches of 16 would pad to ~1.6x
    assert length_grouped_batches(lengths, 16, random.Random(1)) == batches
    assert length_grouped_batches(lengths, 16, random.Random(2)) != batches


def test_pad_batch_pads_to_the_longest_only():
    ids, mask = pad_batch([[1, 2, 3], [4], [5, 6]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0], [5, 6, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]


def test_label_targets():
    examples = [Example("a", ("tech", "news")), Example("b", ("sports",))]
    assert label_targets(examples, TOPICS, multi_label=True).tolist() == [[1, 0, 1], [0, 1, 0]]
    assert label_targets(examples, TOPICS, multi_label=False).tolist() == [2, 1]


def test_linear_schedule_warms_up_then_decays_to_zero():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = linear_schedule(opt, warmup_steps=2, total_steps=6)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25])
    assert opt.param_groups[0]["lr"] == 0.0


def test_fine_tune_multi_label_learns_and_reports(tiny_model):
    rng = random.Random(0)
    words = {"news": "election minister", "sports": "goal match", "tech": "software chip"}
    examples = []
    for i in range(96):
        labels = tuple(sorted(rng.sample(TOPICS, rng.choice([1, 2]))))
        examples.append(Example(" ".join(words[label] for label in labels) + f" item {i}", labels, i))
    model, tokenizer = load_for_training(tiny_model, TOPICS, multi_label=True, seed=0)
    assert model.config.problem_type == "multi_label_classification" and model.config.id2label[2] == "tech"
    lines = []
    # A random tiny model must learn its word embeddings too (lsbert freezes pretrained ones by default).
    hp = Hyperparameters(
        learning_rate=3e-3,
        num_train_epochs=14.5,
        weight_decay=0.01,
        batch_size=8,
        max_length=512,
        seed=0,
        train_embeddings=True,
    )
    result = fine_tune(model, tokenizer, examples, TOPICS, True, hp, CPU, progress=lines.append)
    assert result.steps == 174 and result.samples == 1392  # 14.5 epochs of 12 steps
    assert result.max_length == 128  # capped by the model's position embeddings
    assert any("epoch 15/15 step 174/174" in line for line in lines)
    proba = predict_proba(model, tokenizer, ["goal match", "software chip election minister"], True, CPU, 128)
    assert proba.shape == (2, 3) and ((proba >= 0) & (proba <= 1)).all()
    assert (proba[0] >= 0.5).tolist() == [False, True, False]
    assert proba[1][2] >= 0.5 and min(proba[1][0], proba[1][2]) > proba[1][1]


@pytest.mark.parametrize("train_embeddings", [False, True])
def test_input_embeddings_are_frozen_unless_asked(tiny_model, train_embeddings):
    model, tokenizer = load_for_training(tiny_model, ("a", "b"), multi_label=False)
    words = model.get_input_embeddings().weight.detach().clone()
    positions = model.bert.embeddings.position_embeddings.weight.detach().clone()
    hp = Hyperparameters(
        learning_rate=1e-2,
        num_train_epochs=1,
        weight_decay=0.0,
        batch_size=4,
        max_length=32,
        seed=0,
        train_embeddings=train_embeddings,
    )
    fine_tune(
        model,
        tokenizer,
        [Example(f"text {i}", ("ab"[i % 2],)) for i in range(8)],
        ("a", "b"),
        False,
        hp,
        CPU,
        progress=lambda _: None,
    )
    assert torch.equal(model.get_input_embeddings().weight, words) is not train_embeddings
    assert not torch.equal(model.bert.embeddings.position_embeddings.weight, positions)


def test_truncation_length_is_one_rule_for_training_and_serving(tiny_model):
    model, tokenizer = load_for_training(tiny_model, ("a", "b"), multi_label=False)
    assert truncation_length(tokenizer, model.config, 64) == 64
    assert truncation_length(tokenizer, model.config, 4096) == 128
    assert truncation_length(tokenizer, model.config) == 128  # 0 (serving's default): the model's maximum
    roberta = type("Config", (), {"max_position_embeddings": 514, "model_type": "camembert"})()
    assert truncation_length(None, roberta) == 512  # position ids start after the padding index


def test_multi_label_lsbert_train_run(tiny_model, tmp_path):
    """The whole command on a multi-label config, served afterwards by the predictor's classifier."""
    from lsbert.store import open_store
    from lsbert.trainer.main import main

    rng = random.Random(1)
    words = {"news": "election minister", "sports": "goal match", "tech": "software chip"}
    tasks = []
    for i in range(1, 61):
        labels = sorted(rng.sample(TOPICS, rng.choice([1, 2])))
        text = " ".join(words[label] for label in labels)
        tasks.append(task(i, {"text": text}, [annotation(i, i, [result(labels, from_name="topics")])]))
    export = write_export(tmp_path / "export.json", tasks)
    config = choices_config(TOPICS, name="topics", multiple=True)
    out = io.StringIO()
    threads = torch.get_num_threads()
    with contextlib.redirect_stdout(out):
        rc = main(
            [
                "--project",
                "4",
                "--export-file",
                str(export),
                "--label-config",
                config,
                "--model-dir",
                str(tmp_path / "models"),
                "--baseline-model",
                str(tiny_model),
                "--epochs",
                "20",
                "--lr",
                "3e-3",
                "--batch-size",
                "8",
                "--threads",
                "1",
                "--train-embeddings",
            ]
        )
    torch.set_num_threads(threads)
    assert rc == 0, out.getvalue()
    store = open_store(str(tmp_path / "models"))
    (info,) = store.versions(4)
    meta = info.metadata
    assert meta["multi_label"] is True and meta["labels"] == list(TOPICS)
    assert {"subset_accuracy", "micro_f1", "macro_f1"} <= set(meta["metrics"])
    assert meta["metrics"]["macro_f1"] > 0.7
    assert meta["promotion"]["serving"]["kind"] == "zeroshot"
    assert meta["promotion"]["promoted"] is (store.promoted(4) == info.version)
    classifier = SequenceClassifier(store.local_path(4, info.version), CPU)
    assert classifier.multi_label and classifier.labels == TOPICS
    np.testing.assert_array_equal(classifier.predict_proba(["goal match"])[0] >= 0.5, [False, True, False])
