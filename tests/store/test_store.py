"""Behaviour of both checkpoint stores (LocalStore on a directory, S3Store against a real moto_server)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from lsbert.store import METADATA_FILE, StoreError, VersionNotFound, version_seq
from lsbert.store.base import STORE_KEY

from .conftest import Backend, tree_bytes

PROJECT = 7
NAME = "bert-ft"


def _save(store, checkpoint: Path, project: int = PROJECT, **metadata) -> str:
    version = store.next_version(project, NAME)
    store.save(project, version, checkpoint, metadata or {"metrics": {"f1": 0.5}})
    return version


def _assert_loadable(store, project: int, version: str, checkpoint: Path) -> None:
    path = store.local_path(project, version)
    assert tree_bytes(path) == tree_bytes(checkpoint)
    assert json.loads((path / METADATA_FILE).read_text())[STORE_KEY]["version"] == version


# ---- the round trip -----------------------------------------------------------------------------


def test_round_trip(backend: Backend, checkpoint: Path) -> None:
    store = backend.open()
    assert store.projects() == [] and store.versions(PROJECT) == [] and store.promoted(PROJECT) is None

    v1 = store.next_version(PROJECT, NAME)
    assert v1 == f"{NAME}-0001"
    assert store.versions(PROJECT) == []  # a reservation is not a version
    store.save(PROJECT, v1, checkpoint, {"metrics": {"f1": 0.81}, "base_model": "bert-base"})

    [info] = store.versions(PROJECT)
    assert (info.project, info.version, info.metrics) == (PROJECT, v1, {"f1": 0.81})
    meta = store.metadata(PROJECT, v1)
    assert meta["base_model"] == "bert-base"
    files = meta[STORE_KEY]["files"]
    assert set(files) == {"config.json", "model.safetensors", "tokenizer/vocab.txt", "empty.txt"}
    assert files["model.safetensors"]["size"] == 150_000
    assert store.projects() == [PROJECT]

    store.promote(PROJECT, v1)
    assert store.promoted(PROJECT) == v1
    _assert_loadable(store, PROJECT, v1, checkpoint)

    v2 = store.next_version(PROJECT, NAME)
    assert version_seq(v2) == 2
    (checkpoint / "config.json").write_text('{"changed": true}')
    store.save(PROJECT, v2, checkpoint, {"metrics": {"f1": 0.85}})
    assert [v.version for v in store.versions(PROJECT)] == [v1, v2]
    assert store.promoted(PROJECT) == v1  # saving never promotes
    store.promote(PROJECT, v2)
    assert store.promoted(PROJECT) == v2
    _assert_loadable(store, PROJECT, v2, checkpoint)

    # a second store instance (another pod) sees the same thing
    other = backend.open()
    assert other.promoted(PROJECT) == v2 and [v.version for v in other.versions(PROJECT)] == [v1, v2]

    with pytest.raises(VersionNotFound):
        store.metadata(PROJECT, f"{NAME}-0099")
    with pytest.raises(VersionNotFound):
        store.promote(PROJECT, f"{NAME}-0099")
    with pytest.raises(VersionNotFound):
        store.local_path(PROJECT, f"{NAME}-0099")
    assert store.promoted(PROJECT) == v2


def test_update_metadata(backend: Backend, checkpoint: Path) -> None:
    store = backend.open()
    v1 = _save(store, checkpoint)
    path = store.local_path(PROJECT, v1)
    store.update_metadata(PROJECT, v1, {"promotion": {"decision": "promote", "delta": 0.02}})
    meta = store.metadata(PROJECT, v1)
    assert meta["promotion"]["decision"] == "promote" and meta["metrics"] == {"f1": 0.5}
    assert meta[STORE_KEY]["version"] == v1
    with pytest.raises(ValueError):
        store.update_metadata(PROJECT, v1, {STORE_KEY: {}})
    with pytest.raises(VersionNotFound):
        store.update_metadata(PROJECT, f"{NAME}-0042", {"x": 1})

    # the loaded copy carries the new metadata; for S3 without downloading the weights again
    steps: list[str] = []
    store.fault_hook = steps.append
    assert store.local_path(PROJECT, v1) == path
    assert json.loads((path / METADATA_FILE).read_text())["promotion"]["decision"] == "promote"
    assert not [s for s in steps if s.startswith("download:")]


def test_concurrent_metadata_updates_are_not_lost(backend: Backend, checkpoint: Path) -> None:
    store = backend.open()
    version = _save(store, checkpoint)

    def work(i: int) -> None:
        for j in range(3):
            store.update_metadata(PROJECT, version, {f"t{i}-{j}": True})

    pool = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(60)
    meta = store.metadata(PROJECT, version)
    assert {k for k in meta if k.startswith("t")} == {f"t{i}-{j}" for i in range(4) for j in range(3)}
    assert [v.version for v in store.versions(PROJECT)] == [version]

    store.promote(PROJECT, _save(store, checkpoint))
    assert store.prune(PROJECT, keep=1) == [version]
    with pytest.raises(VersionNotFound):
        store.update_metadata(PROJECT, version, {"late": True})
    assert [v.version for v in store.versions(PROJECT)] == [f"{NAME}-0002"]  # not resurrected


def test_save_refuses_to_overwrite(backend: Backend, checkpoint: Path, tmp_path: Path) -> None:
    store = backend.open()
    v1 = _save(store, checkpoint)
    before = tree_bytes(store.local_path(PROJECT, v1))
    meta_before = store.metadata(PROJECT, v1)

    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    (other / "model.safetensors").write_bytes(b"different")
    with pytest.raises(StoreError, match="already exists"):
        store.save(PROJECT, v1, other, {"metrics": {"f1": 0.0}})
    with pytest.raises(StoreError, match="already exists"):
        backend.open().save(PROJECT, v1, other, {})
    assert store.metadata(PROJECT, v1) == meta_before
    assert tree_bytes(backend.open().local_path(PROJECT, v1)) == before
    assert [v.version for v in store.versions(PROJECT)] == [v1]


def test_invalid_arguments(backend: Backend, checkpoint: Path) -> None:
    store = backend.open()
    for bad in ("../../etc", "bert", "bert-01", ".hidden-0001", "a/b-0001"):
        with pytest.raises(ValueError):
            store.save(PROJECT, bad, checkpoint, {})
    with pytest.raises(ValueError):
        store.versions(-1)
    with pytest.raises(ValueError):
        store.next_version(PROJECT, "bad/name")
    with pytest.raises(ValueError):
        store.prune(PROJECT, -1)
    with pytest.raises(StoreError, match="not a directory"):
        store.save(PROJECT, f"{NAME}-0001", checkpoint / "nope", {})


# ---- next_version under concurrency -------------------------------------------------------------


def test_next_version_never_repeats_across_threads(backend: Backend) -> None:
    threads, per_thread = 6, 4
    results: list[list[str]] = [[] for _ in range(threads)]
    barrier = threading.Barrier(threads)
    shared = backend.open()

    def work(i: int) -> None:
        store = backend.open(fresh=True) if i % 4 == 0 else shared  # one shared instance and separate clients
        barrier.wait()
        for _ in range(per_thread):
            results[i].append(store.next_version(PROJECT, NAME))

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(60)
    got = [v for r in results for v in r]
    assert len(got) == threads * per_thread
    assert len({version_seq(v) for v in got}) == len(got), sorted(got)
    for r in results:  # each caller sees its own numbers increase
        assert [version_seq(v) for v in r] == sorted(version_seq(v) for v in r)
    assert version_seq(shared.next_version(PROJECT, "other-name")) > max(version_seq(v) for v in got)


def test_next_version_never_repeats_across_processes(backend: Backend) -> None:
    start_at = time.time() + 1.5  # both interpreters are up by then and start together
    procs = [backend.popen("next-version", project=PROJECT, name=NAME, count=8, start_at=start_at) for _ in range(2)]
    mine = []
    while time.time() < start_at:
        time.sleep(0.001)
    store = backend.open()
    for _ in range(4):
        mine.append(store.next_version(PROJECT, NAME))
    got = list(mine)
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        got += json.loads(out)
    assert len(got) == 20
    assert len(set(got)) == 20, sorted(got)


# ---- crash safety -------------------------------------------------------------------------------


def _kill_steps(backend: Backend, checkpoint: Path, tmp_path: Path) -> list[str]:
    """Run save+promote once without a kill (elsewhere) and return the fault-hook steps it passes."""
    steps_file = tmp_path / "dry-steps"
    rc = backend.at("dry").forked(
        "save-promote",
        project=PROJECT,
        name=NAME,
        source=str(checkpoint),
        kill_at=None,
        steps_file=str(steps_file),
        version_file=str(tmp_path / "dry-version"),
    )
    assert rc == 0
    return steps_file.read_text().split()


def test_promotion_is_atomic_under_kill_at_every_step(backend: Backend, checkpoint: Path, tmp_path: Path) -> None:
    steps = _kill_steps(backend, checkpoint, tmp_path)
    files = ["config.json", "empty.txt", "model.safetensors", "tokenizer/vocab.txt"]
    assert [s for s in steps if s.startswith("save:file:")] == [f"save:file:{f}" for f in files]
    for needed in ("save:before-metadata", "save:after-metadata", "promote:before-pointer", "promote:after-pointer"):
        assert needed in steps
    pointer_written = steps.index("promote:after-pointer")
    metadata_visible = steps.index("save:after-rename" if backend.kind == "local" else "save:after-metadata")

    new_files = tmp_path / "new-checkpoint"
    new_files.mkdir()
    for rel, data in tree_bytes(checkpoint).items():
        (new_files / rel).parent.mkdir(parents=True, exist_ok=True)
        (new_files / rel).write_bytes(data[::-1] + b"new")

    for k, step in enumerate(steps):
        loc = backend.at(f"k{k}")
        store = loc.open()
        base = _save(store, checkpoint, metrics={"f1": 0.7})
        store.promote(PROJECT, base)

        rc = loc.forked(
            "save-promote",
            project=PROJECT,
            name=NAME,
            source=str(new_files),
            kill_at=k,
            steps_file=None,
            version_file=str(tmp_path / f"version-{k}"),
        )
        assert rc == -signal.SIGKILL, (step, rc)
        new = (tmp_path / f"version-{k}").read_text()
        assert version_seq(new) == version_seq(base) + 1

        reader = loc.open()
        promoted = reader.promoted(PROJECT)
        expected = new if k >= pointer_written else base
        assert promoted == expected, f"killed at {step}"
        # what is promoted is complete and loads the right bytes
        _assert_loadable(reader, PROJECT, promoted, new_files if promoted == new else checkpoint)

        listed = [v.version for v in reader.versions(PROJECT)]
        if k >= metadata_visible:
            assert listed == [base, new], f"killed at {step}"
            _assert_loadable(reader, PROJECT, new, new_files)
        else:
            assert listed == [base], f"killed at {step}: half-written version listed"
            with pytest.raises(VersionNotFound):
                reader.metadata(PROJECT, new)
            with pytest.raises(VersionNotFound):
                reader.promote(PROJECT, new)

        # the store carries on: a later run never reuses the crashed run's number, and saves fine
        after = _save(reader, checkpoint)
        assert version_seq(after) > version_seq(new)
        reader.promote(PROJECT, after)
        _assert_loadable(reader, PROJECT, after, checkpoint)


def test_killed_download_leaves_no_complete_looking_cache(
    s3_backend: Backend, checkpoint: Path, tmp_path: Path
) -> None:
    store = s3_backend.open()
    version = _save(store, checkpoint)
    store.promote(PROJECT, version)
    target = store._cache_path(PROJECT, version)

    steps_file = tmp_path / "steps"
    dry = Backend("s3", s3_backend.uri, tmp_path / "dry-cache", s3_backend.env, s3_backend.servers)
    assert dry.forked("download", project=PROJECT, version=version, kill_at=None, steps_file=str(steps_file)) == 0
    steps = steps_file.read_text().split()
    assert steps[-1] == "download:after-rename" and "download:before-metadata" in steps
    assert len([s for s in steps if s.startswith("download:file:")]) == 4

    for k, step in enumerate(steps[:-1]):
        rc = s3_backend.forked("download", project=PROJECT, version=version, kill_at=k, steps_file=None)
        assert rc == -signal.SIGKILL, (step, rc)
        assert not target.exists(), f"killed at {step}: a half download sits at the final path"
        leftovers = [p.name for p in target.parent.iterdir()]
        assert all(name.startswith(".partial-") for name in leftovers), leftovers

    path = store.local_path(PROJECT, version)
    assert path == target
    assert tree_bytes(path) == tree_bytes(checkpoint)

    # a copy whose bytes were damaged after the fact is only reused while its lsbert.json matches the store
    (path / METADATA_FILE).write_text(json.dumps({STORE_KEY: {"save_id": "stale"}}))
    assert tree_bytes(store.local_path(PROJECT, version)) == tree_bytes(checkpoint)
    assert json.loads((path / METADATA_FILE).read_text())[STORE_KEY]["version"] == version


# ---- retention ----------------------------------------------------------------------------------


def test_prune_keeps_newest_and_promoted(backend: Backend, checkpoint: Path) -> None:
    store = backend.open()
    versions = [_save(store, checkpoint) for _ in range(5)]
    store.promote(PROJECT, versions[0])  # the oldest is the one serving

    assert store.prune(PROJECT, keep=2) == versions[1:3]
    assert [v.version for v in store.versions(PROJECT)] == [versions[0], *versions[3:]]
    assert store.promoted(PROJECT) == versions[0]
    _assert_loadable(store, PROJECT, versions[0], checkpoint)
    for gone in versions[1:3]:
        with pytest.raises(VersionNotFound):
            store.metadata(PROJECT, gone)
    assert store.prune(PROJECT, keep=2) == []

    # keep=0: everything but the promoted version goes, and numbers are still never reused
    assert store.prune(PROJECT, keep=0) == versions[3:]
    assert [v.version for v in store.versions(PROJECT)] == [versions[0]]
    assert version_seq(store.next_version(PROJECT, NAME)) == 6

    # without a promoted version, keep=K keeps exactly the newest K
    other = [_save(store, checkpoint, project=PROJECT + 1) for _ in range(3)]
    assert store.prune(PROJECT + 1, keep=1) == other[:2]
    assert [v.version for v in store.versions(PROJECT + 1)] == other[2:]
    assert store.prune(PROJECT + 99, keep=1) == []


def test_prune_cleans_abandoned_partial_saves(
    backend: Backend, checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = backend.open()
    base = _save(store, checkpoint)
    store.promote(PROJECT, base)
    rc = backend.forked(
        "save-promote",
        project=PROJECT,
        name=NAME,
        source=str(checkpoint),
        kill_at=1,
        steps_file=None,
        version_file=str(tmp_path / "v"),
    )
    assert rc == -signal.SIGKILL
    crashed = (tmp_path / "v").read_text()

    def leftovers() -> list[str]:
        if backend.kind == "local":
            pdir = Path(backend.uri) / str(PROJECT)
            return sorted(p.name for p in pdir.iterdir() if p.name.startswith(".staging-"))
        client = store._client
        prefix = f"{store._project_prefix(PROJECT)}{crashed}/"
        return [o["Key"] for o in client.list_objects_v2(Bucket=store.bucket, Prefix=prefix).get("Contents", [])]

    assert leftovers()
    assert store.prune(PROJECT, keep=5) == []
    assert leftovers(), "a fresh partial save (maybe still running) must survive prune"

    monkeypatch.setattr(f"lsbert.store.{backend.kind}.STALE_AFTER_S", -1.0)
    assert store.prune(PROJECT, keep=5) == []
    assert leftovers() == []
    assert [v.version for v in store.versions(PROJECT)] == [base]
    assert store.promoted(PROJECT) == base
    assert version_seq(store.next_version(PROJECT, NAME)) > version_seq(crashed)


def test_local_layout_on_disk(local_backend: Backend, checkpoint: Path) -> None:
    store = local_backend.open()
    version = _save(store, checkpoint)
    store.promote(PROJECT, version)
    pdir = Path(local_backend.uri) / str(PROJECT)
    assert store.local_path(PROJECT, version) == pdir / version
    pointer = json.loads((pdir / "PROMOTED").read_text())
    assert pointer["version"] == version and "promoted_at" in pointer
    names = sorted(os.listdir(pdir))
    assert names == [".reserved-0001", "PROMOTED", version], names  # no temp or staging left behind
    # a stray non-version entry or an incomplete dir is never listed
    (pdir / f"{NAME}-0005").mkdir()
    (pdir / "notes").mkdir()
    assert [v.version for v in store.versions(PROJECT)] == [version]
    assert version_seq(store.next_version(PROJECT, NAME)) == 6


# ---- the embedding head's state ------------------------------------------------------------------


def _head_state_bytes(examples: int, seed: int = 0) -> bytes:
    import numpy as np

    from lsbert.model.head import fit
    from lsbert.model.headstate import HeadState, Labelled, head_version

    rng = np.random.default_rng(seed)
    labels = ("a", "b")
    state = HeadState("some-baseline", labels, False)
    for task in range(examples):
        vector = rng.normal(size=8).astype(np.float32)
        state.examples[task] = Labelled(vector / np.linalg.norm(vector), (labels[task % 2],), 100 + task, float(task))
    state.tombstones = {999: 5.0}
    _, embeddings, answers = state.arrays()
    state.head = fit(embeddings, answers, labels, False)
    state.version, state.serves, state.fitted_at = head_version(state.head), True, 1.0
    return state.to_bytes()


def test_head_state_round_trip(backend: Backend, checkpoint: Path) -> None:
    from lsbert.model.headstate import HeadState

    store = backend.open()
    assert store.read_head(PROJECT) is None and store.head_tag(PROJECT) is None
    first = _head_state_bytes(10)
    tag = store.write_head(PROJECT, first)
    assert store.head_tag(PROJECT) == tag
    raw, read_tag = store.read_head(PROJECT)
    assert raw == first and read_tag == tag
    state = HeadState.from_bytes(raw)
    assert len(state.examples) == 10 and state.examples[3].labels == ("b",) and state.examples[3].annotation_id == 103
    assert state.tombstones == {999: 5.0} and state.serves and state.version and state.version.startswith("head-10-")

    second = _head_state_bytes(12, seed=1)
    new_tag = store.write_head(PROJECT, second)
    assert new_tag != tag and store.head_tag(PROJECT) == new_tag and store.read_head(PROJECT)[0] == second
    assert backend.open(fresh=True).read_head(PROJECT)[0] == second  # another replica reads the same bytes

    # the head is never a version, a project of its own, or something prune() removes
    version = _save(store, checkpoint)
    store.promote(PROJECT, version)
    assert [v.version for v in store.versions(PROJECT)] == [version]
    assert store.prune(PROJECT, keep=0) == []
    assert version_seq(store.next_version(PROJECT, NAME)) == 2
    assert store.read_head(PROJECT)[0] == second
    assert store.projects() == [PROJECT]
    if backend.kind == "local":
        hdir = Path(backend.uri) / str(PROJECT) / ".head"
        assert sorted(os.listdir(hdir)) == ["state.npz"]  # no temp file left behind


def test_head_state_refuses_garbage() -> None:
    from lsbert.model.headstate import HeadState

    for raw in (b"", b"not a zip", _head_state_bytes(4)[:100]):
        with pytest.raises(ValueError):
            HeadState.from_bytes(raw)
