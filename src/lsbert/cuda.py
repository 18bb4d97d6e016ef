"""CUDA-only fast paths, shared by the predictor engine and the training loop.

The predictor engine and the training loop take these paths only on CUDA devices, so CPU results and speed
are those of their plain code paths. (The host-side logic also runs on a CPU device, which is how the tests
check it.) What a GPU needs that a CPU does not:

* batches cut by padded tokens, not by texts: a GPU is only busy with tens of thousands of tokens per
  forward pass, whatever the texts' lengths;
* host work overlapped with device work: the next chunk of texts is tokenised in a thread while the device
  runs the current one; padding is vectorised into pinned host memory and copied without blocking; the
  host waits for the device only when it is ``MAX_IN_FLIGHT`` batches ahead, or for the results;
* no host sync inside a step: no ``.item()``, and no attention mask where a batch has no padding (given a
  mask, transformers checks on the host whether it masks anything, and SDPA cannot use its flash kernel);
* scaled-dot-product attention, and weights stored in the serving dtype (bf16/fp16) rather than cast by
  autocast on every batch;
* ``torch.compile`` for serving only, behind ``TORCH_COMPILE``: a server amortises the compilation, a
  fine-tune of a few thousand examples (seconds of GPU time) never would.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

# Padded tokens per forward pass: 512 sequences of 128 tokens. BERT-base's activations for that many
# tokens in bf16 are a few hundred MB; smaller batches leave an H100/H200 waiting on kernel launches.
TOKEN_BUDGET = 65536
# Texts tokenised per step of the pipeline: large enough for the tokenizer's own thread pool, small enough
# that the device starts soon.
TOKENIZE_CHUNK = 8192
# Batches queued on the device before the host waits: bounds the pinned memory held by a huge request.
MAX_IN_FLIGHT = 4


def is_cuda(device: torch.device) -> bool:
    """Whether the engine and the loop take the paths of this module (the helpers below decide pinning and
    waiting from the device itself, so the tests can route CPU work through them)."""
    return device.type == "cuda"


def prefer_sdpa(model: torch.nn.Module) -> None:
    """Switch a model loaded with eager attention to SDPA where its architecture supports it."""
    config = getattr(model, "config", None)
    set_attn_implementation = getattr(model, "set_attn_implementation", None)
    if getattr(config, "_attn_implementation", None) != "eager" or set_attn_implementation is None:
        return
    try:
        set_attn_implementation("sdpa")
    except (ValueError, ImportError) as exc:  # the architecture has no SDPA path
        log.info("keeping eager attention: %s", exc)


def prepare_for_serving(model: torch.nn.Module, dtype: Optional[torch.dtype], compile_model: bool) -> torch.nn.Module:
    """An eval-mode model on the GPU made ready to serve: SDPA, weights in ``dtype``, optionally compiled."""
    prefer_sdpa(model)
    if dtype is not None:
        model.to(dtype)
    if compile_model:
        # Dynamic shapes: batch sizes and padded lengths vary from call to call.
        model.compile(dynamic=True)
    return model


def batches_by_tokens(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Index batches, longest texts first, each at most ``budget`` padded tokens (at least one text)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        # Sorted longest first: a batch's first text sets its padded width.
        if current and lengths[current[0]] * (len(current) + 1) > budget:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def pad_rows(
    rows: Sequence[Sequence[int]], pad_id: int, width: int, left: bool = False, pin: bool = True
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(input_ids, attention_mask) padded to ``width``; the mask is None when no row is padded. ``pin``:
    in pinned host memory, so that ``.to(cuda, non_blocking=True)`` is a real asynchronous copy."""
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long, pin_memory=pin)
    if int(lengths.min()) == width:
        input_ids.numpy()[:] = np.array(rows, dtype=np.int64)
        return input_ids, None
    positions = np.arange(width)
    keep = (positions[::-1] < lengths[:, None]) if left else (positions < lengths[:, None])
    flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum()))
    input_ids.numpy()[keep] = flat
    mask = torch.empty((len(rows), width), dtype=torch.long, pin_memory=pin)
    mask.numpy()[:] = keep
    return input_ids, mask


def run_pipelined(
    tokenize: Callable[[Sequence[str]], list[list[int]]],
    texts: Sequence[str],
    forward: Callable[[dict], torch.Tensor],
    device: torch.device,
    autocast_dtype: Optional[torch.dtype],
    pad_id: int,
    left_padding: bool = False,
    token_budget: int = TOKEN_BUDGET,
) -> np.ndarray:
    """``forward``'s output rows for ``texts``, in order; tokenisation of chunk k+1 overlaps the device's
    work on chunk k. Call under ``torch.inference_mode()`` with the model's lock held."""
    on_cuda = device.type == "cuda"
    starts = list(range(0, len(texts), TOKENIZE_CHUNK))

    def chunk(k: int) -> Sequence[str]:
        return texts[starts[k] : starts[k] + TOKENIZE_CHUNK]

    # One request of one chunk (the usual case) is tokenised inline: no thread to start, nothing to overlap.
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lsbert-tokenize") if len(starts) > 1 else None
    try:
        future = pool.submit(tokenize, chunk(0)) if pool is not None else None
        results: list[tuple[np.ndarray, torch.Tensor]] = []
        in_flight: deque = deque()
        for k, start in enumerate(starts):
            if future is None:
                ids = tokenize(chunk(k))
            else:
                ids = future.result()
                future = pool.submit(tokenize, chunk(k + 1)) if pool is not None and k + 1 < len(starts) else None
            lengths = [len(x) for x in ids]
            for batch in batches_by_tokens(lengths, token_budget):
                input_ids, mask = pad_rows([ids[i] for i in batch], pad_id, lengths[batch[0]], left_padding, on_cuda)
                inputs = {
                    "input_ids": input_ids.to(device, non_blocking=True),
                    "attention_mask": None if mask is None else mask.to(device, non_blocking=True),
                }
                if autocast_dtype is not None:
                    with torch.autocast(device.type, dtype=autocast_dtype):
                        rows = forward(inputs)
                else:
                    rows = forward(inputs)
                if on_cuda:
                    host = torch.empty(rows.shape, dtype=torch.float32, pin_memory=True)
                    host.copy_(rows.float(), non_blocking=True)
                    done = torch.cuda.Event()
                    done.record()
                    in_flight.append(done)
                    if len(in_flight) > MAX_IN_FLIGHT:
                        in_flight.popleft().synchronize()
                else:
                    host = rows.float()
                results.append((start + np.asarray(batch, dtype=np.int64), host))
        synchronize(device)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    out = np.zeros((len(texts), results[0][1].shape[1]), dtype=np.float32)
    for index, host in results:
        out[index] = host.numpy()
    return out


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """An asynchronous host-to-device copy (through pinned memory) to a CUDA device."""
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
