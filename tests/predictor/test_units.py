"""Fast in-process tests of the predictor's parts: the inference queue, the model registry, basic auth and
log redaction. No server process; the registry uses the real MiniLM model and real checkpoints."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import threading
import time

import numpy as np
import pytest

from lsbert import logs
from lsbert.labelconfig import ClassificationSpec
from lsbert.model import ModelKind
from lsbert.predictor.auth import BasicAuth
from lsbert.predictor.inference import CHUNK, InferenceQueue

# ------------------------------------------------------------------------------------------ inference queue


def test_queue_merges_waiting_requests_for_one_model_and_keeps_each_answer_in_order():
    calls: list[list[str]] = []
    first_started = threading.Event()
    release = threading.Event()

    def run(texts):
        calls.append(list(texts))
        if len(calls) == 1:  # hold the worker so that the next requests queue up behind this one
            first_started.set()
            release.wait(10)
        return np.array([[float(t.split("-")[1])] for t in texts], dtype=np.float32)

    async def scenario():
        queue = InferenceQueue(max_batch=64)
        first = asyncio.ensure_future(queue.run("m", ["a-0"], run))
        await asyncio.to_thread(first_started.wait, 10)
        waiting = [asyncio.ensure_future(queue.run("m", [f"b-{i}", f"c-{i}"], run)) for i in range(1, 4)]
        await asyncio.sleep(0)  # let them enqueue
        release.set()
        results = await asyncio.gather(first, *waiting)
        queue.close()
        return results

    results = asyncio.run(scenario())
    assert calls == [["a-0"], ["b-1", "c-1", "b-2", "c-2", "b-3", "c-3"]]  # three requests, one forward pass
    assert [r[:, 0].tolist() for r in results] == [[0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]


def test_queue_never_merges_different_models_and_cuts_large_requests():
    keys: list[tuple[str, int]] = []

    def runner(key):
        def run(texts):
            keys.append((key, len(texts)))
            return np.zeros((len(texts), 2), dtype=np.float32)

        return run

    async def scenario():
        queue = InferenceQueue(max_batch=CHUNK)
        big, small = await asyncio.gather(
            queue.run("x", ["t"] * (CHUNK * 2 + 1), runner("x")), queue.run("y", ["t"], runner("y"))
        )
        queue.close()
        return big, small

    big, small = asyncio.run(scenario())
    assert big.shape == (CHUNK * 2 + 1, 2) and small.shape == (1, 2)
    assert all(n <= CHUNK for _, n in keys)
    assert ("y", 1) in keys and sum(n for k, n in keys if k == "x") == CHUNK * 2 + 1


def test_a_failing_forward_pass_fails_its_requests_and_the_queue_goes_on():
    def broken(texts):
        raise RuntimeError("out of memory")

    async def scenario():
        queue = InferenceQueue()
        with pytest.raises(RuntimeError, match="out of memory"):
            await queue.run("m", ["a"], broken)
        ok = await queue.run("m", ["b"], lambda texts: np.ones((len(texts), 1), dtype=np.float32))
        empty = await queue.run("m", [], broken)
        queue.close()
        return ok, empty

    ok, empty = asyncio.run(scenario())
    assert ok.tolist() == [[1.0]] and empty.shape == (0, 0)


# ------------------------------------------------------------------------------------------ basic auth


def header(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_basic_auth_accepts_exactly_the_configured_pair():
    auth = BasicAuth("ls", "s3cret:with-colon")
    assert auth.check(header("ls", "s3cret:with-colon"))
    for bad in (
        None,
        "",
        "Bearer abc",
        header("ls", "wrong"),
        header("LS", "s3cret:with-colon"),
        "Basic !!!not-base64!!!",
        header("ls", "s3cret:with-colo"),
        "Basic " + base64.b64encode(b"ls").decode(),
    ):
        assert not auth.check(bad), bad


def test_basic_auth_disabled_lets_everything_through():
    assert BasicAuth(None, None).check(None) and BasicAuth("", "x").check("Basic junk")


# ------------------------------------------------------------------------------------------ log redaction


@pytest.fixture
def log_stream():
    """``logs.configure`` with its handler writing into a buffer; the root logger restored afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    buffer = io.StringIO()

    def configure(secrets):
        redactor = logs.configure("INFO", secrets)
        root.handlers[0].setStream(buffer)
        return redactor

    yield configure, buffer
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)


