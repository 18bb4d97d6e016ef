"""The CUDA paths' host-side logic (token-budget batches, padding without masks, chunked tokenisation in a
thread, results back in order, the loop's deferred loss), run on a CPU device: the engine and the training
loop are routed through them and must give what their plain CPU paths give."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lsbert import cuda
from lsbert.model.engine import ZeroShotClassifier
from lsbert.model.runtime import Runtime, select_runtime
from tests.conftest import MINILM

CPU = Runtime(torch.device("cpu"), None)
TEXTS = [
    "I love this product, it works great.",
    "Terrible, broke after a day.",
    "awful café ☕ – naïve",
    "A delightful, moving film with a wonderful cast and a story that stays with you for days.",
    "What a waste of two hours.",
    "It was fine.",
    "Shares fell 3% after the earnings call.",
    "The striker scored twice in the final.",
    "ok",
    "Parliament passed the budget after a long debate.",
] * 3


def test_token_budget_batches_cover_every_text_once_within_the_budget():
    rng = random.Random(0)
    lengths = [rng.randint(3, 300) for _ in range(2000)]
    batches = cuda.batches_by_tokens(lengths, 4096)
    assert sorted(i for b in batches for i in b) == list(range(2000))
    for batch in batches:
        assert lengths[batch[0]] == max(lengths[i] for i in batch)  # the first text sets the width
        assert len(batch) == 1 or lengths[batch[0]] * len(batch) <= 4096
    # short texts share a batch by the thousand; a batch size would have cut them at 64
    assert len(cuda.batches_by_tokens([10] * 3000, 65536)) == 1
    assert cuda.batches_by_tokens([9000, 5], 4096) == [[0], [1]]  # a text over budget still runs, alone


def test_pad_rows_pads_either_side_and_drops_the_mask_when_nothing_is_padded():
    ids, mask = cuda.pad_rows([[1, 2, 3], [4]], pad_id=0, width=3, pin=False)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = cuda.pad_rows([[1, 2, 3], [4]], pad_id=9, width=3, left=True, pin=False)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = cuda.pad_rows([[1, 2], [3, 4]], pad_id=0, width=2, pin=False)
    assert ids.tolist() == [[1, 2], [3, 4]] and mask is None
    assert ids.dtype == torch.long


def test_compile_is_only_asked_of_cuda_runtimes():
    assert select_runtime("fp32", device="cpu", torch_compile=True).compile is False
    assert select_runtime("fp32", device="cpu").device.type == "cpu"


@pytest.fixture(scope="module")
def zero_shot():
    return ZeroShotClassifier(MINILM, CPU, batch_size=4)


def test_pipelined_engine_path_gives_the_cpu_path_results(zero_shot, monkeypatch):
    encoder = zero_shot.encoder
    order = list(range(len(TEXTS)))
    random.Random(1).shuffle(order)
    texts = [TEXTS[i] for i in order]
    plain = zero_shot.embed(texts)
    same_length = ["The same words here."] * 5  # one batch without padding: no attention mask at all
    plain_same = zero_shot.embed(same_length)

    # Several tokenisation chunks (a thread tokenises the next while the model runs) and several batches.
    monkeypatch.setattr(cuda, "TOKENIZE_CHUNK", 7)
    monkeypatch.setattr(encoder, "token_budget", 64)
    monkeypatch.setattr(encoder, "run", lambda batch_texts, forward: encoder._run_cuda(list(batch_texts), forward))
    np.testing.assert_allclose(zero_shot.embed(texts), plain, atol=1e-5)
    np.testing.assert_allclose(zero_shot.embed(same_length), plain_same, atol=1e-5)
    np.testing.assert_allclose(zero_shot.embed(texts[:1]), plain[:1], atol=1e-5)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel

    from lsbert.modelsource import resolve

    minilm = Path(resolve(MINILM))
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


def test_fine_tune_cuda_branch_trains_as_the_cpu_branch(tiny_model, monkeypatch):
    from lsbert.trainer.dataset import Example
    from lsbert.trainer.loop import Hyperparameters, fine_tune, load_for_training, predict_proba

    labels = ("a", "b")
    # Equal-length texts give batches without padding (no mask on the CUDA branch), the rest padded ones.
    texts = [f"item {i} is {'good' if i % 2 else 'bad'}" for i in range(24)] + [t.lower() for t in TEXTS[:10]]
    examples = [Example(t, (labels[i % 2],), i) for i, t in enumerate(texts)]
    hp = Hyperparameters(learning_rate=1e-3, num_train_epochs=2, weight_decay=0.01, batch_size=4, max_length=32, seed=3)

    def train() -> tuple[float, np.ndarray]:
        model, tokenizer = load_for_training(tiny_model, labels, False, seed=3)
        result = fine_tune(model, tokenizer, examples, labels, False, hp, CPU, progress=lambda _line: None)
        return result.final_loss, predict_proba(model, tokenizer, texts, False, CPU, 32)

    loss_plain, proba_plain = train()
    monkeypatch.setattr(cuda, "is_cuda", lambda device: True)
    loss_cuda, proba_cuda = train()
    assert loss_cuda == pytest.approx(loss_plain, rel=1e-4)
    np.testing.assert_allclose(proba_cuda, proba_plain, atol=1e-4)
