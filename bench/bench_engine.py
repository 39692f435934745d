"""Our Z-Image pipeline against diffusers' ZImagePipeline on the same weights, settings and seed.

One run builds a "mid" model (matrix work dominates: dim 768, 1024 image tokens), saves it with
diffusers' own save_pretrained, then runs each implementation in a fresh child process (so peak RSS is that
implementation's own: whole-process peak, working memory = peak RSS - RSS before the generation, resident size
after the image) and times them together in one more process, alternated round by round (a generation and its
PNG, wall and CPU seconds), so that both see the same machine. It reports medians, ours / theirs, the largest
pixel difference, and the fraction of this machine's fp32 matmul rate the transformer forward reaches (the
reference of bench/rates.py, shared with bench_transformer.py).

    .venv/bin/python bench/bench_engine.py                   # CPU, fp32, mid config
    .venv/bin/python bench/bench_engine.py --threads 1 --no-fraction   # steadier CPU seconds on a busy machine
    .venv/bin/python bench/bench_engine.py --fraction-only   # only the matmul-rate fraction (1-2 minutes)
    .venv/bin/python bench/bench_engine.py --compile         # also time "ours" with --compile (host/compile.py)

With --compile the timing process also runs "ours-compile": our pipeline with the `compile` transform over the same
CPU transforms. Its first generation compiles (the seconds are printed apart, not counted in its time), then it
alternates with the others; the memory rows stay the three implementations above.

CPU and fp32 only. The full-size 6B check on a CUDA GPU is bench/bench_transformer.py (one transformer step,
ours vs diffusers on the same tensors).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MID = {
    "transformer": dict(dim=768, n_layers=8, n_refiner_layers=2, n_heads=6, n_kv_heads=6, cap_feat_dim=1024,
                        axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512]),
    "text_encoder": dict(hidden_size=1024, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
                         head_dim=128, intermediate_size=3072),
    "vae_channels": (32, 64, 64, 64),
}
# ours: our pipeline with the host's CPU transforms (host/lowvram); ours-lowram: the same with the text encoder
# loaded for the prompt stage only (LoadOptions.keep_text_encoder=False), the host's own choice on the CPU.
IMPLS = ("diffusers", "ours", "ours-lowram")
SETTINGS = dict(prompt="a red fox in the snow, detailed fur, soft morning light", negative_prompt="blurry, low quality",
                width=512, height=512, num_inference_steps=4, guidance_scale=4.0, flow_shift=6.0, seed=7)


def build(folder: Path) -> None:
    """Write a random mid-size Z-Image in the diffusers layout."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from models.z_image.tiny_z_image import build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    text_encoder = Qwen3Model(Qwen3Config(vocab_size=len(tokenizer), **MID["text_encoder"]))
    transformer = ZImageTransformer2DModel(**MID["transformer"])
    with torch.no_grad():
        for p in transformer.parameters():
            p.normal_(0, 0.02)
    ch = MID["vae_channels"]
    vae = AutoencoderKL(latent_channels=16, block_out_channels=ch, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=16, scaling_factor=0.3611,
                        shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=6.0), vae=vae, text_encoder=text_encoder,
                          tokenizer=tokenizer, transformer=transformer)
    pipe.save_pretrained(folder)