def test_configured_secrets_and_credentials_never_reach_the_log(log_stream):
    configure, buffer = log_stream
    configure(["s3cret-pass-value", "ls-api-token-12345"])
    log = logging.getLogger("lsbert.test")
    log.info("connecting with password %s", "s3cret-pass-value")
    log.warning("headers: {'Authorization': 'Token ls-api-token-12345'}")
    log.info("Authorization: Basic %s", base64.b64encode(b"user:other-password").decode())
    log.info('{"api_key": "abcdef123456", "password": "hunter22"}')
    logging.getLogger("uvicorn.error").error("bearer eyJhbGciOiJIUzI1NiJ9.payload.sig")
    text = buffer.getvalue()
    assert text.count("\n") == 5, text  # every record was written
    for secret in (
        "s3cret-pass-value",
        "ls-api-token-12345",
        base64.b64encode(b"user:other-password").decode(),
        "abcdef123456",
        "hunter22",
        "eyJhbGciOiJIUzI1NiJ9",
    ):
        assert secret not in text, (secret, text)
    assert "***" in text and "connecting with password" in text


def test_redaction_leaves_ordinary_messages_alone(log_stream):
    configure, buffer = log_stream
    configure(["s3cret-pass-value"])
    logging.getLogger("lsbert.test").info("project %s: predicted %d tasks with %s", 3, 20, "ft-0004")
    assert "project 3: predicted 20 tasks with ft-0004" in buffer.getvalue()


# ------------------------------------------------------------------------------------------ model registry


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    from lsbert.model.runtime import select_runtime
    from lsbert.predictor.registry import ModelRegistry
    from lsbert.store.local import LocalStore
    from tests.conftest import MINILM
    from tests.support.checkpoints import save_checkpoint

    store = LocalStore(tmp_path_factory.mktemp("registry") / "models")
    save_checkpoint(store, 5, "ft-0001", ("Positive", "Negative"), seed=1)
    save_checkpoint(store, 5, "ft-0002", ("Positive", "Negative"), seed=2)
    store.promote(5, "ft-0001")
    registry = ModelRegistry(store, select_runtime("fp32", 1), MINILM, max_loaded=1, batch_size=8)
    registry.load_baseline()
    yield registry
    registry.close()


SPEC = ClassificationSpec("sentiment", "text", "text", ("Positive", "Negative"), False)


def test_registry_serves_zero_shot_until_a_checkpoint_is_promoted(registry):
    other = ClassificationSpec("topic", "text", "text", ("sport", "politics"), False)
    served = asyncio.run(registry.acquire(9, other))
    assert served.kind is ModelKind.ZEROSHOT and served.version == registry.zero_shot_version(other)
    assert served.version.startswith("zeroshot-all-MiniLM-L6-v2-")


def test_registry_loads_the_promoted_version_and_swaps_atomically(registry):
    async def scenario():
        first = await registry.acquire(5, SPEC)
        assert first.kind is ModelKind.FINETUNED and first.version == "ft-0001"
        assert registry.version_for(5, SPEC) == "ft-0001"
        swapped = await asyncio.gather(*(registry.ensure_loaded(5, "ft-0002") for _ in range(3)))
        return first, swapped

    first, swapped = asyncio.run(scenario())
    assert len({id(s.classifier) for s in swapped}) == 1  # loaded once, however many asked
    assert registry.loaded(5).version == "ft-0002" and registry.pointer(5) == "ft-0002"
    # the old model still answers for whoever holds it (an in-flight request)
    assert first.classifier.predict_proba(["great film"]).shape == (1, 2)


def test_registry_restricts_to_compatible_checkpoints(registry):
    multi = ClassificationSpec("sentiment", "text", "text", ("Positive", "Negative"), True)
    renamed = ClassificationSpec("sentiment", "text", "text", ("Good", "Bad"), False)
    for spec in (multi, renamed):  # another choice mode, or no label in common: the baseline answers
        assert asyncio.run(registry.acquire(5, spec)).kind is ModelKind.ZEROSHOT


def test_registry_keeps_at_most_max_loaded_checkpoints(registry, tmp_path):
    from tests.support.checkpoints import save_checkpoint

    save_checkpoint(registry.store, 6, "ft-0001", ("Positive", "Negative"), seed=3)
    registry.store.promote(6, "ft-0001")
    started = time.monotonic()
    served = asyncio.run(registry.acquire(6, SPEC))
    assert served.version == "ft-0001" and time.monotonic() - started < 120
    assert registry.loaded(6) is not None and registry.loaded(5) is None  # max_loaded=1: project 5 evicted
