"""One transformer step, ours against diffusers' ZImageTransformer2DModel, same random weights, one run.

On a CUDA GPU this is the full-size check of the engine issue (6B config, bf16, 1024x1024, 512-token
caption): seconds per step, peak VRAM, and the fraction of the card's measured bf16 matmul rate
(62.5 TFLOP per forward, REFERENCE.md section 7). On CPU use --config mid to check the script.

    .venv/bin/python bench/bench_transformer.py                                  # CUDA, full, bf16
    .venv/bin/python bench/bench_transformer.py --config mid --device cpu --dtype fp32 --size 512
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_engine import MID, transformer_flops  # noqa: E402
from bench.rates import MatmulReference, time_alternating  # noqa: E402
from models.z_image.transformer_z_image import ZImageConfig, ZImageTransformer  # noqa: E402

CONFIGS = {"full": ZImageConfig(), "mid": ZImageConfig.from_dict(MID["transformer"])}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def build_pair(cfg: ZImageConfig, device: str, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Our model with random weights, and diffusers' model holding the very same tensors."""
    from diffusers import ZImageTransformer2DModel

    with torch.device("meta"):
        ours = ZImageTransformer(cfg)
    ours = ours.to_empty(device=device).to(dtype)
    gen = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.02, generator=gen)
    with torch.device("meta"):
        ref = ZImageTransformer2DModel(**cfg.to_dict())
    ref.load_state_dict(ours.state_dict(), assign=True)  # shares storage: no second copy of the weights
    return ours.eval(), ref.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=CONFIGS, default="full")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--caption", type=int, default=512, help="caption tokens")
    parser.add_argument("--reps", type=int, default=4, help="timed rounds; the order alternates each round")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: run on a GPU machine, or use --config mid --device cpu --dtype fp32")
    cfg, dtype, device = CONFIGS[args.config], DTYPES[args.dtype], args.device
    ours, ref = build_pair(cfg, device, dtype)
    side = args.size // 8
    x = torch.randn(1, 16, side, side, device=device, dtype=dtype)
    t = torch.full((1,), 0.5, device=device)
    caps = [torch.randn(args.caption, cfg.cap_feat_dim, device=device, dtype=dtype)]
    calls = {
        "ours": lambda: ours(x, t, caps),
        "diffusers": lambda: ref(list(x.unsqueeze(2).unbind(0)), t, caps, return_dict=False),
    }
    reference = MatmulReference(device, dtype)
    with torch.no_grad():
        timed = time_alternating(calls, device, args.reps, reference)
    (ours_s, ours_peak), (ref_s, ref_peak) = timed["ours"], timed["diffusers"]
    flops = transformer_flops(cfg, batch=1, img_tokens=(side // 2) ** 2, cap_tokens=args.caption)
    rate = reference.rate
    print(f"{args.config} config, {args.size}x{args.size}, {args.caption}-token caption, {args.dtype}, {device}: "
          f"{flops / 1e12:.1f} TFLOP per forward; matmul rate {rate / 1e12:.2f} TFLOP/s ({reference.describe()}); "
          f"best of {args.reps} rounds, order alternating")
    print(f"{'':16}{'diffusers':>12}{'ours':>12}{'ours/theirs':>14}")
    print(f"{'s / step':16}{ref_s:12.3f}{ours_s:12.3f}{ours_s / ref_s:14.3f}")
    if device == "cuda":
        print(f"{'peak VRAM (GB)':16}{ref_peak / 1e9:12.2f}{ours_peak / 1e9:12.2f}{ours_peak / ref_peak:14.3f}")
    print(f"ours reaches {100 * flops / ours_s / rate:.0f}% of the matmul rate "
          f"(floor {flops / rate:.3f} s / step)")


if __name__ == "__main__":
    main()
