"""The step cache (host/cache/step_cache.py, EasyCache's criterion) on the mid config: forwards saved, seconds and
the image's PSNR against the uncached image, for each `cache` level Z-Image offers, Base (30 steps, CFG) and
Turbo (8 steps).

    .venv/bin/python bench/bench_step_cache.py                       # mid config, 512x512, CPU fp32
    .venv/bin/python bench/bench_step_cache.py --size 256 --levels 0.05:0.1,0.08:0.2 --cases base \
        --folder /tmp/mid --reuse-reference                          # quick sweeps on one kept model

Random weights (bench/bench_engine.py's mid model): the forwards saved and the PSNR say how the criterion behaves
on this network's dynamics, not what it does to real Z-Image images; quality on the real weights is to be
checked on a GPU. `--levels tau:warmup,...` tries other thresholds than the shipped levels. Forwards and PSNR are
deterministic; the seconds follow the machine's load (printed at the start and the end), so the time column is
the ratio to the uncached run of the same process.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "a red fox in the snow, detailed fur, soft morning light"
CASES = {  # name -> (architecture, settings): the architectures' own defaults
    "base": ("z_image_base", dict(num_inference_steps=30, guidance_scale=4.0, flow_shift=6.0,
                                  negative_prompt="blurry, low quality")),
    "turbo": ("z_image", dict(num_inference_steps=8, guidance_scale=0.0, flow_shift=3.0)),
}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two 8-bit images (inf when equal)."""
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as `uptime` prints them."""
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


def run(pipe, settings: dict, level=None) -> tuple[np.ndarray, float, dict | None]:
    """One generation, with the step cache at `level` (None: uncached); image, denoise seconds, cache report."""
    from host.cache import StepCacheTransform

    transform = StepCacheTransform(level) if level is not None else None
    if transform is not None:
        transform.apply(pipe)
    try:
        result = pipe.generate(settings)
    finally:
        if transform is not None:
            transform.remove(pipe)
    report = transform.last_report.to_dict() if transform is not None else None
    return np.asarray(result.images[0]), result.timings["denoise_s"], report


def levels_for(architecture: str, override: str | None) -> list:
    from common.model_facts import StepCacheLevel
    from models.z_image.z_image_handler import ZImageHandler

    if override:
        pairs = [item.split(":") for item in override.split(",")]
        return [StepCacheLevel(f"level{i}", float(tau), float(warmup)) for i, (tau, warmup) in enumerate(pairs, 1)]
    return list(ZImageHandler().query_model_facts(architecture, {}).step_cache)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--cases", default="base,turbo")
    parser.add_argument("--levels", help="tau:warmup pairs instead of the shipped levels, e.g. 0.05:0.1,0.1:0.2")
    parser.add_argument("--folder", type=Path, help="an existing mid model folder (bench_engine.build) to reuse")
    parser.add_argument("--reuse-reference", action="store_true",
                        help="take the uncached image (and its seconds) saved in --folder by an earlier run at this size "
                             "(quick sweeps; the time ratio then compares different runs)")
    args = parser.parse_args()
    import torch

    from bench.bench_engine import build
    from host.progress import format_steps
    from models.z_image.pipeline_z_image import LoadOptions, ZImageComponents, ZImagePipeline

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or Path(tmp) / "mid"
        if not (folder / "model_index.json").exists():
            build(folder)
        pipe = ZImagePipeline.from_components(ZImageComponents.from_diffusers_folder(folder), LoadOptions(dtype=torch.float32))
        print(f"mid config (bench_engine.MID), {args.size}x{args.size}, CPU fp32, {torch.get_num_threads()} threads; "
              f"random weights; load average {load_average()} at the start")
        print("| case | cache | forwards | denoise (s) | time vs uncached | PSNR vs uncached (dB) | skipped steps |\n"
              "|---|---|---|---|---|---|---|")
        for name in args.cases.split(","):
            architecture, case = CASES[name]
            settings = dict(prompt=PROMPT, width=args.size, height=args.size, seed=7, **case)
            steps = settings["num_inference_steps"]
            kept = folder / f"uncached_{name}_{args.size}.npz"  # with --reuse-reference: from an earlier run
            if args.reuse_reference and kept.exists():
                with np.load(kept) as data:
                    reference, uncached_s = data["image"], float(data["seconds"])
            else:  # one untimed step first: the first call's setup (kernels, buffers) would count for the uncached run
                run(pipe, {**settings, "num_inference_steps": 1})
                reference, uncached_s, _ = run(pipe, settings)
                np.savez(kept, image=reference, seconds=uncached_s)
            print(f"| {name} {steps} steps | off | {steps}/{steps} | {uncached_s:.1f} | 1.00 | - | - |", flush=True)
            for level in levels_for(architecture, args.levels):
                image, seconds, report = run(pipe, settings, level)
                assert report is not None
                skipped = format_steps(report["skipped_steps"]) or "none"
                fewer = 1 - report["forwards"] / report["evaluations"]
                print(f"| {name} {steps} steps | {level.name} (tau {level.threshold}, warm-up {level.warmup}) | "
                      f"{report['forwards']}/{report['evaluations']} ({100 * fewer:.0f}% fewer) | {seconds:.1f} | "
                      f"{seconds / uncached_s:.2f} | {psnr(reference, image):.1f} | {skipped} |", flush=True)
        print(f"load average {load_average()} at the end")

if __name__ == "__main__":
    main()
