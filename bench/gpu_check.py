"""The 8 GB promise, checked: the full 6B Z-Image with random weights, int8, mmgp offload, under a VRAM cap.

Two stages, each a process of its own (a GPU run must start from a clean CUDA state):

    python bench/gpu_check.py build --workdir W            # random full-size weights as the shipped int8 files
    python bench/gpu_check.py run --workdir W --profile 4 --cap-gb 8 --size 1024 --steps 1

`build` writes, under W/ckpts, the files the shipped `z_image` preset looks for (DeepBeepMeep names):
the transformer and the Qwen3-4B text encoder quantized to int8 by the product's own code and saved in
the quanto format, the Flux VAE in bf16, their configs and a (small, offline) tokenizer. Weights are
random, N(0, 1/fan_in) like the test fixtures, so activations stay O(1) and the guards pass; only memory
and time mean anything. `run` caps the process at `--cap-gb` of the card
(`torch.cuda.set_per_process_memory_fraction`), loads through the product's API (`wgp.load_model`:
files, int8 loader, low-VRAM transforms, mmgp profile) and generates one image; it prints one JSON
line (also appended to W/results.jsonl): peak allocated, reserved and context, seconds per step, the
VAE decode and text encoding times, or the error (an out-of-memory under the cap is a result, not a crash).
`run --compile` turns the `compile` setting on and generates twice: the first generation compiles (its
timings, `compile_s` among them, come as first_*), the second is the steady one.

`build` makes the random weights and quantizes them on the GPU when there is one (`--build-device`; seconds
instead of minutes of CPU work for 10B parameters) and falls back to the CPU if that fails. Each row also goes
to `--results` when given (bench/gpu_check.sh collects them there for its table, bench/gpu_check_report.py).

`--tiny` uses the test fixtures' tiny configs: with `--device cpu` this is the dry run the test suite
makes (tests/test_gpu_check.py), the same code path without a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2**30
TRANSFORMER_FILE = "ZImageTurbo_quanto_bf16_int8.safetensors"
TEXT_ENCODER_FILE = "Qwen3/qwen3_quanto_bf16_int8.safetensors"
VAE_FILE, VAE_CONFIG_FILE = "ZImageTurbo_VAE_bf16.safetensors", "ZImageTurbo_VAE_bf16_config.json"
# The released Flux VAE (diffusers AutoencoderKL config) and Qwen3-4B (transformers config.json).
FLUX_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
QWEN3_4B = {
    "architectures": ["Qwen3ForCausalLM"],
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "attention_bias": False,
}


# -- build ----------------------------------------------------------------------------------------


def randomise_(model: torch.nn.Module) -> torch.nn.Module:
    """Matrices ~ N(0, 1/fan_in), norm weights 1, other vectors ~ N(0, 0.02), in place (any dtype)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, 1 / math.sqrt(p[0].numel()))
            elif "norm" in name:
                p.fill_(1)
            else:
                p.normal_(0, 0.02)
    return model


def _empty(build: Any, dtype: torch.dtype, device: str = "cpu") -> torch.nn.Module:
    """Build on meta, then allocate on `device` in `dtype` (no fp32 copy of 6B parameters on the way)."""
    with torch.device("meta"):
        model = build().to(dtype)
    return model.to_empty(device=device)


