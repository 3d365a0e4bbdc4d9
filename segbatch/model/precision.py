"""Which precision the model runs at on this worker's device.

``--precision bf16`` on a CPU without native bf16 (neither AMX nor
AVX512-BF16) makes torch emulate every bf16 multiply: measured 3x to 20x
slower than fp32 (BENCHMARKS.md), with no word from torch. Such a worker
warns and runs fp32, unless ``--force-precision`` asks for bf16 anyway (to
compare masks, say). GPUs run every precision they are given.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX tiles or AVX512-BF16), as torch's own checks report."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # private checks gone in another torch: read the CPU's flags
        try:
            with open("/proc/cpuinfo") as f:
                flags = set(f.read().split())
        except OSError:
            return False
        return bool(flags & {"amx_bf16", "avx512_bf16"})


def effective_precision(
    precision: str, device: torch.device, force: bool = False, native_bf16: Callable[[], bool] = cpu_has_native_bf16
) -> str:
    """The precision to run: ``precision``, or fp32 for bf16 on a CPU without native bf16 (not ``force``)."""
    if precision != "bf16" or device.type != "cpu" or force or native_bf16():
        return precision
    log.warning(
        "--precision bf16: this CPU has no native bf16 (no AMX or AVX512-BF16; torch reports %s), where bf16 runs "
        "3x to 20x slower than fp32: running fp32. Add --force-precision to run bf16 anyway",
        torch.backends.cpu.get_cpu_capability(),
    )
    return "fp32"
