"""Training benchmark: lsbert's fine-tuning loop vs a plain ``transformers.Trainer``, same data, same model.

    .venv/bin/python bench/train.py [--examples 1000] [--holdout 500] [--rounds 1] [--same-batch]

Data: Rotten Tomatoes snippets (fresh/rotten, balanced; tests/support/datasets.py), ``--examples`` to
train on and ``--holdout`` others to score both models on. Model: MiniLM-L6 (offline, packaged weights).
One epoch each, every worker in its own fresh process, same environment and thread count.

* lsbert: ``lsbert.trainer.loop.fine_tune`` with the Settings defaults (TRAIN_BATCH_SIZE, TRAIN_MAX_LENGTH,
  PRECISION=auto → bf16 autocast where the CPU has it), length-grouped dynamic padding; the learning rate
  is Trainer's default (5e-5) so that the accuracies compare the loops rather than the hyper-parameters;
  input word embeddings frozen, as ``lsbert train`` does by default.
  ``--same-batch`` adds a run at Trainer's batch size (8), to separate the loop's gain from the batch's.
* Trainer: ``TrainingArguments(output_dir=<tmp>, report_to=[], num_train_epochs=1)``, everything else
  default (batch 8, fp32, lr 5e-5); texts tokenized with truncation to the same max length and padded per
  batch by Trainer's default collator (``DataCollatorWithPadding``, random batches). That is the stronger
  baseline: padding every text to 128 tokens, as run_glue does by default, was ~3x slower (reference
  performance.md §6). Needs ``accelerate`` (Trainer does; lsbert does not).

Rounds alternate lsbert / Trainer; the best round of each counts (contention from other processes only
ever slows a round down). Workers run with OMP_WAIT_POLICY=PASSIVE unless the environment sets it, as
``lsbert train`` itself does (spinning OpenMP threads are several times slower on a shared CPU).
Figures: train samples/s = samples / wall time of the whole training call (``fine_tune(...)`` resp.
``trainer.train()``, set-up included, model loading excluded), held-out accuracy.
Last line: ``train_speedup_vs_trainer=<x>``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
LABELS = ("fresh", "rotten")
SEED = 1


# ------------------------------------------------------------------------------------------ workers


def _data(examples: int, holdout: int):
    from tests.support.datasets import rotten_tomatoes

    rows = rotten_tomatoes(limit=examples + holdout, seed=SEED)
    return rows[:examples], rows[examples:]


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _holdout_accuracy(model, tokenizer, holdout, runtime, max_length: int) -> float:
    from lsbert.trainer.loop import predict_proba

    if not holdout:
        return float("nan")
    proba = predict_proba(model, tokenizer, [t for t, _ in holdout], False, runtime, max_length)
    labels = [model.config.id2label[int(i)] for i in proba.argmax(axis=1)]
    return sum(p == t for p, (_, t) in zip(labels, holdout)) / len(holdout)


TRAINER_DEFAULT_LR = 5e-5
TRAINER_DEFAULT_BATCH = 8


def worker_lsbert(examples: int, holdout: int, batch_size: int = 0) -> dict:
    import torch

    from lsbert.model.runtime import select_runtime
    from lsbert.modelsource import resolve
    from lsbert.settings import load_settings
    from lsbert.trainer.dataset import Example
    from lsbert.trainer.loop import Hyperparameters, available_cores, fine_tune, load_for_training

    _quiet_transformers()
    settings = load_settings()
    threads = settings.torch_threads or available_cores()
    torch.set_num_threads(threads)
    runtime = select_runtime(settings.precision, threads)
    train_rows, held = _data(examples, holdout)
    train = [Example(text, (label,), i) for i, (text, label) in enumerate(train_rows)]
    hp = Hyperparameters(
        learning_rate=TRAINER_DEFAULT_LR,
        num_train_epochs=1,
        weight_decay=settings.weight_decay,
        batch_size=batch_size or settings.train_batch_size,
        max_length=settings.train_max_length,
        seed=settings.seed,
    )
    model, tokenizer = load_for_training(resolve(MINILM), LABELS, False, seed=settings.seed)
    wall = time.perf_counter()
    result = fine_tune(model, tokenizer, train, LABELS, False, hp, runtime, progress=lambda _line: None)
    wall = time.perf_counter() - wall
    return {
        "samples_per_second": result.samples / wall,
        "loop_samples_per_second": result.samples_per_second,
        "train_call_s": wall,
        "samples": result.samples,
        "batch_size": hp.batch_size,
        "precision": runtime.precision,
        "threads": torch.get_num_threads(),
        "holdout_accuracy": _holdout_accuracy(model, tokenizer, held, runtime, result.max_length),
    }


def worker_trainer(examples: int, holdout: int) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    from lsbert.model.runtime import Runtime
    from lsbert.modelsource import resolve
    from lsbert.settings import load_settings

    _quiet_transformers()
    settings = load_settings()
    train_rows, held = _data(examples, holdout)
    path = resolve(MINILM)
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(settings.seed)  # the new head's initialisation, as for lsbert
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, id2label=dict(enumerate(LABELS)), label2id={l: i for i, l in enumerate(LABELS)}
    )
    label_id = {label: i for i, label in enumerate(LABELS)}
    encoded = tokenizer([t for t, _ in train_rows], truncation=True, max_length=settings.train_max_length)
    dataset = [
        {"input_ids": ids, "attention_mask": mask, "labels": label_id[label]}
        for ids, mask, (_, label) in zip(encoded["input_ids"], encoded["attention_mask"], train_rows)
    ]
    with tempfile.TemporaryDirectory(prefix="lsbert-bench-trainer-") as out:
        args = TrainingArguments(output_dir=out, report_to=[], num_train_epochs=1)
        trainer = Trainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        wall = time.perf_counter()
        output = trainer.train()
        wall = time.perf_counter() - wall
    runtime = Runtime(device=torch.device("cpu"), autocast_dtype=None)  # score as trained: fp32
    return {
        "samples_per_second": len(dataset) / wall,
        "loop_samples_per_second": output.metrics["train_samples_per_second"],
        "train_call_s": wall,
        "samples": len(dataset),
        "batch_size": args.per_device_train_batch_size,
        "precision": "fp32",
        "threads": torch.get_num_threads(),
        "holdout_accuracy": _holdout_accuracy(model.eval(), tokenizer, held, runtime, settings.train_max_length),
    }


WORKERS = {
    "lsbert": worker_lsbert,
    "lsbert-b8": lambda examples, holdout: worker_lsbert(examples, holdout, TRAINER_DEFAULT_BATCH),
    "trainer": worker_trainer,
}


# ------------------------------------------------------------------------------------- measurements


def run_worker(kind: str, args: argparse.Namespace) -> dict:
    """One measurement in a fresh process (no warm caches carried between the contenders)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cmd = [sys.executable, __file__, "--worker", kind, "--examples", str(args.examples), "--holdout", str(args.holdout)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_train_throughput(args: argparse.Namespace) -> float:
    """Samples/s of lsbert's loop and of Trainer, best of ``args.rounds`` each; prints both, returns the ratio."""
    kinds = ["lsbert", "lsbert-b8", "trainer"] if args.same_batch else ["lsbert", "trainer"]
    results: dict[str, list[dict]] = {kind: [] for kind in kinds}
    for round_no in range(1, args.rounds + 1):
        for kind in kinds:
            result = run_worker(kind, args)
            results[kind].append(result)
            print(
                f"round {round_no} {kind:9s}: {result['samples_per_second']:7.1f} samples/s "
                f"(own figure {result['loop_samples_per_second']:.1f}; train call {result['train_call_s']:.1f}s, batch {result['batch_size']}, {result['precision']}, "
                f"{result['threads']} threads), holdout accuracy {result['holdout_accuracy']:.3f}",
                flush=True,
            )
    pairs = [a["samples_per_second"] / b["samples_per_second"] for a, b in zip(results["lsbert"], results["trainer"])]
    print("per-round lsbert/Trainer ratios: " + ", ".join(f"{ratio:.2f}" for ratio in pairs))
    best = {kind: max(rows, key=lambda r: r["samples_per_second"]) for kind, rows in results.items()}
    ours, theirs = best["lsbert"], best["trainer"]
    print(f"lsbert_train_samples_per_second={ours['samples_per_second']:.1f}")
    print(f"trainer_train_samples_per_second={theirs['samples_per_second']:.1f}")
    if "lsbert-b8" in best:
        same = best["lsbert-b8"]
        print(f"lsbert_batch8_train_samples_per_second={same['samples_per_second']:.1f}")
        print(f"lsbert_batch8_holdout_accuracy={same['holdout_accuracy']:.3f}")
        print(f"train_speedup_vs_trainer_same_batch={same['samples_per_second'] / theirs['samples_per_second']:.2f}")
    print(f"lsbert_holdout_accuracy={ours['holdout_accuracy']:.3f}")
    print(f"trainer_holdout_accuracy={theirs['holdout_accuracy']:.3f}")
    return ours["samples_per_second"] / theirs["samples_per_second"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000, help="training examples (one epoch)")
    parser.add_argument("--holdout", type=int, default=500, help="other examples to score both models on")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds; the best of each counts")
    parser.add_argument("--same-batch", action="store_true", help="also run lsbert at Trainer's batch size (8)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per worker")
    parser.add_argument("--no-loop", action="store_true", help="skip the Label Studio loop measurement")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if importlib.util.find_spec("accelerate") is None:
        # transformers' Trainer needs it; lsbert itself does not.
        print("bench/train.py: the Trainer baseline needs accelerate: pip install 'accelerate>=1.1'", file=sys.stderr)
        return 2
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args.examples, args.holdout)), flush=True)
        return 0
    print(
        f"bench/train.py: {args.examples} Rotten Tomatoes examples, 1 epoch, MiniLM-L6, {args.rounds} round(s); "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')}, cpus={os.cpu_count()}",
        flush=True,
    )
    speedup = measure_train_throughput(args)
    loop = None
    if not args.no_loop:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from loop import measure_loop

        result = measure_loop(annotations=500)
        loop = result["loop_seconds"]
        print(
            f"# loop: {result['annotations']} annotations, Start Training -> new version served "
            f"{result['new_version_seconds']:.1f}s -> held-out predictions stored {loop:.1f}s; "
            f"held-out accuracy {result['held_out_accuracy']:.3f}"
        )
    print(f"train_speedup_vs_trainer={speedup:.2f}")
    if loop is not None:
        print(f"loop_seconds={loop:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
