"""The low-VRAM transforms applied, in order, to a model a family just built (host side, model-agnostic).

`load_options` adjusts what the family is asked to load (CPU first under mmgp, a lazily loaded text
encoder, the int8 file loader); `lowvram_transforms` lists the transforms for a run, in order: int8
(quantize on the fly when int8 is asked and no int8 file was loaded; int8 layers in the compute dtype,
fp32 on the CPU), packed linears on the CPU (packed_linear.py: the denoiser's fp32 matmuls through oneDNN with
weights packed once), the prompt cache, VAE tiling, the lean VAE decode (lean_decode.py: the decoder's own modules
walked with fewer full-size maps alive), the black-image guard, the heap trim (freed C heap memory
handed back between the stages: heap.py), sequential guidance branches for
the streaming profiles, and mmgp offload on CUDA. `apply_lowvram` applies them and returns the stack
the session keeps (host/transforms.py). A transform skips what the model does not offer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.model_facts import AUXILIARY, DENOISER, ModelFacts
from host.device import compute_dtype
from host.lowvram import offload as offload_mod
from host.lowvram.guards import BlackImageGuard
from host.lowvram.heap import HeapTrim
from host.lowvram.lean_decode import LeanDecode
from host.lowvram.packed_linear import PackedLinears
from host.lowvram.prompt_cache import PromptCacheTransform, file_identity
from host.lowvram.quantize import cpu_safe_int8, is_quantized, load_quanto, quantize_model, set_int8_dtype
from host.lowvram.vae_tiling import TilingOptions, VaeTilingTransform
from host.transforms import Transform, TransformStack, component, hooks_of

log = logging.getLogger(__name__)

LOW_VRAM_PROFILES = (2, 4, 5)  # mmgp profiles that stream the transformer: VRAM is the limit


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


def lowvram_transforms(
    options: Mapping[str, Any], files: Mapping[str, Path] | None = None, facts: ModelFacts | None = None
) -> list[Transform]:
    """The low-VRAM transforms for a run, in the order they apply.

    options: `load_options`' result (compute_device or device, dtype, quantization, profile), optionally
    vae_tiling ("auto"/"always"/"never"). files: role -> path (the text encoder's identity keys the cache).
    facts: the family's `ModelFacts` (components, which of their Linears are int8; None: no int8 parts known,
    offload of whatever parts the model has).
    """
    device = options.get("compute_device", options["device"])
    files = files or {}
    profile = offload_mod.resolve_profile(options.get("profile", "auto"), device)
    transforms: list[Transform] = [
        Int8Transform(options.get("quantization") == "int8", device, options.get("dtype"), facts),
        PackedLinears(str(device).split(":")[0] == "cpu", facts),  # fp32 layers only: after int8, which leaves none to pack
        PromptCacheTransform(file_identity(files.get("text_encoder"))),
        VaeTilingTransform(TilingOptions(mode=options.get("vae_tiling", "auto"))),
        LeanDecode(facts),  # before the offload: mmgp wraps the lean walk like any forward
        BlackImageGuard(),
        HeapTrim(),
    ]
    if profile in LOW_VRAM_PROFILES:
        transforms.append(SequentialGuidance())
    components = facts.names if facts is not None else None
    offload = offload_mod.OffloadTransform(options.get("profile", "auto"), device, options.get("dtype"), components)
    offload.cotenants = step_cotenants(facts)
    offload.compile = bool(options.get("compile"))  # the `compile` setting under mmgp: its profile() compiles
    transforms.append(offload)
    return transforms


def step_cotenants(facts: ModelFacts | None) -> dict[str, list[str]]:
    """Parts that run together at every step (the denoiser and its auxiliary parts, e.g. a ControlNet that
    reads the transformer's embedders) share the GPU under mmgp instead of unloading each other every step."""
    if facts is None:
        return {}
    names = [c.name for c in facts.components if c.role in (DENOISER, AUXILIARY)]
    if len(names) < 2:
        return {}
    return {name: [other for other in names if other != name] for name in names}


def apply_lowvram(
    model: Any, options: Mapping[str, Any], files: Mapping[str, Path] | None = None, facts: ModelFacts | None = None
) -> TransformStack:
    """Apply `lowvram_transforms` to a built model; returns the stack (its `model` is the same object).

    Transforms that need a hook point the model lacks (a model without `hooks`) are skipped.
    """
    stack = TransformStack(model)
    for transform in lowvram_transforms(options, files, facts):
        if _needs_hooks(transform) and hooks_of(model) is None:
            log.debug("%s: the model offers no hooks; %s skipped", type(model).__name__, transform.name)
            continue
        stack.push(transform)
    return stack


def _needs_hooks(transform: Transform) -> bool:
    return isinstance(transform, (PromptCacheTransform, VaeTilingTransform, BlackImageGuard, HeapTrim))


@dataclass
class Int8Transform:
    """int8 weights: the denoiser, and the auxiliary parts that run beside it at every step (a ControlNet),
    quantized on the fly (the Linears their facts name) when int8 is asked and no int8 file was loaded; every
    part's int8 layers compute in the compute dtype (on the CPU always fp32: see host/lowvram/quantize.py).
    Irreversible in place: the weights stay int8 until the model is reloaded."""

    quantize: bool
    device: str
    dtype: Any = None
    facts: ModelFacts | None = None
    name: str = "int8"
    reversible: bool = False

    def apply(self, model: Any) -> None:
        if self.facts is None:
            return
        for facts in self.facts.components:
            part = component(model, facts.name) if facts.role in (DENOISER, AUXILIARY) else None
            if self.quantize and facts.int8_pattern and part is not None and not is_quantized(part):
                log.info("no int8 file for the %s: quantizing it on the fly", facts.name)
                quantize_model(part, include=self.facts.quantize_pattern(facts.name), dtype=self.dtype)
        for name in self.facts.int8_components:
            part = component(model, name)
            if part is None or not is_quantized(part):
                continue
            if not str(self.device).startswith("cuda"):
                cpu_safe_int8(part)
            elif self.dtype is not None:
                set_int8_dtype(part, self.dtype)

    def remove(self, model: Any) -> None:
        """Nothing to undo in place (the stack refuses to pop it; clearing it at release is fine)."""


@dataclass
class SequentialGuidance:
    """Run the guidance branches one after the other (half the activation memory) on a model with
    `batch_cfg`; the streaming profiles use it, where VRAM is the limit."""

    name: str = "sequential_guidance"
    reversible: bool = True
    previous: bool | None = None

    def apply(self, model: Any) -> None:
        if hasattr(model, "batch_cfg"):
            self.previous, model.batch_cfg = model.batch_cfg, False

    def remove(self, model: Any) -> None:
        if self.previous is not None:
            model.batch_cfg = self.previous
