"""Predictor benchmark: prints figures, compares with a naive baseline measured in the same run.

    .venv/bin/python bench/predict.py [--tasks 1000] [--requests 400]

lsbert: one real `lsbert serve` process (MiniLM, default precision), driven over HTTP on 127.0.0.1.
Baseline: a `transformers` text-classification pipeline over the same texts, fp32, batch 32 in the given
order (no length sorting), in its own process, called in-process (no HTTP: this favours the baseline).
Figures: tasks/s for one 1,000-task /predict, p50/p95 latency of single-task predicts at concurrency 8,
peak RSS. Last line: speedup_vs_baseline=<x> (tasks/s ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
CONFIG = (
    '<View><Text name="text" value="$text"/><Choices name="sentiment" toName="text" choice="single">'
    '<Choice value="Positive"/><Choice value="Negative"/></Choices></View>'
)


def mixed_texts(n: int, seed: int = 0) -> list[str]:
    """Real review snippets when the data package is installed, joined into mixed lengths (1–12 snippets)."""
    try:
        from tests.support.datasets import rotten_tomatoes

        pool = [text for text, _ in rotten_tomatoes(limit=3000, seed=seed)]
    except Exception:
        words = [
            "the",
            "film",
            "was",
            "good",
            "bad",
            "long",
            "short",
            "funny",
            "dull",
            "moving",
            "slow",
            "bright",
            "dark",
        ]
        rng0 = random.Random(seed)
        pool = [" ".join(rng0.choice(words) for _ in range(25)) for _ in range(3000)]
    rng = random.Random(seed)
    return [" ".join(rng.choice(pool) for _ in range(rng.choice([1, 1, 1, 2, 3, 5, 8, 12]))) for _ in range(n)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --- baseline (runs in a child process) ------------------------------------------------------------
def baseline_worker(texts_file: str, requests_n: int) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import pipeline
    from transformers.utils import logging as hf_logging

    from lsbert.modelsource import resolve

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    texts = json.loads(Path(texts_file).read_text())
    path = resolve(MINILM)
    clf = pipeline("text-classification", model=path, tokenizer=path, device=-1, truncation=True, top_k=None)
    clf(texts[:64], batch_size=32)  # warm-up
    runs = []
    for _ in range(2):
        started = time.perf_counter()
        clf(texts, batch_size=32)
        runs.append(time.perf_counter() - started)
    rng = random.Random(1)
    singles = [rng.choice(texts) for _ in range(requests_n)]

    def one(text):
        started = time.perf_counter()
        clf([text])
        return time.perf_counter() - started

    with ThreadPoolExecutor(8) as pool:
        latencies = list(pool.map(one, singles))
    print(json.dumps({"seconds": min(runs), "latencies": latencies, "peak_rss_mb": peak_rss_mb(os.getpid())}))


# --- lsbert -----------------------------------------------------------------------------------------
def start_lsbert(tmp: Path) -> tuple[subprocess.Popen, str]:
    from tests.conftest import free_port

    port = free_port()
    env = {
        **os.environ,
        "BASELINE_MODEL_NAME": MINILM,
        "MODEL_DIR": str(tmp / "models"),
        "CACHE_DIR": str(tmp / "cache"),
        "TRAINING_LAUNCHER": "none",
        "HF_HUB_OFFLINE": "1",
        "LOG_LEVEL": "WARNING",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "lsbert", "serve", "--port", str(port)],
        env=env,
        cwd=tmp,
        stdout=open(tmp / "server.log", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if requests.get(url + "/v1/models/lsbert", timeout=1).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise SystemExit("lsbert did not become ready:\n" + (tmp / "server.log").read_text()[-3000:])


def bench_lsbert(texts: list[str], requests_n: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp_name:
        proc, url = start_lsbert(Path(tmp_name))
        try:
            session = requests.Session()
            tasks = [{"id": i, "data": {"text": t}} for i, t in enumerate(texts)]
            body = {"tasks": tasks, "project": "1.1", "label_config": CONFIG}
            session.post(url + "/predict", json={**body, "tasks": tasks[:64]}, timeout=300).raise_for_status()
            runs = []
            for _ in range(2):
                started = time.perf_counter()
                response = session.post(url + "/predict", json=body, timeout=600)
                runs.append(time.perf_counter() - started)
                response.raise_for_status()
                assert len(response.json()["results"]) == len(texts)
            rng = random.Random(1)
            singles = [rng.choice(texts) for _ in range(requests_n)]

            def one(text):
                started = time.perf_counter()
                r = requests.post(
                    url + "/predict",
                    json={"tasks": [{"id": 1, "data": {"text": text}}], "project": "1.1", "label_config": CONFIG},
                    timeout=120,
                )
                r.raise_for_status()
                return time.perf_counter() - started

            with ThreadPoolExecutor(8) as pool:
                latencies = list(pool.map(one, singles))
            return {"seconds": min(runs), "latencies": latencies, "peak_rss_mb": peak_rss_mb(proc.pid)}
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def report(name: str, n: int, result: dict) -> float:
    rate = n / result["seconds"]
    lat = result["latencies"]
    print(
        f"{name:9s} batch_tasks_per_s={rate:8.1f}  single_p50_ms={1000 * statistics.median(lat):7.1f}  "
        f"single_p95_ms={1000 * percentile(lat, 0.95):7.1f}  peak_rss_mb={result['peak_rss_mb']:7.0f}"
    )
    return rate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--baseline-worker", nargs=2, metavar=("TEXTS_FILE", "REQUESTS"))
    args = parser.parse_args()
    if args.baseline_worker:
        baseline_worker(args.baseline_worker[0], int(args.baseline_worker[1]))
        return
    texts = mixed_texts(args.tasks)
    import torch

    print(
        f"# {args.tasks} tasks, mean {statistics.mean(len(t.split()) for t in texts):.0f} words; "
        f"{args.requests} single-task requests at concurrency 8; torch threads {torch.get_num_threads()}; "
        f"cores {os.cpu_count()}"
    )
    ours = bench_lsbert(texts, args.requests)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(texts, fh)
    out = subprocess.run(
        [sys.executable, __file__, "--baseline-worker", fh.name, str(args.requests)],
        capture_output=True,
        text=True,
        check=True,
    )
    baseline = json.loads(out.stdout.strip().splitlines()[-1])
    os.unlink(fh.name)
    ours_rate = report("lsbert", args.tasks, ours)
    base_rate = report("baseline", args.tasks, baseline)
    print(f"speedup_vs_baseline={ours_rate / base_rate:.2f}")


if __name__ == "__main__":
    main()
