"""GPU benchmark: lsbert's predictor engine and training loop on BERT-base, against a plain transformers
``pipeline`` and ``transformers.Trainer`` measured in the same run. Prints one ``name=value`` line per figure.

    PYTHONPATH=src python bench/gpu.py                        # on a CUDA machine; ~3-5 minutes on an H200
    PYTHONPATH=src python bench/gpu.py --device cpu --smoke   # a tiny model on the CPU, in seconds

Needs only torch, transformers (with tokenizers) and numpy, plus accelerate for the Trainer baseline (skipped
with a note where it is missing); see bench/gpu-wheels.txt. Nothing is downloaded: the model is a randomly
initialised ``BertConfig()`` (BERT-base: 12 layers, 768 hidden, 110 M parameters; speed does not depend on
the weights) and the tokenizer a WordPiece vocabulary built here (30,522 entries, like BERT's).

Everything lsbert does is measured through its own code: ``SequenceClassifier.predict_proba`` (the
predictor's engine: tokenisation, batching, padding, copies, forward, softmax, results on the host) and
``lsbert.trainer.loop.fine_tune`` (the training Job's loop), with the precision ``select_runtime`` picks.

* ``inference_seq_per_s``: texts of exactly 128 tokens per second, tokenisation included, at the best of
  several batch sizes (token budgets of batch x 128); ``inference_mfu_pct`` from model FLOPs.
* ``inference_mix_*``: a realistic mix of lengths (1-12 review-sized snippets per text) at the defaults.
* ``latency_p50_ms`` / ``latency_p95_ms``: one 128-token text per call, calls one after another.
* ``train_samples_per_s``: fine-tuning steps on 128-token samples at the best of several batch sizes
  (the loop's own time: steps, not the one-time tokenisation), ``train_mfu_pct``; ``train_mix_*`` on the
  length mix truncated at 256 tokens (the TRAIN_MAX_LENGTH default).
* Baselines: ``pipeline_*`` (``pipeline("text-classification")``, same precision, same best batch) and
  ``trainer_*`` (``Trainer`` with the same batch, bf16 on CUDA, otherwise its defaults: all weights train,
  random batches padded by its default collator). Speed-ups compare whole calls (set-up included).
* ``inference_compiled_*`` (CUDA): the same engine with ``TORCH_COMPILE=true``, and the compile time.

FLOPs are model FLOPs: 2 per multiply-add of the encoder's matmuls, attention (QK^T and AV), pooler and
head, over real tokens (padding is not counted); embeddings are lookups. Training counts 3x the forward.
MFU divides by ``--peak-tflops`` (default on H100/H200: 790 TFLOP/s dense bf16, the planning figure; the
datasheet says 989).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402
import transformers  # noqa: E402

LABELS = ("negative", "positive")
SEQ = 128  # tokens per text of the fixed-length figures, [CLS] and [SEP] included
GOAL_INFERENCE_SEQ_PER_S = 17_000
GOAL_TRAIN_MFU_PCT = 30.0
PEAK_TFLOPS = {"H200": 790.0, "H100": 790.0}  # dense bf16, planning figure

T0 = time.perf_counter()


def emit(name: str, value) -> None:
    if isinstance(value, float):
        value = f"{value:.1f}" if abs(value) >= 100 else f"{value:.4g}"
    print(f"{name}={value}", flush=True)


def note(text: str) -> None:
    print(f"# {text}", flush=True)


# ------------------------------------------------------------------------------------- model and data


def build_vocab(size: int, seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    """(vocabulary, whole words, syllables): pseudo-words of 2-3 consonant-vowel syllables, each one token;
    words of 4 syllables are not in it and split into syllable pieces, as rare words do in BERT's."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = (
        list(".,;:!?'\"()-") + list("abcdefghijklmnopqrstuvwxyz") + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    )
    pieces += syllables + ["##" + s for s in syllables]
    words: list[str] = []
    seen = set(specials) | set(pieces)
    while len(specials) + len(pieces) + len(words) < size:
        word = "".join(rng.choice(syllables) for _ in range(rng.choice((2, 3, 3))))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return specials + pieces + words, words, syllables


