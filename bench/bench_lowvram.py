"""Low-VRAM measurements on this machine: load peak RSS vs file size, int8 quality and speed, VAE decode
memory, and the planner's CPU prediction against measured peak RSS.

    .venv/bin/python bench/bench_lowvram.py            # all, CPU fp32 (prints a Markdown table)
    .venv/bin/python bench/bench_lowvram.py --vae      # only the VAE decode memory
    .venv/bin/python bench/bench_lowvram.py --forward  # only the mid config's forward table (fp32, int8)

Each memory case runs in a fresh subprocess, so its peak RSS (VmHWM) is its own; the figure is the
peak minus the RSS after imports. Random weights in the real layouts; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The engine bench's mid config (bench_engine.py MID) for quality and speed; a wider one for load memory.
MID = dict(dim=768, n_layers=8, n_refiner_layers=2, n_heads=6, n_kv_heads=6, cap_feat_dim=1024, axes_dims=[32, 48, 48])
WIDE = dict(MID, dim=1536, n_heads=12, n_kv_heads=12)
FLUX_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
)  # fmt: skip


def rss_gb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 1e9


def peak_gb() -> float:
    """This process's peak RSS (VmHWM: reset by exec, unlike ru_maxrss, which a child inherits)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def write_model(folder: Path, config: dict) -> dict[str, Path]:
    """fp32 file, int8 file with fp32 full-precision parts, int8 file with bf16 parts (Wan2GP's)."""
    import torch
    from safetensors.torch import save_file

    from host.lowvram.quantize import quantize_model, save_quantized
    from models.z_image.facts_z_image import FACTS
    from models.z_image.tiny_z_image import _randomise
    from models.z_image.transformer_z_image import ZImageConfig, ZImageTransformer

    folder.mkdir(parents=True, exist_ok=True)
    model = ZImageTransformer(ZImageConfig(**config))
    _randomise(model, 0)
    paths = {"fp32": folder / "model_fp32.safetensors"}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, paths["fp32"])
    (folder / "config.json").write_text(json.dumps(ZImageConfig(**config).to_dict()))
    quantize_model(model, include=FACTS.quantize_pattern("transformer"))
    paths["int8"] = save_quantized(model, folder / "model_int8.safetensors", dtype=None)
    paths["int8_bf16"] = save_quantized(model, folder / "model_quanto_bf16_int8.safetensors", dtype=torch.bfloat16)
    return paths


def case_load(path: str) -> dict:
    """Load a transformer file for fp32 compute; peak RSS over the RSS after imports."""
    import torch

    from host.lowvram.quantize import load_quanto
    from models.z_image import loading_z_image as loading

    loading.register_quantized_loader(load_quanto)
    base = rss_gb()
    start = time.perf_counter()
    model = loading.load_transformer(Path(path), None, torch.float32)
    for tensor in model.state_dict().values():  # read every page: the figure includes the weights themselves
        (tensor._data if hasattr(tensor, "_data") else tensor).float().sum()
    return {
        "load_s": time.perf_counter() - start,
        "peak_gb": peak_gb() - base,
        "params": sum(1 for _ in model.parameters()),
    }


def case_forward(path: str, quantization: str, size: int) -> dict:
    """Load + one forward at size x size (fp32 activations): peak RSS, time, output.

    quantization: "fp32" (the fp32 file as is), "int8" (the fp32 file quantized on the fly) or "int8-file"
    (an int8 quanto file, read without a full-precision copy).
    """
    import torch

    from host.lowvram.quantize import load_quanto, quantize_model
    from models.z_image import loading_z_image as loading
    from models.z_image.facts_z_image import FACTS

    loading.register_quantized_loader(load_quanto)
    base = rss_gb()
    model = loading.load_transformer(Path(path), None, torch.float32)
    if quantization == "int8":
        quantize_model(model, include=FACTS.quantize_pattern("transformer"))
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, size // 8, size // 8, generator=g)
    caption = [torch.randn(32, model.config.cap_feat_dim, generator=g)]
    t = torch.tensor([0.5])
    with torch.no_grad():
        model(latents, t, caption)  # warm-up
        start = time.perf_counter()
        out = model(latents, t, caption)
        seconds = time.perf_counter() - start
    torch.save(out, Path(path).with_name(f"out_{quantization}.pt"))
    return {"forward_s": seconds, "peak_gb": peak_gb() - base}


