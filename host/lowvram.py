"""The low-VRAM transforms applied, in order, to a model a family just built (host side, model-agnostic).

`load_options` adjusts what the family is asked to load (CPU first under mmgp, a lazily loaded text
encoder, the int8 file loader); `apply_lowvram` then quantizes on the fly (int8 asked, no int8 file),
attaches the prompt cache, VAE tiling and the black-image guard, and offloads with mmgp on CUDA.
The model is duck-typed: `transformer`, `text_encoder`, `vae`, `encode_prompt`, `device` attributes
(the Z-Image pipeline's); what a model lacks is skipped.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from host import offload as offload_mod
from host.guards import compute_dtype, guard_vae_decode
from host.prompt_cache import attach_prompt_cache, file_identity
from host.quantize import cpu_safe_int8, is_quantized, load_quanto, quantize_model, set_int8_dtype
from host.vae_tiling import TilingOptions, enable_tiling

log = logging.getLogger(__name__)

LOW_VRAM_PROFILES = (2, 4, 5)  # mmgp profiles that stream the transformer: VRAM is the limit
INT8_PARTS = ("transformer", "text_encoder")  # the parts that may hold int8 layers


def load_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The handler's load options with the low-VRAM choices added.

    In: device (the compute device), dtype, quantization, profile. Out: `device` becomes where the weights
    are loaded (the CPU when mmgp offloads; `compute_device` keeps the GPU), `keep_text_encoder` False
    (the text encoder is loaded on first use and freed after the prompt stage: with the prompt cache a
    re-run never loads it; kept under mmgp, which must see every part up front), `quantized_loader`
    (reads int8 quanto files).
    """
    device, profile = options["device"], options.get("profile", "auto")
    if options.get("quantization") in ("fp16", "fp32"):  # fp16 is refused with the reason; fp32 forces fp32
        options = {**options, "dtype": compute_dtype(device, None, options["quantization"])}
    return {
        **options,
        "device": offload_mod.load_device(device, profile),
        "compute_device": device,
        "keep_text_encoder": offload_mod.uses_mmgp(device, profile),
        "quantized_loader": load_quanto if str(device).startswith("cuda") else _load_quanto_cpu,
    }


def _load_quanto_cpu(model: Any, files: list[Path], dtype: Any, device: Any) -> Any:
    """`load_quanto` for a model that computes on the CPU: its int8 layers always compute in fp32."""
    return cpu_safe_int8(load_quanto(model, files, dtype, device))


def apply_lowvram(model: Any, options: Mapping[str, Any], files: Mapping[str, Path] | None = None) -> Any:
    """Apply the transforms to a built model in place; returns it (same object).

    options: `load_options`' result (compute_device or device, quantization, profile), optionally
    vae_tiling ("auto"/"always"/"never").
    """
    device = options.get("compute_device", options["device"])
    files = files or {}
    transformer = getattr(model, "transformer", None)
    if options.get("quantization") == "int8" and transformer is not None and not is_quantized(transformer):
        log.info("no int8 file for the transformer: quantizing it on the fly")
        quantize_model(transformer, dtype=options.get("dtype"))
    _align_int8(model, device, options.get("dtype"))
    if hasattr(model, "encode_prompt"):
        attach_prompt_cache(model, file_identity(files.get("text_encoder")))
    vae = getattr(model, "vae", None)
    if vae is not None:
        enable_tiling(vae, TilingOptions(mode=options.get("vae_tiling", "auto")))
        guard_vae_decode(vae)
    profile = offload_mod.resolve_profile(options.get("profile", "auto"), device)
    if profile in LOW_VRAM_PROFILES and hasattr(model, "batch_cfg"):
        model.batch_cfg = False  # guidance branches one after the other: half the activation memory
    handle = offload_mod.apply_offload(model, options.get("profile", "auto"), device, options.get("dtype"))
    _release_after_generation(model, handle)
    return model


def _align_int8(model: Any, device: str, dtype: Any) -> None:
    """int8 layers compute in the compute dtype (their scales decide it); on the CPU always in fp32."""
    for name in INT8_PARTS:
        part = getattr(model, name, None)
        if part is None or not is_quantized(part):
            continue
        if not str(device).startswith("cuda"):
            cpu_safe_int8(part)
        elif dtype is not None:
            set_int8_dtype(part, dtype)


def _release_after_generation(model: Any, handle: offload_mod.OffloadHandle) -> None:
    """After each `generate`, send the parts back to RAM; `release` also undoes the offload."""
    if getattr(model, "_offload_handle", None) is not None or not hasattr(model, "generate"):
        return
    model._offload_handle = handle
    generate, release = model.generate, model.release

    @functools.wraps(generate)
    def generate_then_free(*args: Any, **kwargs: Any) -> Any:
        try:
            return generate(*args, **kwargs)
        finally:
            handle.after_generation()

    @functools.wraps(release)
    def release_all() -> None:
        handle.release()
        release()

    model.generate, model.release = generate_then_free, release_all