def build_tokenizer(vocab: list[str]):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    ids = {token: i for i, token in enumerate(vocab)}
    tok = Tokenizer(models.WordPiece(vocab=ids, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )


def build_model_dir(root: Path, smoke: bool) -> tuple[Path, object, int]:
    """A BERT classifier with random weights and the built tokenizer, saved like a checkpoint."""
    from transformers import BertConfig, BertForSequenceClassification

    vocab, _, _ = build_vocab(30522)
    kwargs = (
        {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128} if smoke else {}
    )
    config = BertConfig(
        vocab_size=len(vocab),
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
        **kwargs,
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    path = root / ("bert-smoke" if smoke else "bert-base")
    model.save_pretrained(path)
    build_tokenizer(vocab).save_pretrained(path)
    return path, config, sum(p.numel() for p in model.parameters())


def fixed_texts(n: int, seed: int = 1) -> list[str]:
    """Texts of exactly SEQ tokens: SEQ - 2 in-vocabulary words."""
    _, words, _ = build_vocab(30522)
    rng = random.Random(seed)
    return [" ".join(rng.choices(words, k=SEQ - 2)) for _ in range(n)]


def mixed_texts(n: int, seed: int = 2) -> list[str]:
    """1-12 review-sized snippets per text (as bench/predict.py mixes them), ~22 words each, one word in ten
    rare (split into pieces), a full stop after each snippet."""
    _, words, syllables = build_vocab(30522)
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        snippets = []
        for _ in range(rng.choice((1, 1, 1, 2, 3, 5, 8, 12))):
            count = max(3, int(rng.gauss(22, 6)))
            snippet = [
                "".join(rng.choices(syllables, k=4)) if rng.random() < 0.1 else rng.choice(words) for _ in range(count)
            ]
            snippets.append(" ".join(snippet) + ".")
        texts.append(" ".join(snippets))
    return texts


def forward_flops(config, length: int) -> float:
    """Model FLOPs of one forward pass over a sequence of ``length`` tokens."""
    d, layers, ff = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    dense = 2 * layers * (4 * d * d + 2 * d * ff) * length
    attention = 2 * layers * 2 * length * length * d  # QK^T and AV
    head = 2 * d * d + 2 * d * config.num_labels  # pooler and classifier, once per sequence
    return dense + attention + head


def token_lengths(tokenizer, texts: list[str], max_length: int) -> list[int]:
    return [len(x) for x in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]


# --------------------------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_rate(call, n: int, reps: int) -> float:
    """Items per second of ``call()`` (which handles ``n`` items), best of ``reps`` timed calls."""
    best = float("inf")
    for _ in range(reps):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return n / best


def latencies_ms(call, count: int) -> tuple[float, float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        times.append(1000 * (time.perf_counter() - started))
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(round(0.95 * (len(times) - 1))))]


# ------------------------------------------------------------------------------------------ inference


def bench_engine(model_dir: Path, runtime, plan: dict, texts: list[str], mix: list[str], config, peak) -> dict:
    from lsbert.model.engine import SequenceClassifier

    clf = SequenceClassifier(model_dir, runtime)
    clf.warm_up()
    encoder = clf.encoder
    default_batch, default_budget = encoder.batch_size, encoder.token_budget
    emit("attention", getattr(encoder.model.config, "_attn_implementation", "unknown"))
    emit("serving_dtype", str(next(encoder.model.parameters()).dtype).replace("torch.", ""))
    flops_seq = forward_flops(config, SEQ)
    rates = {}
    for batch in plan["batches"]:
        encoder.batch_size, encoder.token_budget = batch, batch * SEQ
        clf.predict_proba(texts[: min(len(texts), batch * 4)])  # warm this shape
        rates[batch] = best_rate(lambda: clf.predict_proba(texts), len(texts), plan["reps"])
        emit(f"inference_seq_per_s_batch{batch}", rates[batch])
    best = max(rates, key=rates.get)
    emit("inference_best_batch", best)
    emit("inference_seq_per_s", rates[best])
    emit("inference_tflops", rates[best] * flops_seq / 1e12)
    if peak:
        emit("inference_mfu_pct", 100 * rates[best] * flops_seq / (peak * 1e12))

    encoder.batch_size, encoder.token_budget = best, best * SEQ
    p50, p95 = latencies_ms(lambda: clf.predict_proba(texts[:1]), plan["latency_calls"])
    emit("latency_p50_ms", p50)
    emit("latency_p95_ms", p95)

    encoder.batch_size, encoder.token_budget = default_batch, default_budget
    lengths = token_lengths(encoder.tokenizer, mix, encoder.max_length)
    clf.predict_proba(mix[: len(mix) // 4])
    mix_rate = best_rate(lambda: clf.predict_proba(mix), len(mix), plan["reps"])
    mix_flops = sum(forward_flops(config, n) for n in lengths) / len(lengths)
    emit("inference_mix_mean_tokens", sum(lengths) / len(lengths))
    emit("inference_mix_seq_per_s", mix_rate)
    emit("inference_mix_tokens_per_s", mix_rate * sum(lengths) / len(lengths))
    if peak:
        emit("inference_mix_mfu_pct", 100 * mix_rate * mix_flops / (peak * 1e12))
    clf.release()
    return {"best_batch": best, "seq_per_s": rates[best], "mix_seq_per_s": mix_rate}


def bench_pipeline(model_dir: Path, runtime, plan: dict, texts: list[str], mix: list[str], batch: int) -> dict:
    from transformers import pipeline

    device = runtime.device
    dtype = runtime.autocast_dtype if device.type == "cuda" else None  # the engine serves in it
    clf = pipeline(
        "text-classification", model=str(model_dir), tokenizer=str(model_dir), device=device, dtype=dtype, top_k=None
    )
    n = plan["baseline_texts"]
    clf(texts[: min(n, batch * 2)], batch_size=batch, truncation=True)
    rate = best_rate(lambda: clf(texts[:n], batch_size=batch, truncation=True), n, plan["reps"])
    emit("pipeline_batch", batch)
    emit("pipeline_dtype", str(dtype or torch.float32).replace("torch.", ""))
    emit("pipeline_seq_per_s", rate)
    mix_rate = best_rate(lambda: clf(mix[:n], batch_size=batch, truncation=True), n, plan["reps"])
    emit("pipeline_mix_seq_per_s", mix_rate)
    p50, _ = latencies_ms(lambda: clf(texts[:1], truncation=True), plan["latency_calls"])
    emit("pipeline_latency_p50_ms", p50)
    return {"seq_per_s": rate, "mix_seq_per_s": mix_rate, "latency_p50_ms": p50}


def bench_compiled(
    model_dir: Path, precision: str, device: str, plan: dict, texts: list[str], batch: int, config, peak
) -> None:
    from lsbert.model.engine import SequenceClassifier
    from lsbert.model.runtime import select_runtime

    runtime = select_runtime(precision, device=device, torch_compile=True)
    started = time.perf_counter()
    clf = SequenceClassifier(model_dir, runtime)
    clf.encoder.batch_size, clf.encoder.token_budget = batch, batch * SEQ
    clf.warm_up()
    clf.predict_proba(texts[: batch * 2])
    emit("inference_compile_s", time.perf_counter() - started)
    rate = best_rate(lambda: clf.predict_proba(texts), len(texts), plan["reps"])
    emit("inference_compiled_seq_per_s", rate)
    if peak:
        emit("inference_compiled_mfu_pct", 100 * rate * forward_flops(config, SEQ) / (peak * 1e12))
    p50, _ = latencies_ms(lambda: clf.predict_proba(texts[:1]), plan["latency_calls"])
    emit("latency_compiled_p50_ms", p50)
    clf.release()


# ------------------------------------------------------------------------------------------- training


def bench_fine_tune(model_dir: Path, runtime, plan: dict, texts: list[str], mix: list[str], config, peak) -> dict:
    from lsbert.trainer.dataset import Example
    from lsbert.trainer.loop import Hyperparameters, fine_tune, load_for_training

    rng = random.Random(3)
    model, tokenizer = load_for_training(model_dir, LABELS, False, seed=0)

    def examples(source: list[str]) -> list[Example]:
        return [Example(text, (rng.choice(LABELS),), i) for i, text in enumerate(source)]

    def run(batch: int, data: list[Example], max_length: int):
        hp = Hyperparameters(
            learning_rate=5e-5, num_train_epochs=1, weight_decay=0.01, batch_size=batch, max_length=max_length, seed=0
        )
        started = time.perf_counter()
        result = fine_tune(model, tokenizer, data, LABELS, False, hp, runtime, progress=lambda _line: None)
        return result, time.perf_counter() - started

    fixed = examples(texts[: plan["train_samples"]])
    flops_sample = 3 * forward_flops(config, SEQ)
    rates, calls = {}, {}
    for batch in plan["train_batches"]:
        run(batch, fixed[: batch * plan["warm_steps"]], SEQ)  # warm-up: kernels, allocator, optimizer state
        result, wall = run(batch, fixed, SEQ)
        rates[batch] = result.samples_per_second
        calls[batch] = result.samples / wall
        emit(f"train_samples_per_s_batch{batch}", rates[batch])
    best = max(rates, key=rates.get)
    emit("train_batch", best)
    emit("train_samples_per_s", rates[best])
    emit("train_call_samples_per_s", calls[best])
    emit("train_tflops", rates[best] * flops_sample / 1e12)
    if peak:
        emit("train_mfu_pct", 100 * rates[best] * flops_sample / (peak * 1e12))

    mix_data = examples(mix[: plan["train_samples"]])
    lengths = token_lengths(tokenizer, [e.text for e in mix_data], 256)
    result, _ = run(best, mix_data, 256)
    mix_flops = 3 * sum(forward_flops(config, n) for n in lengths) / len(lengths)
    emit("train_mix_mean_tokens", sum(lengths) / len(lengths))
    emit("train_mix_samples_per_s", result.samples_per_second)
    if peak:
        emit("train_mix_mfu_pct", 100 * result.samples_per_second * mix_flops / (peak * 1e12))
    return {"batch": best, "samples_per_s": rates[best], "call_samples_per_s": calls[best]}


def bench_trainer(model_dir: Path, runtime, plan: dict, texts: list[str], batch: int, config, peak) -> dict | None:
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        note("trainer baseline skipped: transformers.Trainer needs accelerate (see bench/gpu-wheels.txt)")
        return None
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    on_cuda = runtime.device.type == "cuda"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    rng = random.Random(3)
    n = plan["train_samples"]
    encoded = tokenizer(texts[:n], truncation=True, max_length=SEQ)
    dataset = [
        {"input_ids": ids, "attention_mask": mask, "labels": rng.randrange(len(LABELS))}
        for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"], strict=True)
    ]

    def train(data: list[dict], out: str) -> float:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=batch,
            num_train_epochs=1,
            learning_rate=5e-5,
            weight_decay=0.01,
            bf16=on_cuda and runtime.autocast_dtype == torch.bfloat16,
            fp16=on_cuda and runtime.autocast_dtype == torch.float16,
            use_cpu=not on_cuda,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            seed=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)  # its summary dict is not a name=value line
        started = time.perf_counter()
        trainer.train()
        sync(runtime.device)
        return time.perf_counter() - started

    with tempfile.TemporaryDirectory(prefix="lsbert-bench-trainer-") as out:
        train(dataset[: batch * plan["warm_steps"]], out)
        wall = train(dataset, out)
    rate = n / wall
    emit("trainer_samples_per_s", rate)
    if peak:
        emit("trainer_mfu_pct", 100 * rate * 3 * forward_flops(config, SEQ) / (peak * 1e12))
    return {"samples_per_s": rate}


# ----------------------------------------------------------------------------------------------- main


PLANS = {
    # on a GPU: ~32k sequences per inference figure, 8k samples per training figure
    "full": {
        "batches": (64, 128, 256, 512, 1024),
        "texts": 16384,
        "mix": 16384,
        "reps": 2,
        "latency_calls": 100,
        "baseline_texts": 4096,
        "train_batches": (32, 64, 128, 256),
        "train_samples": 8192,
        "warm_steps": 5,
    },
    "smoke": {
        "batches": (8, 32),
        "texts": 64,
        "mix": 64,
        "reps": 1,
        "latency_calls": 3,
        "baseline_texts": 32,
        "train_batches": (8,),
        "train_samples": 32,
        "warm_steps": 1,
    },
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model and sizes: checks the script, measures nothing"
    )
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known GPUs)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile figures (CUDA)")
    parser.add_argument("--skip-baselines", action="store_true", help="only lsbert's own figures")
    parser.add_argument("--budget-s", type=float, default=480, help="skip the compile figures past this minus 150 s")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging

    from lsbert.model.runtime import select_runtime

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    plan = PLANS["smoke" if args.smoke else "full"]
    runtime = select_runtime(args.precision, device=args.device)
    device = runtime.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name and device.type == "cuda"), None)
    emit("device", device.type)
    emit("device_name", name.replace(" ", "_"))
    emit("torch", torch.__version__)
    emit("transformers", transformers.__version__)
    emit("python", platform.python_version())
    emit("precision", runtime.precision)
    if peak:
        emit("peak_tflops", peak)
    else:
        note("no --peak-tflops for this device: no MFU figures")

    with tempfile.TemporaryDirectory(prefix="lsbert-bench-gpu-") as tmp:
        model_dir, config, params = build_model_dir(Path(tmp), args.smoke)
        emit("model", "bert-smoke" if args.smoke else "bert-base")
        emit("model_params_m", params / 1e6)
        emit("forward_gflop_per_seq128", forward_flops(config, SEQ) / 1e9)
        texts = fixed_texts(plan["texts"])
        mix = mixed_texts(plan["mix"])

        ours = bench_engine(model_dir, runtime, plan, texts, mix, config, peak)
        train = bench_fine_tune(model_dir, runtime, plan, texts, mix, config, peak)
        if not args.skip_baselines:
            base = bench_pipeline(model_dir, runtime, plan, texts, mix, ours["best_batch"])
            emit("inference_speedup_vs_pipeline", ours["seq_per_s"] / base["seq_per_s"])
            emit("inference_mix_speedup_vs_pipeline", ours["mix_seq_per_s"] / base["mix_seq_per_s"])
            trainer = bench_trainer(model_dir, runtime, plan, texts, train["batch"], config, peak)
            if trainer:
                emit("train_speedup_vs_trainer", train["call_samples_per_s"] / trainer["samples_per_s"])
        if device.type == "cuda":
            emit("goal_inference_met", "yes" if ours["seq_per_s"] >= GOAL_INFERENCE_SEQ_PER_S else "no")
            if peak:
                mfu = 100 * train["samples_per_s"] * 3 * forward_flops(config, SEQ) / (peak * 1e12)
                emit("goal_train_mfu_met", "yes" if mfu >= GOAL_TRAIN_MFU_PCT else "no")
        if device.type == "cuda" and not args.no_compile:
            if time.perf_counter() - T0 > args.budget_s - 150:
                note("torch.compile figures skipped: not enough of --budget-s left")
            else:
                try:
                    bench_compiled(
                        model_dir, args.precision, args.device, plan, texts, ours["best_batch"], config, peak
                    )
                except Exception as exc:  # a compiler failure must not cost the figures above
                    emit("inference_compiled_error", type(exc).__name__)
                    note(f"torch.compile failed: {str(exc).splitlines()[0] if str(exc) else exc!r}")
    emit("total_s", time.perf_counter() - T0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
