"""bench/gpu.py stays runnable: its CPU smoke mode goes through the engine, the loop and both baselines."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.conftest import REPO


def test_gpu_benchmark_smoke_mode_prints_positive_figures():
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    proc = subprocess.run(
        [sys.executable, "bench/gpu.py", "--device", "cpu", "--smoke"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = dict(re.findall(r"^([a-z0-9_]+)=(\S+)$", proc.stdout, re.MULTILINE))
    for name in ("inference_seq_per_s", "train_samples_per_s", "latency_p50_ms", "inference_mix_seq_per_s"):
        assert name in figures, f"no {name}= line in:\n{proc.stdout}"
        assert float(figures[name]) > 0, f"{name}={figures[name]}"
    assert figures["device"] == "cpu"
    # every line is a figure or a comment
    assert all(re.match(r"^([a-z0-9_]+=\S+|# .*)$", line) for line in proc.stdout.splitlines()), proc.stdout
