"""One attention entry point for every model: `attention(q, k, v, mask)`.

The backend is chosen once (by the host, from the preset's rules and the user's flag) with
`set_attention_backend`; models never pick one themselves. Backends:

- `sdpa`: torch's scaled_dot_product_attention, always available (the reference).
- `flash`: flash-attn 3 (`flash_attn_interface`, Hopper) or 2 (`flash_attn`, sm80+), fp16/bf16 on CUDA.
- `sage` / `sage2`: SageAttention 1 / 2 (int8 QK, sm80+), fp16/bf16 on CUDA.
- `auto`: the best one installed and supported here (flash, then sage2, then sage, else sdpa).

A backend that is missing, unsupported by the GPU or unable to run a given call (CPU tensors, fp32,
a key mask that is not trailing padding) falls back to SDPA with one warning per reason: never a crash.
Optional packages are imported the first time a backend is asked for.

The optional kernels take no mask. The one mask the models make pads a batch whose rows differ in
length (a CFG batch whose prompts have different token counts: every Base generation with a negative
prompt shorter than the prompt), each row real up to its length, padding after. Such a call runs the
kernel once per row on that row's real tokens, so CFG batches keep the chosen kernel instead of falling
back to SDPA (with a mask, PyTorch's CUDA SDPA cannot use its flash kernel either); query rows past a
row's length come back as zeros (padding, which no caller reads).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS = ("sdpa", "flash", "sage", "sage2", "auto")
AUTO_ORDER = ("flash", "sage2", "sage")
# Lowest compute capability (major*10+minor) each optional backend runs on.
MIN_CAPABILITY = {"flash2": 80, "flash3": 90, "sage": 80, "sage2": 80}

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (B, L, H, D) in and out

_BACKEND = "sdpa"
_KERNEL: AttentionFn | None = None  # the optional kernel behind _BACKEND (None for sdpa)
_WARNED: set[str] = set()


def set_attention_backend(name: str, capability: int | None = None) -> str:
    """Select the attention implementation used by `attention`; returns the backend actually used.

    capability: the GPU's compute capability (e.g. 89), default: the current CUDA device's, None on CPU.
    """
    global _BACKEND, _KERNEL
    if capability is None and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        capability = major * 10 + minor
    chosen, kernel = resolve_backend(name, capability)
    _BACKEND, _KERNEL = chosen, kernel
    return chosen


def get_attention_backend() -> str:
    """The backend `attention` uses now (after fallbacks)."""
    return _BACKEND


def resolve_backend(name: str, capability: int | None) -> tuple[str, AttentionFn | None]:
    """(backend name, kernel) for a requested name; falls back to ("sdpa", None) with one warning."""
    if name not in BACKENDS:
        _warn_once(f"unknown:{name}", f"unknown attention backend {name!r} (known: {', '.join(BACKENDS)}); using sdpa")
        return "sdpa", None
    if name == "sdpa":
        return "sdpa", None
    if name == "auto":
        for candidate in AUTO_ORDER:
            kernel, _ = _load_kernel(candidate, capability)
            if kernel is not None:
                return candidate, kernel
        return "sdpa", None
    kernel, reason = _load_kernel(name, capability)
    if kernel is None:
        _warn_once(f"missing:{name}", f"attention backend {name!r} is not usable here ({reason}); using sdpa")
        return "sdpa", None
    return name, kernel


def _load_kernel(name: str, capability: int | None) -> tuple[AttentionFn | None, str]:
    """Import the package behind a backend; (kernel, "") or (None, why not)."""
    if capability is None:
        return None, "needs a CUDA GPU"
    if name == "flash":
        for module, key in (("flash_attn_interface", "flash3"), ("flash_attn", "flash2")):
            fn = _import_attr(module, "flash_attn_func")
            if fn is not None and capability >= MIN_CAPABILITY[key]:
                return _flash_kernel(fn), ""
        return None, "flash-attn 2 (sm80+) or 3 (sm90+) is not installed for this GPU (pip install flash-attn)"
    if name in ("sage", "sage2"):
        fn = _import_attr("sageattention", "sageattn")
        if fn is None:
            return None, "sageattention is not installed (pip install sageattention)"
        major = _major_version("sageattention")
        if name == "sage2" and major < 2:
            return None, f"sageattention {major}.x is installed; sage2 needs 2.x"
        if capability < MIN_CAPABILITY[name]:
            return None, f"SageAttention needs compute capability >= 8.0, this GPU is {capability / 10:.1f}"
        return _sage_kernel(fn), ""
    return None, "unknown backend"


def _import_attr(module: str, attr: str) -> Callable | None:
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, OSError, RuntimeError) as exc:  # broken CUDA builds raise OSError
        log.debug("attention: cannot import %s.%s (%s)", module, attr, exc)
        return None


def _major_version(package: str) -> int:
    try:
        return int(importlib.metadata.version(package).split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return 1


def _flash_kernel(fn: Callable) -> AttentionFn:
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = fn(q, k, v, causal=False)  # (B, L, H, D) layout natively
        return out[0] if isinstance(out, tuple) else out  # flash-attn 3 also returns the log-sum-exp

    return run


def _sage_kernel(fn: Callable) -> AttentionFn:
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return fn(q, k, v, tensor_layout="NHD", is_causal=False)

    return run


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(message)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The reference path. q, k, v: (B, L, H, D); key_mask (B, L) bool, True = a real token."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Non-causal multi-head attention.

    q, k, v: (B, L, H, D). key_mask: (B, L) bool, True = a real token (None = all real).
    Returns (B, L, H, D).
    """
    if _KERNEL is None:
        return sdpa(q, k, v, key_mask)
    reason = kernel_skip_reason(q, key_mask)
    lengths = None
    if reason is None and key_mask is not None:
        lengths = row_lengths(key_mask)
        if lengths is None:
            reason = "takes no key mask other than padding at the end of each row"
    if reason is not None:
        _warn_once(f"skip:{_BACKEND}:{reason}", f"{_BACKEND} attention {reason}; those calls use sdpa")
        return sdpa(q, k, v, key_mask)
    try:
        return _KERNEL(q, k, v) if lengths is None else per_row(_KERNEL, q, k, v, lengths)
    except KERNEL_FAILURES as exc:
        return _fall_back_after_failure(exc, q, k, v, key_mask)


