"""The two Dockerfiles share their large layers, and the image builder's input hash sees every input.

A builder reuses a cached layer only when every instruction before it is the same (and the build
arguments in effect have the same values), so the two files must be identical from the first FROM until
the image-specific tail; only an ARG default above the first FROM may differ. No Docker needed."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from tests.cluster import images

MARKER = "# ------------------------------------------------------------------------------------ image-specific"


def _split(path: Path) -> tuple[list[str], str, str]:
    """(instructions above the first FROM, the text from the first FROM to the marker, the tail)."""
    text = path.read_text()
    assert text.count(MARKER) == 1, f"{path}: one '{MARKER}' line ends the shared part"
    shared_start = re.search(r"^FROM ", text, re.MULTILINE).start()
    head, rest = text[:shared_start], text[shared_start:]
    shared, tail = rest.split(MARKER)
    head_instructions = [line for line in head.splitlines() if line and not line.startswith("#")]
    return head_instructions, shared, tail


def _instructions(text: str) -> list[str]:
    return images.dockerfile_instructions(text)


PARTS = {name: _split(path) for name, path in images.DOCKERFILES.items()}


def test_everything_from_the_first_from_to_the_tail_is_identical() -> None:
    predictor, trainer = PARTS["predictor"][1], PARTS["trainer"][1]
    if predictor != trainer:
        diff = [
            f"{i + 1}: {a!r} != {b!r}"
            for i, (a, b) in enumerate(zip(predictor.splitlines(), trainer.splitlines()))
            if a != b
        ]
        pytest.fail("shared parts differ:\n" + "\n".join(diff[:10] or ["(one is longer)"]))


def test_only_the_torch_index_default_differs_above_the_first_from() -> None:
    heads = {name: parts[0] for name, parts in PARTS.items()}
    assert heads["predictor"] == ["ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm", "ARG TORCH_INDEX=cpu"]
    assert heads["trainer"] == ["ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm", "ARG TORCH_INDEX=cuda"]


def test_the_shared_part_holds_every_large_layer_and_the_source_comes_late() -> None:
    lines = _instructions(PARTS["predictor"][1])
    index = {
        key: next(i for i, line in enumerate(lines) if pattern in line)
        for key, pattern in {
            "torch": 'pip install --no-cache-dir --index-url "${index_url}" "torch==${TORCH_VERSION}"',
            "dependencies": "pip install --no-cache-dir -r /tmp/requirements.txt",
            "source": "COPY src/ src/",
            "wheel": "pip wheel --no-cache-dir --no-deps",
            "venv": "COPY --from=build /opt/venv /opt/venv",
            "lsbert": "pip install --no-cache-dir --no-deps --no-index",
        }.items()
    }
    index["runtime"] = lines.index("FROM ${PYTHON_IMAGE}")
    assert index["torch"] < index["dependencies"] < index["source"] < index["wheel"] < index["runtime"]
    assert index["runtime"] < index["venv"] < index["lsbert"]
    assert sum(line.startswith("FROM ") for line in lines) == 3
    assert index["dependencies"] > lines.index("COPY --from=requirements /tmp/requirements.txt /tmp/requirements.txt")
    # Stage-level ARGs carry no default of their own: a differing default would split the build cache.
    assert "ARG TORCH_INDEX" in lines and not any(line.startswith("ARG TORCH_INDEX=") for line in lines)
    assert lines[-1] == "USER 10001:10001"


def test_the_tails_hold_only_metadata_and_the_predictor_job_template() -> None:
    for name, parts in PARTS.items():
        for line in _instructions(parts[2]):
            keyword = line.split()[0]
            assert keyword in {"ENV", "ARG", "LABEL", "EXPOSE", "ENTRYPOINT", "CMD"}, f"{name}: {line}"
    assert "NVIDIA_VISIBLE_DEVICES" not in images.DOCKERFILES["trainer"].read_text(), (
        "the device plugin sets NVIDIA_VISIBLE_DEVICES for the GPUs a pod gets"
    )


def test_the_dependency_layer_installs_exactly_pyprojects_dependencies(tmp_path: Path) -> None:
    (command,) = [line for line in _instructions(PARTS["predictor"][1]) if "tomllib" in line]
    program = re.search(r"python -c '([^']+)'", command).group(1)
    shutil.copy(images.REPO_ROOT / "pyproject.toml", tmp_path)
    program = program.replace("/tmp/pyproject.toml", str(tmp_path / "pyproject.toml"))
    printed = subprocess.run(
        [sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True, check=True, timeout=30
    ).stdout.splitlines()
    expected = tomllib.loads((images.REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert printed == expected and any(dep.startswith("torch==") for dep in printed)


def _copy_inputs(dest: Path) -> Path:
    for rel in images.context_files():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(images.REPO_ROOT / rel, dest / rel)
    return dest


def test_the_inputs_hash_changes_with_the_source_and_ignores_byte_code(tmp_path: Path) -> None:
    root = _copy_inputs(tmp_path / "base")
    before = images.inputs_hash("lsbert-base:test-x", "cuda", root)
    assert images.inputs_hash("lsbert-base:test-x", "cuda", root) == before

    cache = root / "src" / "lsbert" / "__pycache__"
    cache.mkdir(exist_ok=True)
    (cache / "cli.cpython-311.pyc").write_bytes(b"\0")
    assert images.inputs_hash("lsbert-base:test-x", "cuda", root) == before

    assert images.inputs_hash("lsbert-base:test-y", "cuda", root) != before
    assert images.inputs_hash("lsbert-base:test-x", "cpu", root) != before
    for rel in ("src/lsbert/new_module.py", "images/trainer/Dockerfile", "pyproject.toml"):
        changed = _copy_inputs(tmp_path / rel.replace("/", "_"))
        target = changed / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "a") as fh:
            fh.write("\n# changed\n")
        assert images.inputs_hash("lsbert-base:test-x", "cuda", changed) != before, rel


def test_local_tags_map_to_the_names_containerd_and_the_kubelet_use() -> None:
    assert images.containerd_ref("lsbert-predictor:test-abc") == "docker.io/library/lsbert-predictor:test-abc"
    assert images.containerd_ref("example.org/x/y:1") == "example.org/x/y:1"
    assert images.containerd_ref("team/y:1") == "docker.io/team/y:1"


def test_the_base_recipe_follows_the_host_ca_bundle(tmp_path: Path) -> None:
    bundle = tmp_path / "ca.crt"
    bundle.write_text("one\n")
    first = images.base_tag(bundle)
    bundle.write_text("two\n")
    assert images.base_tag(bundle) != first and first.startswith("lsbert-base:test-")


def test_only_our_tags_beyond_the_newest_builds_are_removed() -> None:
    def stamp(digest: str, built: str) -> dict:
        return {
            "hash": digest + "0" * 52,
            "built": built,
            "base": "lsbert-base:test-b1",
            "predictor": f"lsbert-predictor:test-{digest}",
            "trainer": f"lsbert-trainer:test-{digest}",
        }

    stamps = [stamp("cccccccccccc", "2026-03"), stamp("bbbbbbbbbbbb", "2026-02"), stamp("aaaaaaaaaaaa", "2026-01")]
    tags = [f"lsbert-{repo}:test-{d * 12}" for d in "abc" for repo in ("predictor", "trainer", "build")]
    tags += ["lsbert-base:test-b1", "lsbert-base:test-b0", "lsbert-predictor:dev", "python:3.11", "<none>:<none>"]
    assert images.superseded(tags, stamps, keep_builds=2) == [
        "lsbert-predictor:test-aaaaaaaaaaaa",
        "lsbert-trainer:test-aaaaaaaaaaaa",
        "lsbert-build:test-aaaaaaaaaaaa",
        "lsbert-base:test-b0",
    ]
    assert images.superseded(tags, stamps, keep_builds=3) == ["lsbert-base:test-b0"]


def test_only_our_earlier_images_are_removed_from_the_nodes_containerd() -> None:
    current = images.Images("lsbert-predictor:test-cccccccccccc", "lsbert-trainer:test-cccccccccccc")
    refs = [
        "docker.io/library/lsbert-predictor:test-cccccccccccc",
        "docker.io/library/lsbert-trainer:test-cccccccccccc",
        "docker.io/library/lsbert-predictor:test-aaaaaaaaaaaa",
        "docker.io/library/lsbert-trainer:test-aaaaaaaaaaaa",
        "docker.io/library/lsbert-predictor:dev",
        "docker.io/library/lsbert-pause:test-1",
        "registry.k8s.io/pause:3.10",
        "sha256:0123",
    ]
    assert images.older_in_containerd(refs, current) == [
        "docker.io/library/lsbert-predictor:test-aaaaaaaaaaaa",
        "docker.io/library/lsbert-trainer:test-aaaaaaaaaaaa",
    ]
