"""``lsbert train``: fine-tune one project's classifier from its annotations, as a subprocess or a Job.

Phases, in order: reserve a version, download the labelled tasks and the labelling config, build the data
set and split it, fine-tune (from the base model, or from the promoted checkpoint when the labels are
unchanged), evaluate the new model and the serving one on the same validation examples, save the version
(lsbert.json written last by the store), then promote it if it passed the gate, then prune old versions.

The pointer is the only thing serving reads, and it is written at the very end: a run that crashes or is
killed at any earlier point leaves the previous version serving. Progress goes to stdout (one line per
event, flushed, for ``kubectl logs -f``); failures end with a one-line message on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from lsbert.labelconfig import ClassificationSpec, LabelConfigError, parse_label_config
from lsbert.settings import Settings, SettingsError, load_settings
from lsbert.store import CheckpointStore, StoreError, open_store
from lsbert.store.base import check_version, utc_now

log = logging.getLogger("lsbert.trainer")

METADATA_FORMAT = 1
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TERMINATED = 143


class TrainingError(RuntimeError):
    """The run cannot go on; the message tells the user what to fix."""


class NoTrainingData(TrainingError):
    pass


class Terminated(BaseException):
    """SIGTERM (Job deleted, pod evicted): unwinds like KeyboardInterrupt so temp dirs are removed."""


# --------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lsbert train",
        description="Fine-tune a Label Studio project's text classifier from its annotations and store it "
        "as a new checkpoint version; promote it if it scores at least as well as the serving model.",
    )
    parser.add_argument("--project", type=int, required=True, help="Label Studio project id")
    parser.add_argument("--version", help="version id reserved by the launcher (default: reserve the next one)")
    parser.add_argument("--export-file", metavar="PATH", help="Label Studio JSON export to train on instead of the API")
    parser.add_argument(
        "--label-config", metavar="XML|@FILE", help="labelling config (default: the export file's, else the project's)"
    )
    over = parser.add_argument_group("overrides (default: the environment, see Settings)")
    over.add_argument("--model-dir", help="checkpoint store: a directory or s3://bucket/prefix (MODEL_DIR)")
    over.add_argument("--baseline-model", help="model id or directory to fine-tune from (BASELINE_MODEL_NAME)")
    over.add_argument("--epochs", type=float, help="NUM_TRAIN_EPOCHS (fractions allowed)")
    over.add_argument("--learning-rate", "--lr", type=float, dest="learning_rate", help="LEARNING_RATE")
    over.add_argument("--weight-decay", type=float, help="WEIGHT_DECAY")
    over.add_argument("--batch-size", type=int, help="TRAIN_BATCH_SIZE")
    over.add_argument("--max-length", type=int, help="TRAIN_MAX_LENGTH (tokens; longer texts are truncated)")
    over.add_argument("--seed", type=int, help="SEED")
    over.add_argument("--validation-fraction", type=float, help="VALIDATION_FRACTION")
    over.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], help="PRECISION")
    over.add_argument("--threads", type=int, help="TORCH_THREADS (0 = every core the container may use)")
    over.add_argument(
        "--train-embeddings",
        action="store_true",
        help="also fine-tune the input word embeddings (slower; frozen by default, see trainer/loop.py)",
    )
    parser.add_argument(
        "--no-promote", action="store_true", help="save and evaluate the version but leave the promoted one serving"
    )
    return parser


_OVERRIDES = {
    "model_dir": "model_dir",
    "baseline_model": "baseline_model_name",
    "epochs": "num_train_epochs",
    "learning_rate": "learning_rate",
    "weight_decay": "weight_decay",
    "batch_size": "train_batch_size",
    "max_length": "train_max_length",
    "seed": "seed",
    "validation_fraction": "validation_fraction",
    "precision": "precision",
    "threads": "torch_threads",
}


def settings_for(args: argparse.Namespace) -> Settings:
    """Settings from the environment with the command line's overrides (validated alike)."""
    overrides = {field: getattr(args, arg) for arg, field in _OVERRIDES.items() if getattr(args, arg) is not None}
    return load_settings(**overrides)


# -------------------------------------------------------------------------------------- reporting


class Progress:
    """Progress lines on stdout, flushed at once, each with the time since the run started."""

    def __init__(self, stream=None):
        self.stream = stream
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        stream = self.stream or sys.stdout
        print(f"[{time.perf_counter() - self.start:7.1f}s] {message}", file=stream, flush=True)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in counts.items()) or "none"