def case_vae(size: int, walk: str = "stock") -> dict:
    """Decode a size x size image with the Flux VAE architecture (random weights), fp32, channels-last as the
    pipeline decodes on the CPU: activation peak. walk: "stock" (diffusers' Decoder.forward) or "lean"
    (host/lowvram/lean_decode.py, what the host runs)."""
    import functools

    import torch
    from diffusers import AutoencoderKL

    from host.lowvram.lean_decode import lean_decoder_forward

    torch.manual_seed(0)
    vae = AutoencoderKL(**FLUX_VAE).eval()
    if walk == "lean":
        vae.decoder.forward = functools.partial(lean_decoder_forward, vae.decoder)
    base = rss_gb()
    z = torch.randn(1, 16, size // 8, size // 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        start = time.perf_counter()
        vae.decode(z, return_dict=False)
    return {
        "decode_s": time.perf_counter() - start,
        "peak_gb": peak_gb() - base,
        "params": sum(p.numel() for p in vae.parameters()),
    }


def run_case(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--case", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_vae() -> list[str]:
    rows = [
        "| VAE decode (Flux VAE, fp32, CPU, channels-last) | walk | peak RSS over baseline | bytes per pixel | seconds |",
        "|---|---|---|---|---|",
    ]
    for size in (256, 512):
        for walk in ("stock", "lean"):
            r = run_case("vae", str(size), walk)
            rows.append(
                f"| {size}x{size} | {walk} | {r['peak_gb']:.3f} GB | {r['peak_gb'] * 1e9 / size**2:.0f} | "
                f"{r['decode_s']:.1f} |"
            )
    return rows


def bench_load(folder: Path) -> list[str]:
    rows = ["| case | file size | peak RSS over baseline | ratio | seconds |", "|---|---|---|---|---|"]
    wide = write_model(folder / "wide", WIDE)
    for name, path in wide.items():
        size = path.stat().st_size / 1e9
        r = run_case("load", str(path))
        ratio = r["peak_gb"] / size
        peak, seconds = r["peak_gb"], r["load_s"]
        rows.append(f"| load {name} (dim 1536) | {size:.2f} GB | {peak:.2f} GB | {ratio:.2f} x | {seconds:.2f} |")
    return rows


# (label, case quantization, file, the planner's weight format for it)
FORWARD_CASES = (
    ("fp32 file", "fp32", "fp32", "fp32"),
    ("int8 file (fp32 scales and full-precision parts)", "int8-file", "int8", "int8"),
    ("int8 quantized on the fly from the fp32 file", "int8", "fp32", "int8"),
)


def bench_forward(folder: Path) -> list[str]:
    """The mid config at 512x512: seconds, measured peak RSS, and the planner's own CPU prediction
    (`cpu_peak_rss_gb` for that weight format: weights + one forward's activations)."""
    import torch

    from host.lowvram.planner import ModelSizes, PartSize, cpu_peak_rss_gb
    from host.lowvram.quantize import quantize_model
    from models.z_image import loading_z_image as loading
    from models.z_image.facts_z_image import FACTS

    mid = write_model(folder / "mid", MID)
    results = {case: run_case("forward", str(mid[file]), case, "512") for _, case, file, _ in FORWARD_CASES}
    ref = torch.load(mid["fp32"].with_name("out_fp32.pt"))
    errors = {case: float((torch.load(mid["fp32"].with_name(f"out_{case}.pt")) - ref).norm() / ref.norm())
              for case in ("int8", "int8-file")}  # fmt: skip
    model = loading.load_transformer(mid["fp32"], None, torch.float32)
    total = sum(p.numel() for p in model.parameters())
    quantize_model(model, include=FACTS.quantize_pattern("transformer"))
    full = sum(p.numel() for p in model.parameters() if p.dtype.is_floating_point and type(p) is torch.nn.Parameter)
    # The released model's patch, VAE scale and caption padding (Z-Image's facts); the widths are MID's.
    sizes = ModelSizes(
        PartSize(total, total - full), PartSize(0, 0), 0, MID["dim"], int(MID["dim"] / 3 * 8), 0,
        patch=FACTS.patch, vae_scale=FACTS.latent.pixels_per_latent, token_multiple=FACTS.text_token_multiple,
    )
    rows = [
        "| mid config, 512x512, one forward | seconds | peak RSS (load + forward) | planner prediction |",
        "|---|---|---|---|",
    ]
    for label, case, _, planner_format in FORWARD_CASES:
        r = results[case]
        predicted = cpu_peak_rss_gb(sizes, 512, 512, planner_format)
        rows.append(f"| {label} | {r['forward_s']:.3f} | {r['peak_gb']:.3f} GB | {predicted:.3f} GB ({planner_format}) |")
    rows.append(
        f"\nint8 vs fp32 output: relative L2 error {errors['int8']:.4f} (on the fly), {errors['int8-file']:.4f} (int8 file)"
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--vae", action="store_true", help="only the VAE decode memory")
    parser.add_argument("--forward", action="store_true", help="only the mid config's forward table")
    args = parser.parse_args()
    if args.case:
        name, *rest = args.case
        fn = {"load": case_load, "forward": case_forward, "vae": case_vae}[name]
        print(json.dumps(fn(*[int(a) if a.isdigit() else a for a in rest])))
        return
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, fp32")
    with tempfile.TemporaryDirectory() as tmp:
        if args.forward:
            rows = bench_forward(Path(tmp))
        else:
            rows = bench_vae()
            if not args.vae:
                rows += [""] + bench_load(Path(tmp)) + [""] + bench_forward(Path(tmp))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
