"""Store errors name the location and never carry credentials."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest

from lsbert.store import StoreError, open_store
from lsbert.store.local import LocalStore
from lsbert.store.s3 import S3Store

from .conftest import ACCESS_KEY, BUCKET, SECRET, Backend, _s3_env, start_moto, stop_moto

PROJECT = 3


def _text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


def test_open_store_picks_the_implementation(tmp_path: Path, s3_backend: Backend) -> None:
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    store = open_store("s3://some-bucket/a/b/", cache_dir=tmp_path)
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix, store.root) == ("some-bucket", "a/b", "s3://some-bucket/a/b")


def test_s3_missing_bucket(s3_backend: Backend, tmp_path: Path, checkpoint: Path) -> None:
    store = S3Store("s3://no-such-bucket-lsbert/models", cache_dir=tmp_path)
    for call in (
        lambda: store.versions(PROJECT),
        lambda: store.promoted(PROJECT),
        lambda: store.save(PROJECT, "m-0001", checkpoint, {}),
    ):
        with pytest.raises(StoreError) as info:
            call()
        msg = str(info.value)
        assert "no-such-bucket-lsbert" in msg and "does not exist" in msg, msg
        assert SECRET not in _text(info.value)


def test_s3_unreadable_pointer(s3_backend: Backend, checkpoint: Path) -> None:
    store = s3_backend.open()
    version = store.next_version(PROJECT, "m")
    store.save(PROJECT, version, checkpoint, {})
    key = f"{store._project_prefix(PROJECT)}PROMOTED"
    store._client.put_object(Bucket=store.bucket, Key=key, Body=b"{not json")
    with pytest.raises(StoreError, match=f"unreadable promotion pointer s3://{BUCKET}/{key}"):
        store.promoted(PROJECT)
    with pytest.raises(StoreError, match="unreadable promotion pointer"):
        store.prune(PROJECT, keep=0)  # never prune without knowing what is promoted
    store.promote(PROJECT, version)  # promote repairs it
    assert store.promoted(PROJECT) == version


def test_local_unreadable_pointer_and_bad_root(tmp_path: Path, checkpoint: Path) -> None:
    store = LocalStore(tmp_path / "models")
    version = store.next_version(PROJECT, "m")
    store.save(PROJECT, version, checkpoint, {})
    pointer = tmp_path / "models" / str(PROJECT) / "PROMOTED"
    pointer.write_text('{"version": 42}')
    with pytest.raises(StoreError, match=f"unreadable promotion pointer {pointer}"):
        store.promoted(PROJECT)
    store.promote(PROJECT, version)
    assert store.promoted(PROJECT) == version

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    bad = LocalStore(not_a_dir)
    with pytest.raises(StoreError, match=str(not_a_dir)):
        bad.next_version(PROJECT, "m")
    with pytest.raises(StoreError, match=str(not_a_dir)):
        bad.save(PROJECT, "m-0001", checkpoint, {})
    assert bad.versions(PROJECT) == [] and bad.projects() == []


def test_local_permission_denied_says_who_owns_the_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A volume the process cannot write (a root-owned share): the error names the owner, the mode and the uid."""
    import os

    root = tmp_path / "models"
    root.mkdir()
    root.chmod(0o755)

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(StoreError) as info:
        LocalStore(root).next_version(PROJECT, "m")
    msg = str(info.value)
    assert msg.startswith(f"permission denied creating {root / str(PROJECT)} ({root} is owned by uid "), msg
    assert f"uid {os.getuid()} gid {os.getgid()}" in msg and "mode 0755" in msg, msg
    assert "volumePermissions.enabled=true" in msg, msg


def test_s3_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, checkpoint: Path) -> None:
    """A moto_server that enforces IAM auth: unknown credentials are refused with 403."""
    server = start_moto(tmp_path, {"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        _s3_env(monkeypatch, server.env())
        store = S3Store("s3://locked-bucket/models", cache_dir=tmp_path / "cache")
        for call in (
            lambda: store.versions(PROJECT),
            lambda: store.promoted(PROJECT),
            lambda: store.next_version(PROJECT, "m"),
            lambda: store.save(PROJECT, "m-0001", checkpoint, {}),
        ):
            with pytest.raises(StoreError) as info:
                call()
            msg = str(info.value)
            assert "permission denied" in msg and "s3://locked-bucket/models/3/" in msg, msg
            text = _text(info.value)
            assert SECRET not in text
    finally:
        stop_moto(server.proc)
    assert server.proc.poll() is not None


def test_s3_unreachable_endpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from .conftest import _free_port

    env = {
        "AWS_ENDPOINT_URL": f"http://user:pw-in-url@127.0.0.1:{_free_port()}",
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_MAX_ATTEMPTS": "1",
    }
    _s3_env(monkeypatch, env)
    store = S3Store("s3://bucket-x/models", cache_dir=tmp_path)
    with pytest.raises(StoreError) as info:
        store.versions(PROJECT)
    msg = str(info.value)
    assert "cannot reach the S3 endpoint" in msg and "s3://bucket-x/models/3/" in msg, msg
    assert "pw-in-url" not in msg and SECRET not in _text(info.value)


def test_s3_endpoint_from_s3_endpoint_url(
    s3_backend: Backend, monkeypatch: pytest.MonkeyPatch, checkpoint: Path, tmp_path: Path
) -> None:
    """S3_ENDPOINT_URL is honoured when AWS_ENDPOINT_URL is not set."""
    endpoint = s3_backend.env["AWS_ENDPOINT_URL"]
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("S3_ENDPOINT_URL", endpoint)
    store = open_store(s3_backend.uri, cache_dir=tmp_path / "c")
    assert store._client.meta.endpoint_url == endpoint
    version = store.next_version(PROJECT, "m")
    store.save(PROJECT, version, checkpoint, {})
    assert [v.version for v in s3_backend.open().versions(PROJECT)] == [version]
