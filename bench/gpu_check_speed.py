"""The GPU check's speed stages: the full 6B transformer step, ours against diffusers, LoRA, compile, attention.

Each stage is a process of its own (bench/gpu_check.sh gives each one a time limit), builds the transformer
with random bf16 weights on the GPU and appends its rows (JSON lines) to `--results`:

    python bench/gpu_check_speed.py transformer --results R   # (a) ours vs diffusers, fraction of the floor
    python bench/gpu_check_speed.py lora --results R          # (c) a random rank-32 LoRA through host/lora
    python bench/gpu_check_speed.py compile --results R       # (d) torch.compile of the repeated blocks
    python bench/gpu_check_speed.py attention --results R     # (e) every attention backend the host offers
    python bench/gpu_check_speed.py vae --results R           # (f) the Flux VAE decode, stock vs the lean walk

One step is one forward of the guidance batch: 2 rows (CFG: one image, two different 512-token captions; in (e) the
second is 128 tokens),
1024x1024 (4096 image tokens), t = 0.5, bf16. s/step is the best of `--reps` rounds after a warm-up.
The floor is 2 x transformer_flops(batch 1) (bench/bench_engine.py: the multiply-adds x 2 of the blocks'
Linears, q k v out w1 w2 w3, and of attention's two products, over the 30 layers on image + caption tokens,
the 2 noise-refiner blocks on image tokens and the 2 context-refiner blocks on caption tokens; embedders,
final layer, modulation, norms, RoPE and softmax are left out: 62.5 TFLOP per forward at this shape) divided
by the card's measured bf16 matmul rate (bench/rates.py MatmulReference, bursts between the timed rounds).
Our forward runs the noise refiner once for the two guidance rows (it never sees the caption): 3.4 TFLOP
fewer per step than the count's 125.0 (2 blocks over 4096 image tokens for one row), so ours could in
principle reach 103% of that floor.

`--dry-run` runs the same code with the test fixtures' tiny config on the CPU in fp32 at 64x64 with a
32-token caption, compiling with the aot_eager backend (tests/test_gpu_check.py); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import logging
import math
import re
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_engine import transformer_flops  # noqa: E402
from bench.gpu_check import randomise_  # noqa: E402
from bench.rates import MatmulReference, time_alternating, time_call  # noqa: E402

log = logging.getLogger("gpu_check")
STAGES = ("transformer", "lora", "compile", "attention", "vae")
BACKENDS = ("sdpa", "flash", "sage", "sage2")  # the host setting `attention` (host/settings.py), auto aside
# Every attention and FFN Linear of the blocks: what a full LoRA trains.
LORA_TARGETS = re.compile(r"(layers|noise_refiner|context_refiner)\.\d+\.(attention\.(to_q|to_k|to_v|to_out\.0)|feed_forward\.w[123])$")


@dataclass(frozen=True)
class Shape:
    """What one step computes, and where."""

    size: int  # image side in pixels
    caption: int  # caption tokens per guidance row
    dtype: torch.dtype
    device: str
    reps: int  # timed rounds (even: the order alternates)
    dry_run: bool

    @property
    def image_tokens(self) -> int:
        return (self.size // 16) ** 2  # VAE scale 8, then 2x2 patches


FULL = dict(size=1024, caption=512, dtype=torch.bfloat16, reps=4)
DRY = dict(size=64, caption=32, dtype=torch.float32, reps=2)


def make_shape(dry_run: bool, device: str) -> Shape:
    return Shape(device=device, dry_run=dry_run, **(DRY if dry_run else FULL))


def model_config(shape: Shape) -> Any:
    from models.z_image.tiny_z_image import TINY_CONFIG
    from models.z_image.transformer_z_image import ZImageConfig

    return TINY_CONFIG if shape.dry_run else ZImageConfig()


def build_ours(shape: Shape) -> torch.nn.Module:
    """Our transformer with random weights (N(0, 1/fan_in): activations stay O(1)), built on the device."""
    from models.z_image.transformer_z_image import ZImageTransformer

    torch.manual_seed(0)
    with torch.device("meta"):
        model = ZImageTransformer(model_config(shape)).to(shape.dtype)
    return randomise_(model.to_empty(device=shape.device)).eval()


def build_pair(shape: Shape) -> tuple[torch.nn.Module, torch.nn.Module]:
    """diffusers' ZImageTransformer2DModel with random weights, and ours holding the very same tensors: its
    state dict goes through our loader's key conversion (convert_z_image.convert_state_dict) and is assigned,
    not copied."""
    from diffusers import ZImageTransformer2DModel

    from models.z_image.convert_z_image import convert_state_dict
    from models.z_image.transformer_z_image import ZImageTransformer

    cfg = model_config(shape)
    torch.manual_seed(0)
    with torch.device("meta"):
        ref = ZImageTransformer2DModel(**cfg.to_dict()).to(shape.dtype)
        ours = ZImageTransformer(cfg).to(shape.dtype)
    ref = randomise_(ref.to_empty(device=shape.device)).eval()
    result = ours.load_state_dict(convert_state_dict(ref.state_dict()), strict=True, assign=True)
    log.info("ours from diffusers' state dict: missing %s, unexpected %s", result.missing_keys, result.unexpected_keys)
    return ours.eval(), ref


def cfg_inputs(shape: Shape, cap_dim: int, negative: int | None = None) -> SimpleNamespace:
    """The guidance batch: one latent twice, t = 0.5 twice, two different captions of `shape.caption` tokens
    (`negative`: the second caption's length instead, a shorter negative prompt: the batch is then padded and
    masked, as in most Base generations)."""
    gen = torch.Generator("cpu").manual_seed(1)
    side = shape.size // 8
    x = torch.randn(1, 16, side, side, generator=gen).to(shape.device, shape.dtype).repeat(2, 1, 1, 1)
    lengths = (shape.caption, shape.caption if negative is None else negative)
    caps = [torch.randn(n, cap_dim, generator=gen).to(shape.device, shape.dtype) for n in lengths]
    return SimpleNamespace(x=x, t=torch.full((2,), 0.5, device=shape.device), caps=caps)


def ours_step(model: torch.nn.Module, inp: SimpleNamespace) -> Callable[[], torch.Tensor]:
    return lambda: model(inp.x, inp.t, inp.caps)


def diffusers_step(model: torch.nn.Module, inp: SimpleNamespace) -> Callable[[], torch.Tensor]:
    """diffusers takes a list of (C, F, H, W) latents and returns a list of the same."""
    latents = list(inp.x.unsqueeze(2).unbind(0))
    return lambda: torch.stack(model(latents, inp.t, inp.caps, return_dict=False)[0]).squeeze(2)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp32."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def reference(shape: Shape) -> MatmulReference:
    ref = MatmulReference(shape.device, shape.dtype)
    if shape.dry_run:
        ref.n = 256  # the CPU reference's n = 3072 takes seconds per burst on a small machine
    return ref


def floor_fields(shape: Shape, cfg: Any, rate: float, seconds: dict[str, float]) -> dict[str, Any]:
    """The FLOP floor of one guidance step at the measured matmul rate, and each time as a fraction of it."""
    per_forward = transformer_flops(cfg, batch=1, img_tokens=shape.image_tokens, cap_tokens=32 * math.ceil(shape.caption / 32))
    floor_s = 2 * per_forward / rate
    return {
        "tflop_per_forward": round(per_forward / 1e12, 3),
        "matmul_tflops": round(rate / 1e12, 2),
        "floor_s": round(floor_s, 6),
        **{f"{name}_of_floor": round(floor_s / s, 3) for name, s in seconds.items()},
    }


# -- stages -----------------------------------------------------------------------------------------


def stage_transformer(shape: Shape) -> list[dict[str, Any]]:
    """(a) ours vs diffusers on the same tensors, alternating rounds, matmul bursts between them."""
    ours, ref = build_pair(shape)
    inp = cfg_inputs(shape, ours.config.cap_feat_dim)
    calls = {"ours": ours_step(ours, inp), "diffusers": diffusers_step(ref, inp)}
    rate_ref = reference(shape)
    with torch.no_grad():
        agree = rel_diff(calls["ours"](), calls["diffusers"]())
        timed = time_alternating(calls, shape.device, shape.reps, rate_ref)
    row = {"stage": "transformer", "ok": True, "rel_diff": round(agree, 6), "reps": shape.reps}
    for name, (seconds, peak) in timed.items():
        row.update({f"{name}_s": round(seconds, 4), f"{name}_peak_gb": round(peak / 1e9, 2)})
    row["ratio"] = round(row["ours_s"] / row["diffusers_s"], 3)
    row.update(floor_fields(shape, ours.config, rate_ref.rate, {"ours": row["ours_s"], "diffusers": row["diffusers_s"]}))
    return [row]


def write_random_lora(model: torch.nn.Module, path: Path, rank: int, dtype: torch.dtype) -> int:
    """A PEFT/diffusers-style LoRA file (transformer.<module>.lora_A/B.weight) on every attention and FFN Linear;
    returns the number of modules. down ~ N(0, 1/in), up ~ N(0, 0.01^2): a visible but small change."""
    from safetensors.torch import save_file

    gen = torch.Generator("cpu").manual_seed(2)
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and LORA_TARGETS.search(name):
            out_f, in_f = module.out_features, module.in_features
            state[f"transformer.{name}.lora_A.weight"] = (torch.randn(rank, in_f, generator=gen) / math.sqrt(in_f)).to(dtype)
            state[f"transformer.{name}.lora_B.weight"] = (torch.randn(out_f, rank, generator=gen) * 0.01).to(dtype)
    save_file(state, str(path))
    return len(state) // 2


def stage_lora(shape: Shape, workdir: Path, rank: int) -> list[dict[str, Any]]:
    """(c) s/step without, with (runtime hooks, the product's default), and without again; best of each."""
    from host.lora import LoraTransform
    from host.registry import discover

    model = build_ours(shape)
    inp = cfg_inputs(shape, model.config.cap_feat_dim)
    step = ours_step(model, inp)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"random_rank{rank}.safetensors"
    modules = write_random_lora(model, path, rank, shape.dtype)
    holder = SimpleNamespace(transformer=model)  # what LoraTransform reads: the model's `transformer` part
    transform = LoraTransform([path], "1.0", normalizer=discover().handler_for("z_image"))
    with torch.no_grad():
        plain_out = step()
        before, _ = time_call(step, shape.device, shape.reps)
        start = time.perf_counter()
        transform.apply(holder)
        attach_s = time.perf_counter() - start
        matched = sum(r.modules_matched for r in transform.reports)  # the product's load report
        lora_out = step()
        with_lora, _ = time_call(step, shape.device, shape.reps)
        transform.remove(holder)
        after, _ = time_call(step, shape.device, shape.reps)
        restored = rel_diff(step(), plain_out)
    base = min(before, after)
    return [{
        "stage": "lora", "ok": True, "rank": rank, "modules_written": modules, "modules_matched": matched,
        "without_s": round(base, 4), "with_s": round(with_lora, 4), "overhead": round(with_lora / base - 1, 4),
        "attach_s": round(attach_s, 2), "flop_share": round(lora_flop_share(model, rank), 4),
        "lora_changes_output": round(rel_diff(lora_out, plain_out), 5), "removed_restores": restored == 0.0,
        "file_mb": round(path.stat().st_size / 1e6, 1), "reps": shape.reps,
    }]


def lora_flop_share(model: torch.nn.Module, rank: int) -> float:
    """Extra FLOPs of the LoRA on the targeted Linears over all those Linears' own FLOPs, per token."""
    shapes = [(m.out_features, m.in_features) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and LORA_TARGETS.search(n)]
    return sum(rank * (o + i) for o, i in shapes) / sum(o * i for o, i in shapes)


def compile_blocks(model: torch.nn.Module) -> tuple[int, str]:
    """Compile the transformer's repeated blocks as the `compile` setting does: through the host's transform
    (host/compile.py) where this version has it, else each block's `nn.Module.compile()` directly.
    Returns (blocks compiled, how)."""
    try:
        from host.compile import CompileTransform
    except ImportError:
        blocks = [*model.noise_refiner, *model.context_refiner, *model.layers]
        for block in blocks:
            block.compile(dynamic=False)  # in place: the model's modules and keys stay as they are
        return len(blocks), "torch.compile of each block directly (this version has no host/compile.py)"
    transform = CompileTransform(compile_blocks=True)
    transform.apply(SimpleNamespace(components=lambda: {"transformer": model}))
    return len(transform.blocks), ("host/compile.py CompileTransform, the compile setting's transform without mmgp "
                                   "(under an mmgp profile mmgp compiles the blocks: not timed here)")


def stage_compile(shape: Shape, backend: str) -> list[dict[str, Any]]:
    """(d) eager s/step, then the blocks compiled: the first call (compiling included) and the steady s/step;
    compile seconds = first call - steady step. Outputs compared with eager."""
    model = build_ours(shape)
    step = ours_step(model, cfg_inputs(shape, model.config.cap_feat_dim))
    torch.compiler.set_default_backend(backend)  # what nn.Module.compile uses when given none
    with torch.no_grad():
        eager_out = step()
        eager, _ = time_call(step, shape.device, shape.reps)
        blocks, via = compile_blocks(model)
        start = time.perf_counter()
        compiled_out = step()
        sync(shape.device)
        first_s = time.perf_counter() - start
        steady, _ = time_call(step, shape.device, shape.reps)
    return [{
        "stage": "compile", "ok": True, "backend": backend, "blocks": blocks, "torch": torch.__version__, "via": via,
        "eager_s": round(eager, 4), "first_call_s": round(first_s, 2), "compile_s": round(first_s - steady, 2),
        "compiled_s": round(steady, 4), "speedup": round(eager / steady, 3),
        "rel_diff": round(rel_diff(compiled_out, eager_out), 6), "reps": shape.reps,
    }]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def backend_installed(name: str) -> str | None:
    """Why the package behind a backend is missing (None: installed; sdpa is torch's own)."""
    if name == "flash":
        found = any(importlib.util.find_spec(m) is not None for m in ("flash_attn_interface", "flash_attn"))
        return None if found else "not installed (flash-attn 2 or 3)"
    if name in ("sage", "sage2"):
        if importlib.util.find_spec("sageattention") is None:
            return "not installed (sageattention)"
        major = importlib.metadata.version("sageattention").split(".")[0]
        if name == "sage2" and major != "2":
            return f"not installed (sageattention {major}.x; sage2 needs 2.x)"
    return None


class _Warnings(logging.Handler):
    """Keeps the attention module's warnings (why a backend fell back to sdpa)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def stage_attention(shape: Shape) -> list[dict[str, Any]]:
    """(e) one row per backend of the host setting: s/step where it runs, why not otherwise. The backend is
    chosen as the session chooses it (common.attention.set_attention_backend), rounds alternate between the
    usable ones; each output is compared with sdpa's. The negative caption is a quarter of the caption's length
    (128 of 512 tokens), as in a Base generation: the batch carries a padding mask, which the mask-free kernels
    take row by row (common/attention.py)."""
    from common import attention as attn

    warnings = _Warnings()
    logging.getLogger(attn.__name__).addHandler(warnings)
    model = build_ours(shape)
    step = ours_step(model, cfg_inputs(shape, model.config.cap_feat_dim, negative=max(1, shape.caption // 4)))
    rows: dict[str, dict[str, Any]] = {}
    usable: list[str] = []
    for name in BACKENDS:
        rows[name] = {"stage": "attention", "backend": name, "ok": True}
        missing = backend_installed(name)
        if missing is None and attn.set_attention_backend(name) != name:
            missing = "installed, not usable here: " + (warnings.messages[-1] if warnings.messages else "fell back to sdpa")
        if missing is not None:
            rows[name].update(status=missing)
        else:
            usable.append(name)
    calls = {name: backend_step(name, step, rows[name]) for name in usable}
    with torch.no_grad():
        outputs = {name: call() for name, call in calls.items()}
        timed = time_alternating(calls, shape.device, shape.reps)
    for name in usable:
        seconds, peak = timed[name]
        failed = rows[name].pop("failed", None)
        status = f"failed at run time, sdpa took over: {failed}" if failed else "measured"
        rows[name].update(status=status, s=round(seconds, 4), peak_gb=round(peak / 1e9, 2), reps=shape.reps,
                          rel_diff_vs_sdpa=round(rel_diff(outputs[name], outputs["sdpa"]), 5))
    attn.set_attention_backend("sdpa")
    return list(rows.values())


def stage_vae(shape: Shape) -> list[dict[str, Any]]:
    """(f) the Flux VAE (random weights) decoding one image at the step's size: diffusers' `Decoder.forward`
    against the host's lean walk (host/lowvram/lean_decode.py): peak memory over what was allocated before
    the decode (weights, latent), best seconds per decode, and how far the lean pixels are from the stock ones."""
    import functools

    from diffusers import AutoencoderKL

    from bench.gpu_check import FLUX_VAE
    from host.lowvram.lean_decode import lean_decoder_forward

    tiny = {"block_out_channels": [8, 16, 16, 16], "norm_num_groups": 4, "layers_per_block": 1}
    torch.manual_seed(0)
    vae = AutoencoderKL(**{**FLUX_VAE, **(tiny if shape.dry_run else {})}).to(shape.device, shape.dtype).eval()
    z = torch.randn(1, 16, shape.size // 8, shape.size // 8, device=shape.device, dtype=shape.dtype)
    walks = {"stock": type(vae.decoder).forward.__get__(vae.decoder), "lean": functools.partial(lean_decoder_forward, vae.decoder)}
    row: dict[str, Any] = {"stage": "vae", "ok": True, "size": shape.size, "dtype": str(shape.dtype).removeprefix("torch."),
                           "reps": shape.reps}
    outputs = {}
    cuda = shape.device.startswith("cuda")
    with torch.no_grad():
        for name, forward in walks.items():
            vae.decoder.forward = forward

            def decode() -> torch.Tensor:
                return vae.decode(z, return_dict=False)[0]

            outputs[name] = decode()
            sync(shape.device)
            base = torch.cuda.memory_allocated() if cuda else 0
            seconds, peak = time_call(decode, shape.device, shape.reps)
            row[f"{name}_s"] = round(seconds, 4)
            row[f"{name}_peak_gb"] = round((peak - base) / 1e9, 3) if cuda else None
    del vae.decoder.forward
    row["rel_diff"] = round(rel_diff(outputs["lean"], outputs["stock"]), 6)
    row["max_abs_diff"] = round((outputs["lean"].float() - outputs["stock"].float()).abs().max().item(), 5)
    return [row]


def backend_step(name: str, step: Callable[[], torch.Tensor], row: dict[str, Any]) -> Callable[[], torch.Tensor]:
    """A step under backend `name`; a kernel that fails at run time (the attention module then falls back to
    sdpa) is noted in `row`."""
    from common import attention as attn

    def run() -> torch.Tensor:
        attn.set_attention_backend(name)
        out = step()
        if attn.get_attention_backend() != name:
            row["failed"] = "see the stage log"
        return out

    return run


# -- main -------------------------------------------------------------------------------------------


def run_stage(args: argparse.Namespace) -> list[dict[str, Any]]:
    shape = make_shape(args.dry_run, args.device)
    if args.stage == "transformer":
        return stage_transformer(shape)
    if args.stage == "lora":
        return stage_lora(shape, args.workdir, args.rank)
    if args.stage == "compile":
        return stage_compile(shape, args.compile_backend)
    if args.stage == "vae":
        return stage_vae(shape)
    return stage_attention(shape)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--results", type=Path, required=True, help="JSON lines file the rows are appended to")
    parser.add_argument("--dry-run", action="store_true", help="tiny config, CPU, fp32, 64x64: the code path only")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --dry-run")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/wgp_gpu_check"), help="where the LoRA file goes")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--compile-backend", help="torch.compile backend (default inductor; aot_eager with --dry-run)")
    args = parser.parse_args(argv)
    args.device = args.device or ("cpu" if args.dry_run else "cuda")
    # The dry run traces the blocks (dynamo, AOT autograd) without inductor's C++ build: a minute on a small CPU.
    args.compile_backend = args.compile_backend or ("aot_eager" if args.dry_run else "inductor")
    logging.basicConfig(level=logging.INFO, format="[gpu_check %(name)s] %(message)s", stream=sys.stderr)
    start = time.perf_counter()
    try:
        rows = run_stage(args)
    except Exception as exc:  # the row says what failed; the other stages still run
        rows = [{"stage": args.stage, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}]
        log.error("%s", traceback.format_exc())
    for row in rows:
        row.update(device=args.device, dry_run=args.dry_run, stage_s=round(time.perf_counter() - start, 1))
        if args.device.startswith("cuda"):
            row["gpu"] = torch.cuda.get_device_name(args.device)
    with args.results.open("a", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
