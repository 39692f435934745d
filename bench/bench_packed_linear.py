"""PyTorch's fp32 CPU linear (MKL sgemm) against oneDNN with the weight packed once (host/lowvram/packed_linear.py),
on the transformer's own matrix shapes, then one CFG forward of the mid transformer three ways on the same tensors:
ours with dense layers, ours with packed layers, diffusers'. Everything alternated in one process; medians.

    .venv/bin/python bench/bench_packed_linear.py                 # mid shapes + forwards (about 3 minutes)
    .venv/bin/python bench/bench_packed_linear.py --shapes-only   # the matmul table only

CPU and fp32 only: the packing is what the host does on the CPU. The GFLOP/s are this machine's at that moment;
the ratios are the firm figures (both sides see the same machine, alternated).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (tokens, in, out): the mid model (dim 768, 2 x 1056 tokens with CFG) and the released one's projections
SHAPES = {
    "mid qkv/out": (2112, 768, 768),
    "mid w1/w3": (2112, 768, 2048),
    "mid w2": (2112, 2048, 768),
    "full qkv/out, 1024 tokens": (1024, 3840, 3840),
    "full w1/w3, 1024 tokens": (1024, 3840, 10240),
}


def alternate(calls: dict[str, Callable[[], object]], rounds: int, reps: int) -> dict[str, float]:
    """Median seconds of each call, the order reversed every round."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for fn in calls.values():
        fn()
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            for _ in range(reps):
                start = time.perf_counter()
                calls[name]()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def shapes_table(rounds: int = 6) -> None:
    from host.lowvram.packed_linear import PackedLinear

    print("| shape (tokens x in -> out) | MKL GFLOP/s | packed oneDNN GFLOP/s | packed / MKL time |")
    print("|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, (m, k, n) in SHAPES.items():
            linear = torch.nn.Linear(k, n, bias=False)
            linear.weight.normal_(0, 0.02, generator=gen)
            packed = PackedLinear.from_linear(linear)
            x = torch.randn(m, k, generator=gen)
            reps = 8 if m * k * n < 4e9 else 2
            calls = {"mkl": lambda linear=linear, x=x: linear(x), "packed": lambda packed=packed, x=x: packed(x)}
            med = alternate(calls, rounds, reps)
            rate = {key: 2 * m * k * n / s / 1e9 for key, s in med.items()}
            print(f"| {name} ({m} x {k} -> {n}) | {rate['mkl']:.1f} | {rate['packed']:.1f} | {med['packed'] / med['mkl']:.3f} |")


def forwards(rounds: int = 6) -> None:
    from bench.bench_transformer import CONFIGS, build_pair
    from host.lowvram.packed_linear import PackedLinears

    ours, ref = build_pair(CONFIGS["mid"], "cpu", torch.float32)
    packed = copy.deepcopy(ours)
    PackedLinears(True).apply(type("Parts", (), {"transformer": packed})())
    x, t = torch.randn(1, 16, 64, 64).repeat(2, 1, 1, 1), torch.full((2,), 0.3)
    captions = [torch.randn(20, 1024), torch.randn(12, 1024)]
    calls = {
        "ours, dense": lambda: ours(x, t, captions),
        "ours, packed": lambda: packed(x, t, captions),
        "diffusers": lambda: torch.stack(ref(list(x.unsqueeze(2).unbind(0)), t, captions, return_dict=False)[0]).squeeze(2),
    }
    with torch.no_grad():
        outs = {name: fn() for name, fn in calls.items()}
        med = alternate(calls, rounds, 1)
    diff = float((outs["ours, packed"] - outs["ours, dense"]).abs().max())
    print(f"\none CFG forward of the mid transformer (1024 image tokens, two captions), medians of {rounds} alternated:")
    for name, s in med.items():
        print(f"  {name}: {s:.3f} s ({s / med['diffusers']:.3f} of diffusers')")
    print(f"  packed vs dense output: max difference {diff:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes-only", action="store_true", help="only the matmul table")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    torch.manual_seed(0)
    shapes_table(args.rounds)
    if not args.shapes_only:
        forwards(args.rounds)


if __name__ == "__main__":
    main()