def load_impl(impl: str, folder: Path):
    """Load one implementation from the mid folder: (pipeline, a function that generates the image)."""
    import torch

    if impl == "ours-compile":
        from host.compile import CompileTransform
        from models.z_image.facts_z_image import FACTS

        pipe, generate = load_impl("ours", folder)
        generate.compile = CompileTransform(FACTS)  # its last_report gives the compile seconds
        generate.compile.apply(pipe)
        return pipe, generate
    if impl.startswith("ours"):
        from host.lowvram import apply_lowvram
        from models.z_image.facts_z_image import FACTS
        from models.z_image.pipeline_z_image import LoadOptions, ZImageComponents, ZImagePipeline

        options = LoadOptions(dtype=torch.float32, keep_text_encoder=impl == "ours")
        pipe = ZImagePipeline.from_components(ZImageComponents.from_diffusers_folder(folder), options)
        # the transforms the host applies on the CPU (prompt cache, VAE tiling above 1024 px, black-image guard,
        # heap trim; no int8 or offload here): what a generation through the product runs
        apply_lowvram(pipe, {"device": "cpu", "dtype": torch.float32, "quantization": "fp32", "profile": "auto"},
                      {}, FACTS)

        def generate():
            return pipe.generate(SETTINGS).images[0]

        return pipe, generate
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=SETTINGS["flow_shift"])
    pipe.set_progress_bar_config(disable=True)
    s = SETTINGS

    def generate():
        return pipe(prompt=s["prompt"], negative_prompt=s["negative_prompt"], width=s["width"], height=s["height"],
                    num_inference_steps=s["num_inference_steps"], guidance_scale=s["guidance_scale"],
                    generator=torch.Generator("cpu").manual_seed(s["seed"])).images[0]

    return pipe, generate


def run_child(impl: str, folder: Path, out: Path, threads: int | None = None) -> None:
    """Load + generate (the image written as a PNG) with one implementation; write its times, memory and image.

    Memory (bytes): `rss_before` the resident size after loading (every weight read once), `peak_rss` the
    process's peak (ru_maxrss), `working` = peak_rss - rss_before (what the generation itself added), `rss_after`
    the resident size once the image is written. `cpu_s`: the process's CPU seconds (user + system).
    """
    import resource

    import numpy as np
    import torch

    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    pipe, generate = load_impl(impl, folder)
    load_s = time.perf_counter() - start
    _page_in(pipe)
    rss_before = _rss()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    image = generate()
    image.save(out.with_suffix(".png"))
    gen_s = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = after.ru_utime - usage.ru_utime + after.ru_stime - usage.ru_stime
    peak = after.ru_maxrss * 1024
    np.save(out.with_suffix(".npy"), np.asarray(image))
    out.write_text(json.dumps({"load_s": load_s, "generate_s": gen_s, "cpu_s": cpu_s, "peak_rss": peak,
                               "rss_before": rss_before, "working": peak - rss_before, "rss_after": _rss()}))


def time_together(folder: Path, rounds: int, threads: int | None, out: Path, compile_too: bool = False) -> None:
    """Generation time of diffusers and ours in one process, alternated round by round (ABBA...), so that both
    see the same machine; each timed generation starts with an empty prompt cache and writes its PNG.
    Writes {"times": {impl: [(wall s, CPU s), ...]}}, with compile_too also ours-compile's times, its
    "compile_s" (None when it ran eager) and "compile_max_diff" (its last image against diffusers', in 1/255)."""
    import resource

    import torch

    from host.lowvram.prompt_cache import shared_cache

    if threads:
        torch.set_num_threads(threads)
    impls = (*IMPLS, "ours-compile") if compile_too else IMPLS
    generators = {impl: load_impl(impl, folder)[1] for impl in impls}
    times: dict[str, list[tuple[float, float]]] = {impl: [] for impl in impls}
    extra: dict[str, float] = {}
    for impl in impls:  # warm-up: weights paged in, kernels chosen (and, for ours-compile, the blocks compiled)
        generators[impl]()
        if impl == "ours-compile":
            report = generators[impl].compile.last_report
            extra["compile_s"] = report.compile_s if report is not None and report.used else None
    for round_ in range(rounds):
        for impl in impls if round_ % 2 == 0 else impls[::-1]:
            shared_cache().clear()  # ours-lowram then loads its text encoder for the prompt, as a new prompt would
            usage, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            generators[impl]().save(out.with_suffix(f".{impl}.png"))
            wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
            times[impl].append((wall, after.ru_utime - usage.ru_utime + after.ru_stime - usage.ru_stime))
    if compile_too:
        import numpy as np
        from PIL import Image

        pixels = {impl: np.asarray(Image.open(out.with_suffix(f".{impl}.png"))).astype(int) for impl in ("diffusers", "ours-compile")}
        extra["compile_max_diff"] = int(np.abs(pixels["ours-compile"] - pixels["diffusers"]).max())
    out.write_text(json.dumps({"times": times, **extra}))


