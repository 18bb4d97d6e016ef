"""Where and in which precision forward (and backward) passes run: CUDA or CPU, fp32, bf16 or fp16 autocast."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any, Optional

import torch

from lsbert import cuda


@dataclass(frozen=True)
class Runtime:
    """Where and how forward passes run."""

    device: torch.device
    autocast_dtype: Optional[torch.dtype]  # None = plain fp32
    compile: bool = False  # torch.compile served models (CUDA only)

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast_dtype]

    def autocast(self) -> Any:
        """The autocast context for this runtime (a disabled one for fp32)."""
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def cpu_supports_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # older torch builds without the op
        return False


def select_runtime(
    precision: Any = "auto", threads: int = 0, device: Optional[str] = None, torch_compile: bool = False
) -> Runtime:
    """The GPU if there is one (or ``device``), and the fastest precision it does natively.

    ``precision`` is ``auto``, ``fp32``, ``bf16`` or ``fp16`` (or the settings' enum of them); ``auto`` is
    bf16 where the hardware has it natively (CUDA with bf16, CPUs with AVX512-BF16/AMX), fp16 on other GPUs,
    fp32 elsewhere. ``threads`` > 0 sets torch's intra-op threads. ``torch_compile`` compiles served models,
    on CUDA only."""
    if threads:
        torch.set_num_threads(threads)
    if device is not None:
        target = torch.device(device)
    else:
        target = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    precision = precision.value if hasattr(precision, "value") else precision
    dtype: Optional[torch.dtype]
    if precision == "fp32":
        dtype = None
    elif precision == "bf16":
        dtype = torch.bfloat16
    elif precision == "fp16":
        dtype = torch.float16
    elif target.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.bfloat16 if cpu_supports_bf16() else None
    return Runtime(device=target, autocast_dtype=dtype, compile=torch_compile and cuda.is_cuda(target))


def release_memory() -> None:
    """Return freed tensors' memory: a garbage collection, and CUDA's cache where there is one."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
