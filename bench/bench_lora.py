"""Per-step cost of LoRAs: one transformer forward with 0, 1, 2 and 4 rank-32 LoRAs on every Linear,
unmerged (runtime forward hooks) and merged (weights changed once), on the mid config.

    .venv/bin/python bench/bench_lora.py                         # mid config, 512x512 (1024 image tokens), CPU fp32
    .venv/bin/python bench/bench_lora.py --device cuda --dtype bf16 --config full --size 1024

Also prints the LoRA share of the Linear FLOPs, r * (in + out) / (in * out) per module, which is what
the unmerged overhead tends to on a compute-bound device.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_transformer import CONFIGS, DTYPES  # noqa: E402
from bench.rates import time_call  # noqa: E402
from common.lora_delta import LoraDelta, NormalizedLora  # noqa: E402
from host.lora.apply import LoraRuntime, linear_shapes  # noqa: E402
from models.z_image.transformer_z_image import ZImageConfig, ZImageTransformer  # noqa: E402

CAPTION_TOKENS = 128


def random_lora(shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> NormalizedLora:
    gen = torch.Generator().manual_seed(seed)
    deltas = {
        name: LoraDelta(name, "lora", {"down": torch.randn(rank, i, generator=gen) / math.sqrt(i),
                                       "up": torch.randn(o, rank, generator=gen) * 0.01}, 1.0, rank)
        for name, (o, i) in shapes.items()
    }
    return NormalizedLora(deltas, ["bench"])


def lora_flop_share(shapes: dict[str, tuple[int, int]], rank: int) -> float:
    """Extra Linear FLOPs of one LoRA over the model's own Linear FLOPs (per token)."""
    base = sum(o * i for o, i in shapes.values())
    return sum(rank * (o + i) for o, i in shapes.values()) / base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="mid")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (512 -> 1024 image tokens)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    cfg: ZImageConfig = CONFIGS[args.config]
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    with torch.device("meta"):
        model = ZImageTransformer(cfg)
    model = model.to_empty(device=args.device).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    side = args.size // 8
    latents = torch.randn(1, cfg.in_channels, side, side, device=args.device)
    t = torch.full((1,), 0.5, device=args.device)
    caps = [torch.randn(CAPTION_TOKENS, cfg.cap_feat_dim, device=args.device)]
    shapes = linear_shapes(model)
    loras = [random_lora(shapes, args.rank, seed) for seed in range(4)]

    def step() -> None:
        with torch.no_grad():
            model(latents, t, caps)

    print(f"config {args.config} (dim {cfg.dim}, {cfg.n_layers} layers), {side // 2 * side // 2} image tokens + "
          f"{CAPTION_TOKENS} caption tokens, {args.device} {args.dtype}, rank {args.rank}, {len(shapes)} Linears/LoRA")
    print(f"LoRA share of Linear FLOPs: {100 * lora_flop_share(shapes, args.rank):.1f}% per LoRA on this config, "
          f"{100 * lora_flop_share(linear_shapes_of(CONFIGS['full']), args.rank):.1f}% on the full 6B config")
    cases = [(0, False)] + [(n, merged) for merged in (False, True) for n in (1, 2, 4)]
    best = {case: float("inf") for case in cases}
    for _ in range(args.reps):  # round-robin, best of reps: robust to other load on the machine
        for n, merged in cases:
            runtime = LoraRuntime(model, loras[:n], [[1.0]] * n, merged=merged) if n else None
            seconds, _ = time_call(step, args.device, 1)
            best[(n, merged)] = min(best[(n, merged)], seconds)
            if runtime is not None:
                runtime.detach()
    base = best[(0, False)]
    print(f"| LoRAs | mode | s/step | overhead | per LoRA |\n|---|---|---|---|---|\n| 0 | - | {base:.3f} | - | - |")
    for n, merged in cases[1:]:
        extra = best[(n, merged)] / base - 1
        mode = "merged" if merged else "unmerged"
        print(f"| {n} | {mode} | {best[(n, merged)]:.3f} | {100 * extra:+.1f}% | {100 * extra / n:+.1f}% |")


def linear_shapes_of(cfg: ZImageConfig) -> dict[str, tuple[int, int]]:
    with torch.device("meta"):
        return linear_shapes(ZImageTransformer(cfg))


if __name__ == "__main__":
    main()