def kernel_skip_reason(q: torch.Tensor, key_mask: torch.Tensor | None) -> str | None:
    """Why the optional kernel cannot take this call (None: it can; a mask is checked by `row_lengths`)."""
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        return f"needs fp16/bf16 CUDA tensors, got {q.dtype} on {q.device}"
    return None


def row_lengths(key_mask: torch.Tensor) -> list[int] | None:
    """Each row's length when `key_mask` (B, L) is True up to it and False after (padding at the end), else None.
    One small read back from the GPU per call."""
    lengths = key_mask.sum(dim=1)
    prefix = torch.arange(key_mask.shape[1], device=key_mask.device)[None] < lengths[:, None]
    if not torch.equal(prefix, key_mask.bool()):
        return None
    return lengths.tolist()


def per_row(kernel: AttentionFn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """A mask-free kernel on each row's first `lengths[i]` tokens of (B, L, H, D) q, k, v; rows are zero past
    their length."""
    out = torch.zeros_like(q) if min(lengths) < q.shape[1] else torch.empty_like(q)
    for i, n in enumerate(lengths):
        out[i : i + 1, :n] = kernel(q[i : i + 1, :n], k[i : i + 1, :n], v[i : i + 1, :n])
    return out


# What an optional kernel raises at run time when it cannot run here after all (an import that worked,
# then "no kernel image for this GPU", an unsupported head dim, a version mismatch, ...).
KERNEL_FAILURES = (RuntimeError, TypeError, ValueError, AssertionError, NotImplementedError)


def _fall_back_after_failure(
    exc: Exception, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None
) -> torch.Tensor:
    """Switch to SDPA for the rest of the run (one warning) and answer this call with it."""
    global _BACKEND, _KERNEL
    failed = _BACKEND
    _BACKEND, _KERNEL = "sdpa", None
    _warn_once(
        f"failed:{failed}",
        f"{failed} attention failed at run time ({type(exc).__name__}: {exc}); using sdpa from now on "
        f"(choose it directly with --attention sdpa)",
    )
    return sdpa(q, k, v, key_mask)
