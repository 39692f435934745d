"""`compile` (host/compile.py) on the mid config: compile seconds, steady seconds per step uncompiled and compiled,
their ratio, and the largest pixel difference, in one process on the CPU.

    .venv/bin/python bench/bench_compile.py                     # mid config (bench_engine.py), 512x512, 4 steps, CFG
    .venv/bin/python bench/bench_compile.py --rounds 5 --threads 2 --folder /tmp/mid   # keep the model between runs

The model is bench/bench_engine.py's random mid model (dim 768, 8 layers, 1024 image tokens), built once in the
diffusers layout, loaded by our pipeline in fp32 with the host's CPU transforms, as bench_engine.py runs it. The
first compiled generation gives the compile seconds (the report's `compile_s`: the extra time of its denoiser
forwards over the steady ones) and its whole time; then uncompiled and compiled generations alternate round by
round (the uncompiled ones run the same model under `torch.compiler.set_stance("force_eager")`), so both see the
same machine, and the steady s/step are their medians. Inductor's on-disk cache (default
/tmp/torchinductor_$USER) makes a second run compile faster: `--cold` points it at an empty folder. The load
average is printed at the start and the end; on a shared machine read the ratio, not the seconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_average() -> str:
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


def load_ours(folder: Path):
    """Our pipeline on the mid folder with the host's CPU transforms (as bench_engine.py's "ours")."""
    import torch

    from host.lowvram import apply_lowvram
    from models.z_image.facts_z_image import FACTS
    from models.z_image.pipeline_z_image import LoadOptions, ZImageComponents, ZImagePipeline

    pipe = ZImagePipeline.from_components(ZImageComponents.from_diffusers_folder(folder), LoadOptions(dtype=torch.float32))
    apply_lowvram(pipe, {"device": "cpu", "dtype": torch.float32, "quantization": "fp32", "profile": "auto"}, {}, FACTS)
    return pipe, FACTS


def generate(pipe, settings: dict, eager: bool = False) -> tuple[np.ndarray, float, float]:
    """One generation: the image, its wall seconds and the denoise seconds per step."""
    import torch

    start = time.perf_counter()
    if eager:
        with torch.compiler.set_stance("force_eager"):
            result = pipe.generate(settings)
    else:
        result = pipe.generate(settings)
    wall = time.perf_counter() - start
    return np.asarray(result.images[0]).astype(np.int16), wall, result.timings["denoise_s"] / settings["num_inference_steps"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, help="mid model folder (built there when missing; default: a temporary one)")
    parser.add_argument("--rounds", type=int, default=3, help="timed generations of each kind (default 3)")
    parser.add_argument("--threads", type=int, help="torch threads (default: PyTorch's)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--cold", action="store_true", help="compile with an empty inductor cache (a first install)")
    args = parser.parse_args()
    if args.cold:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor_cold_")

    import torch

    from bench.bench_engine import MID, SETTINGS, build
    from host.compile import CompileTransform

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = {**SETTINGS, "width": args.size, "height": args.size}
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or Path(tmp) / "mid"
        if not (folder / "model_index.json").exists():
            build(folder)
        print(f"load average at start: {load_average()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
        print(f"mid config {MID['transformer']['dim']} dim, {MID['transformer']['n_layers']} layers; "
              f"{args.size}x{args.size}, {settings['num_inference_steps']} steps, guidance {settings['guidance_scale']}")
        pipe, facts = load_ours(folder)
        reference, eager_first, _ = generate(pipe, settings)  # warm-up (first-touch of weights, allocator)
        compiled = CompileTransform(facts)
        compiled.apply(pipe)
        image, first_wall, _ = generate(pipe, settings)
        report = compiled.last_report
        eager_steps, compiled_steps, diffs = [], [], [_max_diff(image, reference)]
        for _ in range(args.rounds):
            out, _, per_step = generate(pipe, settings, eager=True)
            eager_steps.append(per_step)
            diffs_eager = _max_diff(out, reference)
            out, _, per_step = generate(pipe, settings)
            compiled_steps.append(per_step)
            diffs.append(_max_diff(out, reference))
        compiled.remove(pipe)
    eager_s, compiled_s = statistics.median(eager_steps), statistics.median(compiled_steps)
    print(f"compile: {report.blocks} blocks, compile_s {report.compile_s:.1f} s "
          f"(first compiled generation {first_wall:.1f} s; first eager one {eager_first:.1f} s)")
    print(f"steady s/step: eager {eager_s:.3f}, compiled {compiled_s:.3f}, compiled / eager {compiled_s / eager_s:.3f} "
          f"(medians of {args.rounds}, alternated)")
    print(f"max pixel difference compiled vs eager: {max(diffs)}/255 (eager rerun vs eager: {diffs_eager}/255)")
    print(f"load average at end: {load_average()}")


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a - b).max())


if __name__ == "__main__":
    main()
