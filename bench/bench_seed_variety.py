"""How much more Turbo's images differ across seeds with `seed_variety` (noise on the prompt embedding in the
first steps, models/z_image/variety_z_image.py): the mean pairwise distance between the images of 8 seeds,
without and with it, on random-weight models: the tiny self-test model, and a "mid" one (bench_engine.py's
transformer size, dim 768 and 8 layers, with the tiny text encoder), both randomised like the self-test model
(activations of order 1, so the prompt matters; bench_engine.py's N(0, 0.02) weights barely read it).
Distance: mean absolute pixel difference, in /255.

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
OTHER_PROMPT = "a watercolor painting of mountains at sunrise with mist in the valley"
SIZES = {"tiny": 64, "mid": 256}


def _configs() -> dict:
    from models.z_image.tiny_z_image import TINY_CONFIG
    from models.z_image.transformer_z_image import ZImageConfig

    # mid: bench_engine.py's transformer size (dim 768, 8 layers), with the tiny text encoder's 64-wide captions
    mid = ZImageConfig(dim=768, n_layers=8, n_refiner_layers=2, n_heads=6, n_kv_heads=6, cap_feat_dim=64, axes_dims=(32, 48, 48))
    return {"tiny": TINY_CONFIG, "mid": mid}


def load(model: str, folder: Path):  # noqa: ANN201 - a ZImagePipeline
    import torch

    from models.z_image.pipeline_z_image import LoadOptions, ZImageComponents, ZImagePipeline
    from models.z_image.tiny_z_image import write_diffusers_layout

    write_diffusers_layout(folder, seed=0, config=_configs()[model])
    return ZImagePipeline.from_components(ZImageComponents.from_diffusers_folder(folder), LoadOptions(dtype=torch.float32))


def mean_pairwise_distance(images: list) -> float:  # images: HxWx3 uint8 arrays
    import numpy as np

    pairs = list(itertools.combinations(images, 2))
    return float(np.mean([np.abs(a.astype(np.float64) - b.astype(np.float64)).mean() for a, b in pairs]))


def measure(pipe, size: int, strength: float, steps: int, variety_steps: int, prompt: str = PROMPT) -> tuple[float, list]:  # noqa: ANN001
    import numpy as np

    images = []
    for seed in SEEDS:
        settings = dict(prompt=prompt, width=size, height=size, num_inference_steps=steps, guidance_scale=0.0,
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
            # How much this model reads the prompt at all: another prompt, the same 8 seeds.
            _, other = measure(pipe, size, 0.0, args.steps, args.variety_steps, OTHER_PROMPT)
            baseline = None
            for strength in args.strengths:
                start = time.perf_counter()
                distance, images = measure(pipe, size, strength, args.steps, args.variety_steps)
                if baseline is None:
                    baseline = images
                    pairs = zip(images, other, strict=True)
                    prompt_change = float(np.mean([np.abs(a.astype(float) - b.astype(float)).mean() for a, b in pairs]))
                    print(f"  (another prompt at the same seed changes the image by {prompt_change:.2f}/255 on this model)")
                pairs = zip(images, baseline, strict=True)
                same_seed = float(np.mean([np.abs(a.astype(float) - b.astype(float)).mean() for a, b in pairs]))
                print(f"  seed_variety {strength:<4g}: mean pairwise distance {distance:6.2f}/255 "
                      f"(change from strength {args.strengths[0]:g} at the same seed: {same_seed:5.2f}/255; "
                      f"{time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
