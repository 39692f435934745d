"""Device, dtype and attention backend: chosen once, at the edge, and passed down.

CUDA when available (bf16 weights and compute), else the CPU in fp32 (CPUs without native bf16 are
slow and less exact in it). The attention backend comes from the user's setting or, for "auto",
from the preset's rules keyed by compute capability (`{"<89": "sdpa"}`), defaulting to SDPA.
"""

from __future__ import annotations

import logging
import operator
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from common.errors import SettingsError

log = logging.getLogger(__name__)

DEFAULT_ATTENTION = "sdpa"
_RULE = re.compile(r"^\s*(<=|>=|<|>|==)?\s*(\d+)\s*$")
_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq, None: operator.eq}


BF16_MIN_CAPABILITY = 80  # Ampere: native bf16 matmuls


def compute_dtype(device: str, capability: int | None, requested: str | None = None) -> torch.dtype:
    """bf16 on CUDA GPUs with compute capability >= 8.0, else fp32; `requested` "bf16"/"fp32" may force one.

    Raises SettingsError for fp16 (overflows) and for bf16 on a GPU without native bf16.
    """
    if requested == "fp16":
        raise SettingsError(
            "fp16 is not supported: Z-Image's activations overflow fp16's range (max 65504) and the image turns "
            "black. Use bf16 (GPUs with compute capability >= 8.0, e.g. RTX 30xx and newer) or fp32."
        )
    on_gpu = str(device).startswith("cuda")
    if requested == "fp32" or not on_gpu:
        return torch.float32
    if capability is not None and capability < BF16_MIN_CAPABILITY:
        if requested == "bf16":
            raise SettingsError(
                f"this GPU (compute capability {capability / 10:.1f}) has no native bf16; use fp32 (the default here)"
            )
        log.info(
            "GPU compute capability %.1f < 8.0: computing in fp32 (fp16 overflows, bf16 is emulated)", capability / 10
        )
        return torch.float32
    return torch.bfloat16


@dataclass(frozen=True)
class DeviceChoice:
    """Where and in what precision to run: `capability` is e.g. 89 for an RTX 4090, None on CPU."""

    device: str
    dtype: torch.dtype
    capability: int | None

    @property
    def label(self) -> str:
        if self.device.startswith("cuda"):
            return f"{torch.cuda.get_device_name(self.device)} (sm_{self.capability}, {_dtype_name(self.dtype)})"
        return f"CPU ({_dtype_name(self.dtype)})"


def choose_device(requested: str | None = None) -> DeviceChoice:
    """`requested` "cpu"/"cuda"/"cuda:N" or None for the best available."""
    device = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SettingsError(f"device '{device}' asked for, but no CUDA GPU is visible to torch")
        major, minor = torch.cuda.get_device_capability(device)
        capability = major * 10 + minor
        return DeviceChoice(device, compute_dtype(device, capability), capability)  # bf16 on sm80+, else fp32
    if device != "cpu":
        raise SettingsError(f"unknown device '{device}': use cpu, cuda or cuda:N")
    return DeviceChoice("cpu", torch.float32, None)


def attention_backend(setting: str, rules: Mapping[str, str] | None, capability: int | None) -> str:
    """The backend for this run: an explicit setting wins; "auto" applies the first matching preset
    rule, and with no matching rule on a GPU stays "auto" (the dispatch picks the best installed)."""
    if setting != "auto":
        return setting
    if capability is None:
        return DEFAULT_ATTENTION
    for rule, backend in (rules or {}).items():
        match = _RULE.match(rule)
        if match is None:
            log.warning("ignored attention rule %r (expected e.g. '<89' or '>=90')", rule)
            continue
        if _OPS[match[1]](capability, int(match[2])):
            return backend
    return "auto"


def reset_peak_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)


@dataclass(frozen=True)
class VramPeak:
    """Peak GPU memory of a run, in GB. `allocated`: tensors; `reserved`: what torch's caching allocator
    held (tensors plus its slack); `context`: what the device uses beyond torch's reservation now (the
    CUDA context, kernels, and other processes). A card runs out when reserved + context reaches its size."""

    allocated: float
    reserved: float
    context: float

    @property
    def total(self) -> float:
        return self.reserved + self.context

    def label(self) -> str:
        return (
            f"peak VRAM (allocated {self.allocated:.2f} GB, reserved {self.reserved:.2f} GB, "
            f"CUDA context and other processes {self.context:.2f} GB)"
        )


def vram_peak(device: str) -> VramPeak:
    """The peak since `reset_peak_memory` on a CUDA device."""
    free, total = torch.cuda.mem_get_info(device)
    reserved_now = torch.cuda.memory_reserved(device)
    return VramPeak(
        allocated=torch.cuda.max_memory_allocated(device) / 1e9,
        reserved=torch.cuda.max_memory_reserved(device) / 1e9,
        context=max(0, total - free - reserved_now) / 1e9,
    )


def peak_memory_gb(device: str) -> tuple[float, str]:
    """(GB, what was measured): on CUDA the peak reserved VRAM plus the context (what decides whether a
    card runs out; the label gives allocated, reserved and context apart), the process's peak RSS on the CPU."""
    if device.startswith("cuda"):
        peak = vram_peak(device)
        return peak.total, peak.label()
    try:
        import resource
    except ImportError:  # Windows: no peak counter, the current RSS is the best we have
        import psutil

        return psutil.Process().memory_info().rss / 1e9, "RSS"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux kilobytes
    return peak * scale / 1e9, "peak RSS"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
