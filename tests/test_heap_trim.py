"""The heap trim (host/lowvram/heap.py): freed C heap memory really goes back to the system, and the transform
trims at the model's hooks without changing the image."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from host.lowvram.heap import HeapTrim, malloc_trim
from tests.fixtures.pipelines import flat_pipeline

REPO = Path(__file__).resolve().parents[1]

# 160 MB of 64 kB tensors (malloc'd from the heap, under glibc's mmap threshold) freed while a later small tensor
# pins the top of the heap: glibc keeps the pages resident until malloc_trim.
RETAINED = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    import torch
    from host.lowvram.heap import malloc_trim

    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096

    chunks = [torch.ones(16384) for _ in range(2560)]
    pin = torch.ones(16)
    del chunks
    freed = rss()
    malloc_trim()()
    print(freed - rss())
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux") or malloc_trim() is None, reason="glibc's malloc_trim")
def test_trim_returns_freed_heap_memory() -> None:
    ran = subprocess.run([sys.executable, "-c", RETAINED, str(REPO)], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr[-2000:]
    returned = int(ran.stdout.strip())
    assert returned > 120e6  # of the 160 MB freed, what malloc_trim gave back


def test_the_transform_trims_at_the_hooks_and_changes_no_pixel(tiny_flat_layout: dict[str, Path]) -> None:
    pipe = flat_pipeline(tiny_flat_layout)
    settings = dict(prompt="a fox", width=64, height=64, num_inference_steps=3, guidance_scale=0.0, seed=5)
    plain = np.asarray(pipe.generate(settings).images[0])
    trim = HeapTrim()
    trim.apply(pipe)
    assert {"before_step", "decode", "after_generate"} <= set(pipe.hooks.owners()) or malloc_trim() is None
    trimmed = np.asarray(pipe.generate(settings).images[0])
    trim.remove(pipe)
    assert np.array_equal(plain, trimmed) and pipe.hooks.owners() == {}


def test_own_arena_runs_the_call_with_the_callers_modes_and_hands_back_errors() -> None:
    import contextvars
    import threading

    import torch

    from host.lowvram.heap import in_own_arena

    var = contextvars.ContextVar("var", default="unset")
    var.set("caller")
    seen: dict[str, object] = {}

    def call(x: torch.Tensor) -> torch.Tensor:
        seen.update(grad=torch.is_grad_enabled(), inference=torch.is_inference_mode_enabled(), var=var.get(),
                    threads=torch.get_num_threads(), thread=threading.current_thread().name)
        return x * 2

    with torch.no_grad():
        assert torch.equal(in_own_arena(call, torch.ones(3)), torch.full((3,), 2.0))
    assert seen["grad"] is False and seen["inference"] is False and seen["var"] == "caller"
    assert seen["threads"] == torch.get_num_threads()
    if malloc_trim() is not None:
        assert seen["thread"] != threading.current_thread().name  # glibc: the decode worker's own thread
    with torch.inference_mode():
        in_own_arena(call, torch.ones(1))
    assert seen["inference"] is True

    def fail(_: object) -> None:
        raise ValueError("bad latent")

    with pytest.raises(ValueError, match="bad latent"):
        in_own_arena(fail, None)


# The main heap left full of free chunks (a denoiser's freed activations between small live blocks that pin them),
# then a decode-like run of maps of changing sizes: its resident peak over the start, in the main thread or in
# the decode worker's own arena (host/lowvram/heap.py's docstring).
FRAGMENTED = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    import torch
    from host.lowvram.heap import in_own_arena, malloc_trim

    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096

    def decode_like():
        start, peak, held = rss(), 0, []
        for i in range(60):
            held.append(torch.ones((1 + i % 5) * 262144 + 1000 * i))  # 1-5 MB maps of changing sizes
            if len(held) > 6:
                held.pop(0)
            peak = max(peak, rss() - start)
        return peak

    blocks, pins = [], []
    for i in range(40):  # 160 MB of freed 4 MB chunks, pinned apart: the main heap's free lists
        big = torch.empty(1 << 20)
        big.fill_(1.0)
        blocks.append(big)
        pins.append(torch.ones(64))
    torch.ones(20 << 20).sum()  # a 80 MB block freed: glibc's threshold rises above the chunks
    del blocks
    malloc_trim()()
    print(decode_like() if sys.argv[2] == "main" else in_own_arena(decode_like))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux") or malloc_trim() is None, reason="glibc's arenas")
def test_a_decode_in_its_own_arena_leaves_no_freed_pages_resident() -> None:
    peaks = {}
    for where in ("main", "arena"):
        ran = subprocess.run([sys.executable, "-c", FRAGMENTED, str(REPO), where], capture_output=True, text=True,
                             timeout=120)
        assert ran.returncode == 0, ran.stderr[-2000:]
        peaks[where] = int(ran.stdout.strip())
    live = 7 * 5 * 1.05e6  # at most seven maps of at most 5.3 MB alive
    assert peaks["arena"] < live + 8e6, peaks
    assert peaks["main"] > 1.5 * peaks["arena"], peaks  # measured 43-45 MB against 22 MB
