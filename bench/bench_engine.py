"""Our Z-Image pipeline against diffusers' ZImagePipeline on the same weights, settings and seed.

One run builds a "mid" model (matrix work dominates: dim 768, 1024 image tokens), saves it with
diffusers' own save_pretrained, then runs each implementation in a fresh child process (so peak RSS
is that implementation's own) and reports time and peak-memory ratios (ours / theirs), the largest
pixel difference, and the fraction of this machine's fp32 matmul rate the transformer forward reaches
(the reference of bench/rates.py, shared with bench_transformer.py).

    .venv/bin/python bench/bench_engine.py                   # CPU, fp32, mid config
    .venv/bin/python bench/bench_engine.py --fraction-only   # only the matmul-rate fraction (1-2 minutes)

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
# ours-lowram: the text encoder is loaded for the prompt stage only (LoadOptions.keep_text_encoder=False).
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


def run_child(impl: str, folder: Path, out: Path) -> None:
    """Load + generate with one implementation; write timings, peak RSS and the image."""
    import resource

    import numpy as np
    import torch

    torch.set_num_threads(torch.get_num_threads())
    start = time.perf_counter()
    if impl.startswith("ours"):
        from models.z_image.pipeline_z_image import LoadOptions, ZImageComponents, ZImagePipeline

        options = LoadOptions(dtype=torch.float32, keep_text_encoder=impl == "ours")
        pipe = ZImagePipeline.from_components(ZImageComponents.from_diffusers_folder(folder), options)
        load_s = time.perf_counter() - start
        t0 = time.perf_counter()
        image = pipe.generate(SETTINGS).images[0]
    else:
        from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

        pipe = ZImagePipeline.from_pretrained(folder, dtype=torch.float32)
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=SETTINGS["flow_shift"])
        pipe.set_progress_bar_config(disable=True)
        load_s = time.perf_counter() - start
        t0 = time.perf_counter()
        s = SETTINGS
        image = pipe(prompt=s["prompt"], negative_prompt=s["negative_prompt"], width=s["width"], height=s["height"],
                     num_inference_steps=s["num_inference_steps"], guidance_scale=s["guidance_scale"],
                     generator=torch.Generator("cpu").manual_seed(s["seed"])).images[0]
    gen_s = time.perf_counter() - t0
    np.save(out.with_suffix(".npy"), np.asarray(image))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out.write_text(json.dumps({"load_s": load_s, "generate_s": gen_s, "peak_rss": peak}))


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
    parser.add_argument("--rounds", type=int, default=2, help="runs per implementation; the best is reported")
    parser.add_argument("--fraction-only", action="store_true", help="only the forward's share of the matmul rate")
    args = parser.parse_args()
    if args.child:
        run_child(args.child[0], Path(args.child[1]), Path(args.child[2]))
        return
    if args.fraction_only:
        with tempfile.TemporaryDirectory() as tmp:
            build(Path(tmp) / "mid")
            print_fraction(forward_fraction(Path(tmp) / "mid"))
        return
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "mid"
        build(folder)
        results: dict[str, dict] = {}
        for round_ in range(args.rounds):  # alternate the two so machine noise hits both alike
            for impl in IMPLS:
                out = Path(tmp) / f"{impl}{round_}.json"
                subprocess.run([sys.executable, __file__, "--child", impl, str(folder), str(out)], check=True)
                run = json.loads(out.read_text()) | {"image": np.load(out.with_suffix(".npy"))}
                best = results.setdefault(impl, run)
                for key in ("load_s", "generate_s", "peak_rss"):
                    best[key] = min(best[key], run[key])
        frac = forward_fraction(folder)
    ref = results["diffusers"]
    print(f"mid config: {json.dumps(MID['transformer'])}, 512x512 (1024 image tokens), 4 steps, CFG 4.0, fp32, "
          f"CPU, best of {args.rounds}")
    print(f"{'':16}{'diffusers':>11}{'ours':>9}{'ratio':>8}{'ours-lowram':>13}{'ratio':>8}")
    for key, label, scale in (("load_s", "load (s)", 1), ("generate_s", "generate (s)", 1),
                              ("peak_rss", "peak RSS (MB)", 1e-6)):
        row = f"{label:16}{ref[key] * scale:11.2f}"
        for impl, width in (("ours", 9), ("ours-lowram", 13)):
            row += f"{results[impl][key] * scale:{width}.2f}{results[impl][key] / ref[key]:8.3f}"
        print(row)
    for impl in ("ours", "ours-lowram"):
        diff = int(np.abs(results[impl]["image"].astype(int) - ref["image"].astype(int)).max())
        print(f"max pixel difference {impl} vs diffusers: {diff}/255")
    print_fraction(frac)


def print_fraction(frac: dict) -> None:
    print(f"matmul rate {frac['matmul_gflops']:.1f} GFLOP/s ({frac['reference']}); transformer forward "
          f"(batch 2, 512x512, best of {frac['reps']}) {frac['forward_gflops']:.1f} GFLOP/s = "
          f"{100 * frac['fraction']:.0f}% of it")


if __name__ == "__main__":
    main()