def build(workdir: Path, tiny: bool, device: str = "cpu") -> dict[str, Path]:
    """Write the int8 transformer and text encoder, the VAE, configs and tokenizer under workdir/ckpts.

    device: where the random weights are drawn and quantized (the files are the same either way)."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file
    from transformers import Qwen3Config, Qwen3Model

    from host.lowvram.quantize import quantize_model, save_quantized
    from models.z_image import tiny_z_image as tiny
    from models.z_image.facts_z_image import FACTS
    from models.z_image.transformer_z_image import ZImageConfig, ZImageTransformer

    ckpts = workdir / "ckpts"
    (ckpts / "Qwen3").mkdir(parents=True, exist_ok=True)
    bf16 = torch.bfloat16
    config = tiny.TINY_CONFIG if tiny else ZImageConfig()
    text_config = tiny.build_tiny_components(0).text_encoder.config.to_dict() if tiny else dict(QWEN3_4B)
    vae_config = dict(FLUX_VAE)
    if tiny:
        vae_config.update(block_out_channels=[8, 16, 16, 16], norm_num_groups=8, sample_size=64)
    paths = {}

    start = time.perf_counter()
    transformer = randomise_(_empty(lambda: ZImageTransformer(config), bf16, device))
    quantize_model(transformer, include=FACTS.quantize_pattern("transformer"), dtype=bf16)
    paths["transformer"] = save_quantized(transformer, ckpts / TRANSFORMER_FILE, dtype=bf16)
    del transformer
    _free(device)
    log(f"transformer: {time.perf_counter() - start:.1f} s on {device}")

    start = time.perf_counter()
    text_encoder = randomise_(_empty(lambda: Qwen3Model(Qwen3Config(**text_config)), bf16, device))
    quantize_model(text_encoder, include=FACTS.quantize_pattern("text_encoder"), dtype=bf16)
    paths["text_encoder"] = save_quantized(text_encoder, ckpts / TEXT_ENCODER_FILE, dtype=bf16, prefix="model.")
    del text_encoder
    _free(device)
    (ckpts / "Qwen3" / "config.json").write_text(json.dumps({**text_config, "architectures": ["Qwen3ForCausalLM"]}))
    tokenizer = tiny.build_tokenizer()  # offline: any token ids index the real-size embedding just as well
    tokenizer.save_pretrained(ckpts / "Qwen3")
    tokenizer.backend_tokenizer.model.save(str(ckpts / "Qwen3"))
    log(f"text encoder: {time.perf_counter() - start:.1f} s on {device}")

    vae = AutoencoderKL(**vae_config).to(bf16)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(ckpts / VAE_FILE))
    (ckpts / VAE_CONFIG_FILE).write_text(vae.to_json_string())
    return paths


def build_anywhere(workdir: Path, tiny: bool, device: str) -> tuple[dict[str, Path], str]:
    """`build` on `device`, or on the CPU when that fails (a GPU problem must not cost the profile runs);
    returns the paths and the device that did it."""
    if device != "cpu":
        try:
            return build(workdir, tiny, device), device
        except Exception as exc:  # any failure: the CPU build is the fallback
            log(f"build on {device} failed ({type(exc).__name__}: {exc}); building on the CPU instead")
            _free(device)
    return build(workdir, tiny, "cpu"), "cpu"


def _free(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# -- run ------------------------------------------------------------------------------------------


def run(
    workdir: Path, profile: str, cap_gb: float | None, size: int, steps: int, device: str, compile_: bool = False
) -> dict[str, Any]:
    """One generation through the product's API under the VRAM cap; the result as a dict.

    compile_: with the `compile` setting on, two generations: the first compiles (its timings, `compile_s`
    among them, are kept as first_*), the second is the steady one (the row's own timings)."""
    import wgp
    from host.device import vram_peak

    row: dict[str, Any] = {"stage": "profile", "profile": profile, "cap_gb": cap_gb, "size": size, "steps": steps, "device": device}
    row["compile"] = compile_
    if device.startswith("cuda"):
        total = torch.cuda.get_device_properties(device).total_memory
        row["gpu"] = torch.cuda.get_device_name(device)
        if cap_gb is not None:
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * GIB / total), device)
    try:
        start = time.perf_counter()
        model = wgp.load_model(
            "z_image",
            ckpts=workdir / "ckpts",
            offline=True,
            device=device,
            quantization="int8",
            profile=profile,
            resolution=f"{size}x{size}",
            num_inference_steps=steps,
            seed=1,
            **({"compile": True} if compile_ else {}),
        )
        row["load_s"] = round(time.perf_counter() - start, 2)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(device)
        for first in [True] * compile_ + [False]:
            model.generate(prompt="a photo of a red fox in the snow")
            timings = model.last_result.info["timings"]
            prefix = "first_" if first else ""
            row.update({prefix + k: round(v, 3) for k, v in timings.items() if isinstance(v, float)})
            if compile_:
                row[prefix + "compile_report"] = model.last_result.info.get("compile")
        if device.startswith("cuda"):
            peak = vram_peak(device)
            row.update(peak_allocated_gb=round(peak.allocated, 3), peak_reserved_gb=round(peak.reserved, 3))
            row.update(context_gb=round(peak.context, 3), fits_cap=cap_gb is None or peak.total <= cap_gb * GIB / 1e9)
        row["ok"] = True
    except Exception as exc:  # the row records any failure (an OOM under the cap is a finding)
        row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:2000], traceback=traceback.format_exc()[-4000:])
    finally:
        wgp.release_model()
    return row


def log(message: str) -> None:
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=["build", "run"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/wgp_gpu_check"))
    parser.add_argument("--tiny", action="store_true", help="the test fixtures' tiny configs (dry run)")
    parser.add_argument("--profile", default="4", help="mmgp profile 1-5 (auto on the CPU)")
    parser.add_argument("--cap-gb", type=float, default=8.0, help="VRAM the process may use (GiB); 0 = no cap")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--build-device", help="where build draws and quantizes the weights (default: --device)")
    parser.add_argument("--results", type=Path, help="also append the row (JSON line) to this file")
    parser.add_argument("--compile", action="store_true", help="run: the compile setting on, two generations")
    parser.add_argument("--compile-backend", help="torch.compile's default backend (the dry run's: aot_eager)")
    args = parser.parse_args(argv)
    if args.compile_backend:
        torch.compiler.set_default_backend(args.compile_backend)  # what the product's compile uses, given none
    if args.stage == "build":
        start = time.perf_counter()
        paths, where = build_anywhere(args.workdir, args.tiny, args.build_device or args.device)
        row = {"stage": "build", "ok": True, "build_s": round(time.perf_counter() - start, 1), "built_on": where,
               **{k: str(v) for k, v in paths.items()}}
        _record(row, args.results)
        return 0
    row = run(args.workdir, args.profile, args.cap_gb or None, args.size, args.steps, args.device, args.compile)
    row["tiny"] = args.tiny
    _record(row, args.workdir / "results.jsonl", args.results)
    return 0 if row["ok"] else 1


def _record(row: dict[str, Any], *files: Path | None) -> None:
    """Print the row as one JSON line and append it to each file given."""
    line = json.dumps(row)
    print(line, flush=True)
    for path in (f for f in files if f is not None):
        with path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    sys.exit(main())