def _page_in(pipe) -> None:
    """Read every weight once, so that memory-mapped weights count in the RSS before the generation (both
    implementations load them lazily) and the working memory is what the generation itself adds."""
    import torch

    with torch.no_grad():
        for name in ("text_encoder", "transformer", "vae"):
            module = getattr(pipe, name, None)
            for param in module.parameters() if module is not None else ():
                param.sum()


def _rss() -> int:
    """This process's resident size now, in bytes (Linux /proc)."""
    import os

    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def forward_fraction(folder: Path, reps: int = 3) -> dict:
    """The rate our transformer forward achieves vs this machine's matmul rate (bench/rates.py), same process.

    The forward: batch 2 (CFG) at 512x512 (1024 image tokens) with a 20-token caption (padded to 32), best of
    `reps` after a warm-up, a burst of reference matmuls before each.
    """
    import torch

    from bench.rates import MatmulReference, time_alternating
    from models.z_image.loading_z_image import load_transformer

    model = load_transformer(folder / "transformer", None, torch.float32, "cpu").eval()
    cfg = model.config
    x, t, caps = torch.randn(2, 16, 64, 64), torch.rand(2), [torch.randn(20, cfg.cap_feat_dim)] * 2
    reference = MatmulReference("cpu", torch.float32)
    with torch.no_grad():
        seconds, _ = time_alternating({"forward": lambda: model(x, t, caps)}, "cpu", reps, reference)["forward"]
    flops = transformer_flops(cfg, batch=2, img_tokens=1024, cap_tokens=32)
    rate = reference.rate
    return {"matmul_gflops": rate / 1e9, "forward_gflops": flops / seconds / 1e9, "fraction": flops / seconds / rate,
            "reference": reference.describe(), "reps": reps}