def _configure_logging(level: str) -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("lsbert").setLevel(level)
    # transformers' load reports and progress bars are noise in a Job log unless debugging.
    from transformers.utils import logging as hf_logging

    if level == "DEBUG":
        hf_logging.set_verbosity_info()
    else:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    for noisy in ("httpx", "httpcore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


# ------------------------------------------------------------------------------ pure decisions


@dataclass(frozen=True)
class StartPoint:
    """What a run fine-tunes from: the base model, or the promoted checkpoint (``parent_version``)."""

    parent_version: Optional[str]
    labels: tuple[str, ...]  # id2label order of the new model
    reason: str


def start_point(
    spec: ClassificationSpec,
    base_model: str,
    promoted: Optional[str],
    promoted_metadata: Optional[dict[str, Any]],
) -> StartPoint:
    """Continue from the promoted checkpoint iff it classifies the same labels (in any order), equally
    single- or multi-label, and was itself fine-tuned from the same base model. The new model keeps the
    parent's label order, so its head is reused as is."""
    fresh = tuple(spec.labels)
    if promoted is None:
        return StartPoint(None, fresh, "no promoted checkpoint yet")
    meta = promoted_metadata or {}
    parent_labels = meta.get("labels")
    if not isinstance(parent_labels, list) or set(parent_labels) != set(fresh) or len(parent_labels) != len(fresh):
        return StartPoint(None, fresh, f"the labels changed since {promoted}")
    if bool(meta.get("multi_label")) != spec.multi_label:
        return StartPoint(None, fresh, f"single/multi-label changed since {promoted}")
    if meta.get("base_model") != base_model:
        return StartPoint(None, fresh, f"{promoted} was fine-tuned from another base model ({meta.get('base_model')})")
    return StartPoint(promoted, tuple(parent_labels), f"continuing from {promoted}")


# ------------------------------------------------------------------------------------------- run


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    def handler(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _secret(value) -> Optional[str]:
    return value.get_secret_value() if value is not None else None


def _load_data(args, settings: Settings, progress: Progress) -> tuple[list[Any], str]:
    from lsbert.trainer.source import DataSourceError, LabelStudioSource, read_export_file, read_label_config

    config = read_label_config(args.label_config) if args.label_config else None
    api: Optional[LabelStudioSource] = None
    api_key = _secret(settings.label_studio_api_key)
    if settings.label_studio_url and api_key:
        api = LabelStudioSource(settings.label_studio_url, api_key)

    if args.export_file:
        tasks, file_config = read_export_file(args.export_file)
        progress(f"download: read {len(tasks)} tasks from {args.export_file}")
        config = config or file_config
    else:
        if api is None:
            raise DataSourceError(
                "set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY to download the project's annotations, "
                "or pass --export-file"
            )
        progress(f"download: labelled tasks of project {args.project} from {settings.label_studio_url}")
        tasks = api.labelled_tasks(args.project)
        progress(f"download: {len(tasks)} tasks with annotations")
    if config is None:
        if api is None:
            raise DataSourceError(
                "no labelling config: pass --label-config, or set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY"
            )
        config = api.label_config(args.project)
    return tasks, config


def _reserve_version(args, settings: Settings, store: CheckpointStore) -> str:
    if not args.version:
        return store.next_version(args.project, settings.finetuned_model_name)
    version = check_version(args.version)
    if any(info.version == version for info in store.versions(args.project)):
        raise TrainingError(f"version {version} of project {args.project} already exists in {settings.model_dir}")
    return version


def staging_root(cache_dir: str) -> Path:
    """Where ``save_pretrained`` writes before the store takes the files: under CACHE_DIR, never /tmp.

    A model is as large as its weights (0.7 GB for BERT-base, several GB for large baselines); in a pod /tmp
    is a small emptyDir and a large save there gets the trainer evicted, while the cache volume is sized for
    models."""
    root = Path(cache_dir) / "staging"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _publish(
    store: CheckpointStore,
    project: int,
    version: str,
    model,
    tokenizer,
    metadata: dict[str, Any],
    keep: int,
    progress: Progress,
    staging: Optional[Path] = None,
) -> None:
    """Save the version (lsbert.json last), then move the pointer if promoted, then prune."""
    promotion = metadata["promotion"]
    with tempfile.TemporaryDirectory(prefix=f"lsbert-train-{project}-", dir=staging) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        store.save(project, version, Path(tmp), metadata)
    progress(f"save: version {version} saved")
    progress(f"promotion: {'PROMOTED' if promotion['promoted'] else 'not promoted'}: {promotion['reason']}")
    if promotion["promoted"]:
        try:
            store.promote(project, version)
        except Exception as exc:
            failed = {**promotion, "promoted": False, "reason": f"promotion failed: {exc}"}
            try:
                store.update_metadata(project, version, {"promotion": failed})
            except Exception:  # best effort; the failure below is what the user needs to see
                log.debug("could not record the failed promotion", exc_info=True)
            raise
        progress(f"promotion: project {project} now serves {version}")
    try:
        pruned = store.prune(project, keep)
        if pruned:
            progress(f"prune: removed {', '.join(pruned)} (keeping {keep})")
    except StoreError as exc:  # housekeeping; the version is saved and the decision applied
        log.warning("pruning old versions of project %s failed: %s", project, exc)


def run(args: argparse.Namespace, settings: Settings, progress: Progress) -> dict[str, Any]:
    """One training run; returns the version's metadata. Raises on failure (the pointer untouched).

    torch and transformers (~650 MB of RSS, several seconds) are loaded only once the data is in hand: a run
    that cannot read its annotations (Label Studio down, a wrong key, no labels yet) fails in about a second
    at a tenth of that memory, whatever the number of projects asking at once."""
    from lsbert.gpu import check_cuda
    from lsbert.trainer.dataset import build_examples, label_counts, split_examples

    t0 = time.perf_counter()
    project = args.project
    check_cuda(settings.require_cuda, "training")  # before anything is downloaded or reserved
    store: CheckpointStore = open_store(settings.model_dir, settings.cache_dir)
    version = _reserve_version(args, settings, store)
    progress(f"project {project}: training version {version} into {store.root}")

    # --- data -----------------------------------------------------------------------------------
    tasks, config = _load_data(args, settings, progress)
    spec = parse_label_config(config)
    examples, report = build_examples(tasks, spec)
    download_s = time.perf_counter() - t0
    progress(
        f'data: {report.tasks} tasks -> {report.examples} examples for <Choices name="{spec.from_name}"> on '
        f"${spec.data_key} ({'multi' if spec.multi_label else 'single'}-label, {len(spec.labels)} labels)"
    )
    progress(f"data: label counts: {_counts(report.label_counts)}")
    progress(f"data: skipped tasks: {_counts(report.skipped)}")
    if not examples:
        raise NoTrainingData(
            f'project {project} has no usable annotated tasks for <Choices name="{spec.from_name}"> '
            f"(skipped: {_counts(report.skipped)})"
        )
    train, validation = split_examples(examples, settings.validation_fraction, settings.seed)
    progress(f"data: split {len(train)} train / {len(validation)} validation (seed {settings.seed})")

    # --- model ------------------------------------------------------------------------------------
    import torch

    from lsbert.model.runtime import select_runtime
    from lsbert.modelsource import resolve
    from lsbert.trainer.evaluation import evaluate, promotion_record
    from lsbert.trainer.loop import Hyperparameters, available_cores, fine_tune, load_for_training
    from lsbert.trainer.promotion import decide

    base_model = settings.baseline_model_name
    token = _secret(settings.hf_token)
    serving_version = store.promoted(project)
    serving_meta = None
    if serving_version is not None:
        try:
            serving_meta = store.metadata(project, serving_version)
        except StoreError as exc:
            log.warning("cannot read the metadata of promoted version %s: %s", serving_version, exc)
    start = start_point(spec, base_model, serving_version, serving_meta)
    progress(f"model: {start.reason}; base model {base_model}")
    threads = settings.torch_threads or available_cores()
    torch.set_num_threads(threads)
    runtime = select_runtime(settings.precision, threads)
    hp = Hyperparameters(
        learning_rate=settings.learning_rate,
        num_train_epochs=settings.num_train_epochs,
        weight_decay=settings.weight_decay,
        batch_size=settings.train_batch_size,
        max_length=settings.train_max_length,
        seed=settings.seed,
        train_embeddings=args.train_embeddings,
    )
    t_train = time.perf_counter()
    if start.parent_version is not None:
        source = store.local_path(project, start.parent_version)
        model, tokenizer = load_for_training(source, start.labels, spec.multi_label, new_head=False, seed=hp.seed)
    else:
        model, tokenizer = load_for_training(
            resolve(base_model), start.labels, spec.multi_label, token=token, seed=hp.seed
        )
    result = fine_tune(model, tokenizer, train, start.labels, spec.multi_label, hp, runtime, progress)
    train_s = time.perf_counter() - t_train
    progress(
        f"train: {result.steps} steps, {result.samples} samples in {result.seconds:.1f}s "
        f"({result.samples_per_second:.1f} samples/s), last epoch's loss {result.final_loss:.4f}"
    )

    # --- evaluate and decide ------------------------------------------------------------------------
    ctx = {
        "store": store,
        "project": project,
        "serving_version": serving_version,
        "spec": spec,
        "labels": start.labels,
        "runtime": runtime,
        "max_length": result.max_length,
        "base_model": base_model,
        "token": token,
        "threshold": settings.multi_label_threshold,
    }
    evaluation = evaluate(ctx, model, tokenizer, validation, progress)
    decision = decide(evaluation.score, evaluation.serving_score, settings.promotion_margin, len(validation))
    promotion = promotion_record(
        decision, args.no_promote, serving_version, store.promoted(project), evaluation.serving
    )

    metadata = {
        "format": METADATA_FORMAT,
        "project": project,
        "version": version,
        "labels": list(start.labels),
        "multi_label": spec.multi_label,
        "from_name": spec.from_name,
        "to_name": spec.to_name,
        "data_key": spec.data_key,
        "base_model": base_model,
        "parent_version": start.parent_version,
        "hyperparameters": {
            **hp.as_dict(),
            "max_length": result.max_length,
            "steps": result.steps,
            "precision": runtime.precision,
            "device": runtime.device.type,
            "threads": threads,
            "validation_fraction": settings.validation_fraction,
        },
        "data": {
            "tasks": report.tasks,
            "examples": report.examples,
            "train": len(train),
            "validation": len(validation),
            "label_counts": report.label_counts,
            "train_label_counts": label_counts(train, spec.labels),
            "validation_label_counts": label_counts(validation, spec.labels),
            "skipped": report.skipped,
        },
        "metrics": {**evaluation.metrics, "train_loss": result.final_loss},
        "baseline_metrics": evaluation.serving_metrics,
        "promotion": promotion,
        "timings": {
            "download_s": round(download_s, 2),
            "train_s": round(train_s, 2),
            "eval_s": round(evaluation.seconds, 2),
            "total_s": round(time.perf_counter() - t0, 2),
        },
        "created_at": utc_now(),
        "train_samples_per_second": round(result.samples_per_second, 2),
    }

    # --- save, promote, prune ----------------------------------------------------------------------
    _publish(
        store,
        project,
        version,
        model,
        tokenizer,
        metadata,
        settings.keep_versions,
        progress,
        staging_root(settings.cache_dir),
    )
    progress(f"done in {time.perf_counter() - t0:.1f}s")
    return metadata


def _prefer_sleeping_openmp_threads() -> None:
    """OMP_WAIT_POLICY=PASSIVE unless set: spinning OpenMP threads made training 4-6x slower on a shared or
    CPU-limited node (measured on 2 cores under load), sleeping ones cost ~20% on an idle one. libgomp reads
    it once, when torch is loaded, so this only helps a process that has not imported torch yet."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``lsbert train``; returns the process exit code."""
    _prefer_sleeping_openmp_threads()
    try:
        args = build_parser().parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return int(exc.code or 0)
    try:
        settings = settings_for(args)
    except SettingsError as exc:
        print(f"lsbert train: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    _configure_logging(settings.log_level)
    progress = Progress()
    try:
        with _sigterm_unwinds():
            run(args, settings, progress)
    except Terminated:
        print("lsbert train: terminated (SIGTERM) before the run completed", file=sys.stderr, flush=True)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print("lsbert train: interrupted before the run completed", file=sys.stderr, flush=True)
        return 130
    except Exception as exc:
        log.debug("training run failed", exc_info=True)
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        quiet = (
            isinstance(exc, (TrainingError, LabelConfigError))
            or _is_data_error(exc)
            or type(exc).__name__ == "CudaUnavailable"
        )
        kind = "" if quiet else f"{type(exc).__name__}: "
        print(f"lsbert train: error: {kind}{message or type(exc).__name__}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    return EXIT_OK


def _is_data_error(exc: Exception) -> bool:
    from lsbert.trainer.source import DataSourceError

    return isinstance(exc, (DataSourceError, StoreError))


if __name__ == "__main__":
    sys.exit(main())
