"""Heap trim: give the C heap's freed memory back to the system between the stages of a generation.

PyTorch's CPU tensors are malloc'd. glibc keeps what they free in its heap for reuse and returns it to the
system only when asked (`malloc_trim`), so a process's resident size stays near its highest point: measured on
bench_engine's mid model, 155 MB more resident after an image than before it, all of it returned by one
`malloc_trim(0)`. The transform trims before each denoising step (the prompt stage's text encoder and its
activations are gone by then), right before the VAE decode (the denoiser's leftovers go before the decoder's
large activations arrive) and after the generation. A trim costs well under a millisecond when there is
little to return.

A CPU decode also runs in an arena of its own (`in_own_arena`). A trim gives back the pages of the heap's
free chunks, not the chunks: the denoiser's freed activations stay in the main heap's free lists, and glibc
serves the decoder's requests from them before it maps anything new, however low the mmap threshold. The lean
decoder's row strips and maps of changing sizes then fragment those chunks, and pages freed inside them stay
resident until the next trim. So the decode runs on one long-lived worker thread, which glibc serves from an
arena of its own, and for its duration the mmap threshold is fixed at `DECODE_MMAP_THRESHOLD` (1 MiB): every
strip and map of 1 MiB or more is a mapping of its own, unmapped when freed. After the decode the threshold is
fixed at `STEADY_MMAP_THRESHOLD` (32 MiB, the upper bound of glibc's own rising threshold, which the denoising
steps reach anyway); fixing it turns glibc's own adjustment off for the rest of the process.

Measured on bench_engine's mid model (512x512, 64-channel decoder, one-off scripts sampling the resident size,
not kept): the decode's peak over the resident size at its start was 156-185 MB in the main thread, with or
without the low threshold, and 94-105 MB in its own arena (the lean decoder's own peak in a fresh process is
97 MB: tests/test_lean_decode.py), so a generation's working memory went from 196-207 MB to 165 MB (the
denoising steps' peak is now the highest). The price is page faults: about 100 k more per decode, 0.3 s of
system time (the decode took 1.9-2.4 s). Keeping 1 MiB from the start of the process lowered the steps' peak
too but cost 2.5 M page faults and 6-8 s of system time per generation (against 0.3 M and 3-4 s), so the
steps keep the high threshold. On CUDA the decode stays in the caller's thread (a CUDA stream is per thread).
Without glibc (macOS, Windows, musl) the transform does nothing.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import ctypes
import ctypes.util
import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from host.transforms import hooks_of

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
DECODE_MMAP_THRESHOLD = 1 << 20  # in the decode: every block of 1 MiB or more is a mapping of its own
STEADY_MMAP_THRESHOLD = 32 << 20  # after it: glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit


@functools.cache
def _libc_function(name: str) -> Any:
    """A function of the C library (glibc's `malloc_trim`, `mallopt`), or None where the C library lacks it."""
    lib = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(lib), name) if lib else None
    except (OSError, AttributeError):
        return None


@functools.cache
def malloc_trim() -> Callable[[], None] | None:
    """glibc's `malloc_trim(0)` as a function, or None where the C library has none."""
    trim = _libc_function("malloc_trim")
    if trim is None:
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int

    def trim_all() -> None:
        trim(0)  # 0: keep no slack at the top of the heap

    return trim_all


def set_mmap_threshold(size: int) -> bool:
    """Fix glibc's mmap threshold at `size` bytes (blocks of that size or more get a mapping of their own, unmapped
    when freed); False where there is no glibc or it refuses the value."""
    mallopt = _libc_function("mallopt") if malloc_trim() is not None else None  # glibc's, not another libc's
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, size) == 1


_worker: concurrent.futures.ThreadPoolExecutor | None = None
_worker_lock = threading.Lock()


def in_own_arena(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` on the decode worker thread, which glibc serves from an arena of its own, with the mmap
    threshold at `DECODE_MMAP_THRESHOLD` meanwhile (module docstring). The caller's grad and inference modes,
    thread count and context variables go with it; its result or exception comes back. Without glibc,
    `fn(*args)` here."""
    global _worker
    if threading.current_thread().name.startswith("decode-arena") or not set_mmap_threshold(DECODE_MMAP_THRESHOLD):
        return fn(*args)  # already on the worker (a decode within a decode), or no glibc
    grad, inference, threads = torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.get_num_threads()
    context = contextvars.copy_context()

    def run() -> Any:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)  # OpenMP's thread count is kept per calling thread
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return context.run(fn, *args)

    with _worker_lock:
        if _worker is None:
            _worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode-arena")
        worker = _worker
    try:
        return worker.submit(run).result()
    finally:
        set_mmap_threshold(STEADY_MMAP_THRESHOLD)


@dataclass
class HeapTrim:
    """`malloc_trim` at the model's `before_step`, innermost on its `decode` (a CPU decode then runs in its own
    arena), and at `after_generate`."""

    name: str = "heap_trim"
    reversible: bool = True

    def apply(self, model: Any) -> None:
        hooks, trim = hooks_of(model), malloc_trim()
        if hooks is None or trim is None:
            return

        def decode(call_next: Callable[[Any], Any], z: Any) -> Any:
            trim()
            if isinstance(z, torch.Tensor) and z.device.type == "cpu":
                return in_own_arena(call_next, z)
            return call_next(z)

        hooks.before_step.add(self.name, lambda step, total: trim())
        hooks.decode.add(self.name, decode)
        hooks.after_generate.add(self.name, trim)

    def remove(self, model: Any) -> None:
        hooks = hooks_of(model)
        if hooks is not None:
            for point in (hooks.before_step, hooks.decode, hooks.after_generate):
                point.remove(self.name)
