"""GPU honesty: a process that was given a GPU but cannot use CUDA stops with a clear message instead of
running on the CPU while the GPU it holds stays idle (a CPU-only torch build, a driver older than the CUDA
runtime, a device plugin that advertises a GPU that is not there).

``REQUIRE_CUDA`` decides: ``true`` checks, ``false`` never checks, unset checks when ``NVIDIA_VISIBLE_DEVICES``
names devices (what the NVIDIA device plugin sets for a container that was allocated GPUs; ``all``, ``void``
and ``none`` do not count: an image default says nothing about an allocation)."""

from __future__ import annotations

import os
from typing import Callable, Mapping, Optional

_NOT_AN_ALLOCATION = {"", "all", "void", "none"}


class CudaUnavailable(RuntimeError):
    """A GPU was assigned but CUDA cannot be used."""


def assigned_devices(environ: Optional[Mapping[str, str]] = None) -> str:
    """The GPUs the device plugin assigned (NVIDIA_VISIBLE_DEVICES), or "" when none are named."""
    value = (environ if environ is not None else os.environ).get("NVIDIA_VISIBLE_DEVICES", "").strip()
    return "" if value.lower() in _NOT_AN_ALLOCATION else value


def cuda_required(setting: Optional[bool], environ: Optional[Mapping[str, str]] = None) -> bool:
    if setting is not None:
        return setting
    return bool(assigned_devices(environ))


def _cuda_state() -> tuple[bool, str]:
    import torch

    build = torch.version.cuda
    if not build:
        return False, f"this torch ({torch.__version__}) is a CPU-only build"
    try:
        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            return True, ""
    except Exception as exc:  # a broken driver raises instead of answering False
        return False, f"CUDA {build} failed to initialise: {exc}"
    return False, f"torch is built for CUDA {build} but sees no usable GPU (driver missing or older than CUDA {build})"


def check_cuda(
    setting: Optional[bool],
    what: str,
    environ: Optional[Mapping[str, str]] = None,
    state: Callable[[], tuple[bool, str]] = _cuda_state,
) -> None:
    """Raise CudaUnavailable when a GPU is required (see the module doc) and CUDA cannot be used."""
    if not cuda_required(setting, environ):
        return
    ok, why = state()
    if ok:
        return
    devices = assigned_devices(environ)
    given = f"GPU(s) {devices} were assigned" if devices else "a GPU was required (REQUIRE_CUDA=true)"
    raise CudaUnavailable(
        f"{what}: {given} but CUDA is not usable: {why}. Use the CUDA image on a node with a working NVIDIA "
        "driver, or set REQUIRE_CUDA=false (chart: gpu.requireCuda / trainer.gpu.requireCuda) to run on the CPU"
    )