def transformer_flops(cfg, batch: int, img_tokens: int, cap_tokens: int) -> float:
    """Multiply-adds x2 of the linear layers and attention of one forward."""
    d, f = cfg.dim, cfg.ffn_dim
    per_token_block = 2 * (4 * d * d + 3 * d * f)
    unified = img_tokens + cap_tokens
    linear = per_token_block * (cfg.n_layers * unified + cfg.n_refiner_layers * (img_tokens + cap_tokens))
    attn = 4 * d * (cfg.n_layers * unified**2 + cfg.n_refiner_layers * (img_tokens**2 + cap_tokens**2))
    return batch * (linear + attn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=3, metavar=("IMPL", "FOLDER", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--timing-child", nargs=2, metavar=("FOLDER", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3, help="runs per implementation, alternated; medians reported")
    parser.add_argument("--threads", type=int, help="torch threads in each run (default: torch's own choice)")
    parser.add_argument("--fraction-only", action="store_true", help="only the forward's share of the matmul rate")
    parser.add_argument("--no-fraction", action="store_true", help="skip the forward's share of the matmul rate")
    parser.add_argument("--compile", action="store_true", help="also time ours with --compile (compile seconds apart)")
    args = parser.parse_args()
    threads = ["--threads", str(args.threads)] if args.threads else []
    if args.child:
        run_child(args.child[0], Path(args.child[1]), Path(args.child[2]), args.threads)
        return
    if args.timing_child:
        time_together(Path(args.timing_child[0]), args.rounds, args.threads, Path(args.timing_child[1]), args.compile)
        return
    if args.fraction_only:
        with tempfile.TemporaryDirectory() as tmp:
            build(Path(tmp) / "mid")
            print_fraction(forward_fraction(Path(tmp) / "mid"))
        return
    import os

    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "mid"
        build(folder)
        runs: dict[str, list[dict]] = {impl: [] for impl in IMPLS}
        load = [os.getloadavg()[0]]
        for round_ in range(args.rounds):  # memory: each implementation alone in a fresh process, alternated
            for impl in IMPLS if round_ % 2 == 0 else IMPLS[::-1]:
                out = Path(tmp) / f"{impl}{round_}.json"
                subprocess.run([sys.executable, __file__, "--child", impl, str(folder), str(out), *threads], check=True)
                runs[impl].append(json.loads(out.read_text()) | {"image": np.load(out.with_suffix(".npy"))})
                load.append(os.getloadavg()[0])
        out = Path(tmp) / "timing.json"  # time: all of them in one process, alternated
        subprocess.run([sys.executable, __file__, "--timing-child", str(folder), str(out), "--rounds", str(args.rounds),
                        *threads, *(["--compile"] if args.compile else [])], check=True)
        timing = json.loads(out.read_text())
        load.append(os.getloadavg()[0])
        frac = None if args.no_fraction else forward_fraction(folder)
    print_table(runs, timing, args, load)
    if frac is not None:
        print_fraction(frac)


ROWS = (  # key, label, scale: from the separate processes
    ("load_s", "load (s)", 1), ("peak_rss", "whole-process peak RSS (MB)", 1e-6),
    ("working", "working memory (MB)", 1e-6), ("rss_after", "resident after the image (MB)", 1e-6),
)


def print_table(runs: dict[str, list[dict]], timing: dict[str, list], args: argparse.Namespace, load: list[float]) -> None:
    """Medians per implementation, ours / diffusers, and the largest pixel difference."""
    import statistics

    import numpy as np

    threads = args.threads or "torch's default"
    print(f"mid config: {json.dumps(MID['transformer'])}, 512x512 (1024 image tokens), "
          f"{SETTINGS['num_inference_steps']} steps, CFG {SETTINGS['guidance_scale']}, fp32, CPU, {threads} threads; "
          f"medians of {args.rounds} alternated runs; load average {min(load):.1f}-{max(load):.1f} during the bench")
    print("time: the three in one process, alternated, each generation + its PNG; memory: each alone in a fresh "
          "process; working memory = peak RSS - RSS before the generation (weights read); ours-lowram = the text "
          "encoder loaded for each new prompt only (the host's CPU default)")
    print("| | diffusers | ours | ratio | ours-lowram | ratio |\n|---|---|---|---|---|---|")
    median = {impl: {key: statistics.median(r[key] for r in rs) for key, _, _ in ROWS} for impl, rs in runs.items()}
    for impl, pairs in timing["times"].items():
        median.setdefault(impl, {})
        median[impl]["wall_s"] = statistics.median(w for w, _ in pairs)
        median[impl]["cpu_s"] = statistics.median(c for _, c in pairs)
    ref = median["diffusers"]
    rows = (ROWS[0], ("wall_s", "generate + PNG, wall (s)", 1), ("cpu_s", "generate + PNG, CPU (s)", 1), *ROWS[1:])
    for key, label, scale in rows:
        cells = [f"{ref[key] * scale:.2f}"]
        for impl in ("ours", "ours-lowram"):
            cells += [f"{median[impl][key] * scale:.2f}", f"{median[impl][key] / ref[key]:.3f}"]
        print(f"| {label} | " + " | ".join(cells) + " |")
    if "ours-compile" in median:
        compiled = median["ours-compile"]
        compile_s = timing["compile_s"]
        print(f"ours --compile: generate + PNG, wall {compiled['wall_s']:.2f} s ({compiled['wall_s'] / ref['wall_s']:.3f} of "
              f"diffusers), CPU {compiled['cpu_s']:.2f} s ({compiled['cpu_s'] / ref['cpu_s']:.3f}); compile "
              + (f"{compile_s:.1f} s in its first generation, not counted" if compile_s is not None else "not used (eager)")
              + f"; max pixel difference vs diffusers {timing['compile_max_diff']}/255")
    for impl in ("ours", "ours-lowram"):
        diff = max(int(np.abs(r["image"].astype(int) - d["image"].astype(int)).max())
                   for r, d in zip(runs[impl], runs["diffusers"], strict=True))
        print(f"max pixel difference {impl} vs diffusers: {diff}/255")


def print_fraction(frac: dict) -> None:
    print(f"matmul rate {frac['matmul_gflops']:.1f} GFLOP/s ({frac['reference']}); transformer forward "
          f"(batch 2, 512x512, best of {frac['reps']}) {frac['forward_gflops']:.1f} GFLOP/s = "
          f"{100 * frac['fraction']:.0f}% of it")


if __name__ == "__main__":
    main()
