"""How much more Turbo's images differ across seeds with `seed_variety` (noise on the prompt embedding in the
first steps, models/z_image/variety_z_image.py): the mean pairwise distance between the images of 8 seeds,
without and with it, on random-weight models (the tiny self-test model and the "mid" model of
bench_engine.py). Distance: mean absolute pixel difference, in /255.

    .venv/bin/python bench/bench_seed_variety.py                      # tiny and mid, strengths 0 0.5 1 2
    .venv/bin/python bench/bench_seed_variety.py --models tiny --strengths 0 1

Random weights follow the prompt only weakly, so these numbers show the mechanism and its size on these models;
how much variety it buys (and what it costs in prompt-following) on the real Turbo weights needs a GPU run.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEEDS = tuple(range(1, 9))
PROMPT = "a photo of a cat sitting on a red chair, studio lighting, high detail"
SIZES = {"tiny": 64, "mid": 256}


def load(model: str, folder: Path):  # noqa: ANN201 - a ZImagePipeline
    import torch

    from models.z_image.pipeline_z_image import LoadOptions, ZImageComponents, ZImagePipeline

    if model == "tiny":
        from models.z_image.tiny_z_image import write_diffusers_layout

        write_diffusers_layout(folder, seed=0)
    else:
        from bench.bench_engine import build

        build(folder)
    return ZImagePipeline.from_components(ZImageComponents.from_diffusers_folder(folder), LoadOptions(dtype=torch.float32))


def mean_pairwise_distance(images: list) -> float:  # images: HxWx3 uint8 arrays
    import numpy as np

    pairs = list(itertools.combinations(images, 2))
    return float(np.mean([np.abs(a.astype(np.float64) - b.astype(np.float64)).mean() for a, b in pairs]))


def measure(pipe, size: int, strength: float, steps: int, variety_steps: int) -> tuple[float, list]:  # noqa: ANN001
    import numpy as np

    images = []
    for seed in SEEDS:
        settings = dict(prompt=PROMPT, width=size, height=size, num_inference_steps=steps, guidance_scale=0.0,
                        flow_shift=3.0, seed=seed, seed_variety=strength, seed_variety_steps=variety_steps)
        images.append(np.asarray(pipe.generate(settings).images[0]))
    return mean_pairwise_distance(images), images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(SIZES), default=["tiny", "mid"])
    parser.add_argument("--strengths", nargs="+", type=float, default=[0.0, 0.5, 1.0, 2.0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--variety-steps", type=int, default=2)
    args = parser.parse_args()
    import numpy as np

    for model in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            pipe = load(model, Path(tmp) / model)
            size = SIZES[model]
            print(f"{model} model, {size}x{size}, {args.steps} steps, guidance 0, seeds {SEEDS[0]}-{SEEDS[-1]}, "
                  f"noise on the first {args.variety_steps} steps")
            baseline = None
            for strength in args.strengths:
                start = time.perf_counter()
                distance, images = measure(pipe, size, strength, args.steps, args.variety_steps)
                baseline = images if baseline is None else baseline
                pairs = zip(images, baseline, strict=True)
                same_seed = float(np.mean([np.abs(a.astype(float) - b.astype(float)).mean() for a, b in pairs]))
                print(f"  seed_variety {strength:<4g}: mean pairwise distance {distance:6.2f}/255 "
                      f"(change from strength {args.strengths[0]:g} at the same seed: {same_seed:5.2f}/255; "
                      f"{time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
