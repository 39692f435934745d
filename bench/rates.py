"""Timing helpers shared by the benches, so every "fraction of the matmul rate" uses one reference.

The reference (MatmulReference) is this machine's dense-matmul rate in the bench's dtype: the best of all
timed square matmuls (n = 3072 on the CPU, 8192 on CUDA), taken in bursts of 10 before every timed round
of the forwards it is compared with. Best-of rather than mean: the question is how close a forward gets to
what the hardware can do, and the best run is the least disturbed by other processes; interleaved, so
that the reference and the forwards see the same machine (on a shared machine the load changes by the
minute, and a reference taken once, before or after, can be far off).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

MATMUL_REPS = 10
MATMUL_N = {"cpu": 3072, "cuda": 8192}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device: str, reps: int) -> tuple[float, int]:
    """Best wall time of `reps` calls after one warm-up, and the peak memory of one call (CUDA only, else 0)."""
    fn()
    _sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0
    return best, peak


def time_alternating(
    calls: dict[str, Callable[[], object]], device: str, reps: int, reference: MatmulReference | None = None
) -> dict[str, tuple[float, int]]:
    """name -> (best wall time, peak memory of one call; CUDA only, else 0) over `reps` rounds.

    One warm-up call of each first; then each round calls all of them, the order reversed every round
    (A B, B A, A B, ...), so neither always runs first (warm caches, allocator state, clock drift).
    Use an even `reps` for a balanced order. With a `reference`, a burst of matmuls starts every round.
    """
    for fn in calls.values():
        fn()
    _sync(device)
    results = dict.fromkeys(calls, (float("inf"), 0))
    names = list(calls)
    for round_ in range(reps):
        if reference is not None:
            reference.burst()
        for name in names if round_ % 2 == 0 else names[::-1]:
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            calls[name]()
            _sync(device)
            seconds = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0
            best, top = results[name]
            results[name] = (min(best, seconds), max(top, peak))
    return results


class MatmulReference:
    """Best n x n matmul rate seen so far on `device` in `dtype`; call `burst()` between timed rounds."""

    def __init__(self, device: str, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self.n = MATMUL_N["cuda" if device.startswith("cuda") else "cpu"]
        self.best_s = float("inf")
        self.count = 0

    def burst(self) -> None:
        """Time MATMUL_REPS products after a warm-up one; keep the best. The operands live only during the
        burst, so they never count in the peak memory of the calls timed between bursts."""
        a, b = (torch.randn(self.n, self.n, device=self.device, dtype=self.dtype) for _ in range(2))
        seconds, _ = time_call(lambda: a @ b, self.device, MATMUL_REPS)
        self.best_s = min(self.best_s, seconds)
        self.count += MATMUL_REPS

    @property
    def rate(self) -> float:
        """FLOP/s of the best product timed (call burst() at least once first)."""
        return 2 * self.n**3 / self.best_s

    def describe(self) -> str:
        return f"matmul reference: best of {self.count} at n={self.n}, timed between the forwards"
