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
