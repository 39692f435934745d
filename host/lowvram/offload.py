"""Offload with mmgp on CUDA: Wan2GP's memory profiles 1-5, a transform applied to a built model.

The parts run strictly one after the other (text encoder -> transformer -> VAE); mmgp moves each to
the GPU when its forward starts and, in the low-VRAM profiles, streams the transformer block by block.
After each generation everything goes back to RAM (`OffloadHandle.after_generation`). The model is
loaded on the CPU and the pipeline's compute device is set to the GPU.

On the CPU there is nothing to offload: the same calls run without mmgp (logged once).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from common.errors import SettingsError
from host.compile import repeated_blocks
from host.transforms import component, hooks_of

log = logging.getLogger(__name__)

DEFAULT_PROFILE = 4
PROFILES: dict[int, str] = {
    1: "HighRAM_HighVRAM: whole models in VRAM, a pinned copy in RAM (fastest, needs 24 GB VRAM)",
    2: "HighRAM_LowVRAM: parts of a model in VRAM as needed, pinned RAM copy",
    3: "LowRAM_HighVRAM: whole models in VRAM, only the transformer pinned",
    4: "LowRAM_LowVRAM: the transformer streamed block by block, only it pinned (default)",
    5: "VerylowRAM_LowVRAM: streamed in small pieces, nothing pinned (slowest, least RAM)",
}
_LOGGED_CPU = False


def resolve_profile(setting: int | str | None, device: str) -> int | None:
    """The profile for this device: None on the CPU (nothing to offload); "auto" -> 4 on CUDA."""
    if setting in (None, "auto", ""):
        profile = DEFAULT_PROFILE
    else:
        try:
            profile = int(setting)
        except (TypeError, ValueError):
            profile = -1
        if profile not in PROFILES:
            choices = "; ".join(f"{k} = {v}" for k, v in PROFILES.items())
            raise SettingsError(f"'profile' must be auto or 1-5 ({choices}); got {setting!r}")
    return profile if str(device).startswith("cuda") else None


def uses_mmgp(device: str, profile: int | str | None) -> bool:
    """True when the model is offloaded by mmgp (CUDA and a profile)."""
    return resolve_profile(profile, device) is not None


def load_device(device: str, profile: int | str | None) -> str:
    """Where to load the weights: the CPU under mmgp (it moves them), else the compute device."""
    return "cpu" if uses_mmgp(device, profile) else device


@dataclass
class OffloadHandle:
    """What `apply_offload` set up; `after_generation` frees the VRAM, `release` undoes everything."""

    profile: int | None
    manager: Any = None  # mmgp's offload object (None on the CPU)

    def after_generation(self) -> None:
        """Send every part back to RAM so the next task (or another program) gets the VRAM."""
        if self.manager is not None:
            self.manager.unload_all()
            torch.cuda.empty_cache()

    def release(self) -> None:
        if self.manager is not None:
            self.manager.release()
            self.manager = None
            torch.cuda.empty_cache()


def apply_offload(
    pipe: Any,
    profile: int | str | None,
    device: str,
    dtype: torch.dtype | None = None,
    components: Sequence[str] | None = None,
    cotenants: Mapping[str, Sequence[str]] | None = None,
    compiled: Sequence[str] = (),
) -> OffloadHandle:
    """Offload the model's parts (`components`, in run order: the family's facts) with mmgp's `profile`.

    The parts must have been loaded on the CPU (`load_device`); the model's `device` becomes `device`.
    dtype: the compute dtype (default: that of the first part's weights). components: default, every part
    the model's `components()` lists. cotenants: part -> the parts that stay on the GPU beside it (mmgp's
    coTenantsMap, added to its own). compiled: the parts whose block stacks mmgp compiles (the `compile`
    setting; see `compile_parts`).
    """
    global _LOGGED_CPU
    number = resolve_profile(profile, device)
    if number is None:
        if not _LOGGED_CPU:
            log.info("running on %s: no offload (mmgp profiles apply to CUDA GPUs only), all parts stay in RAM", device)
            _LOGGED_CPU = True
        return OffloadHandle(None)
    from host.lowvram.mmgp_import import import_mmgp_offload

    offload = import_mmgp_offload()
    names = list(components) if components is not None else list(pipe.components())
    parts = {name: component(pipe, name) for name in names}
    missing = [name for name, part in parts.items() if part is None]
    if missing:
        raise SettingsError(f"offload needs every part loaded; missing: {', '.join(missing)}")
    dtype = dtype or next(_float_dtype(p) for p in parts.values())
    keep_precision(parts)
    select_gpu(device)
    previous = torch.get_default_device()
    try:
        # Quantization is our own transform (host/lowvram/quantize.py), applied before: mmgp must not quantize
        # again. mmgp turns every fp32 weight left into `convertWeightsFloatTo` (bf16 by default): the
        # compute dtype keeps an fp32 choice fp32 (GPUs without bf16) and casts nothing in bf16.
        manager = offload.profile(
            parts,
            profile_no=number,
            quantizeTransformer=False,
            extraModelsToQuantize=[],
            convertWeightsFloatTo=dtype,
            verboseLevel=0,
            **cotenant_map(cotenants),
            **({"compile": list(compiled)} if compiled else {}),
        )
    finally:
        restore_default_device(previous)
    pipe.device = torch.device(device)
    log.info("offload: mmgp profile %d (%s)", number, PROFILES[number])
    return OffloadHandle(number, manager)


# mmgp 3.8.2's own cotenants (mmgp/offload.py, offload_manager.__init__): a map given to `profile` replaces it.
MMGP_COTENANTS = {"text_encoder": ["vae", "text_encoder_2"], "text_encoder_2": ["vae", "text_encoder"]}


def cotenant_map(cotenants: Mapping[str, Sequence[str]] | None) -> dict[str, Any]:
    """`profile`'s coTenantsMap for parts that run together (nothing when none do: mmgp keeps its own)."""
    if not cotenants:
        return {}
    return {"coTenantsMap": MMGP_COTENANTS | {name: list(others) for name, others in cotenants.items()}}


def keep_precision(parts: dict[str, Any]) -> None:
    """Mark what mmgp must not cast, with the attributes its `profile` reads.

    - `_model_dtype` on every part: mmgp converts a part's fp32 weights to it and casts the fp32 inputs of
      the part's top-level modules to it. The VAE stays in its own dtype (fp32: the guard's advice).
    - `_lock_dtype = float32` on the modules a part declares in `fp32_input_modules` (module names, "" for
      the part itself): mmgp's wrappers would cast their fp32 inputs (the transformer's timestep, t * 1000,
      which bf16 rounds by 2-4 units above 512) to the part's dtype.
    """
    for name, part in parts.items():
        if part is None:
            continue
        part._model_dtype = _float_dtype(part)
        for module_name in getattr(part, "fp32_input_modules", ()):
            part.get_submodule(module_name)._lock_dtype = torch.float32
        log.debug("offload: %s kept in %s, fp32 inputs of %s", name, part._model_dtype, getattr(part, "fp32_input_modules", ()))


def select_gpu(device: str) -> None:
    """mmgp moves everything with `.cuda()`, i.e. to the current GPU: make `cuda:N` the current one."""
    index = torch.device(device).index
    if index is not None:
        torch.cuda.set_device(index)


def restore_default_device(previous: torch.device) -> None:
    """mmgp's `profile` ends with `torch.set_default_device('cuda')`; put the caller's default back, so
    tensors created without a device (noise from a CPU generator, previews, reloads) stay where they were."""
    torch.set_default_device(None if previous.type == "cpu" else previous)


def _float_dtype(module: Any) -> torch.dtype:
    """The dtype of the module's first floating-point tensor that is not an int8 layer's (fp32 if none)."""
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point() and type(tensor) in (torch.Tensor, torch.nn.Parameter):
            return tensor.dtype
    return torch.float32


def compile_parts(parts: Mapping[str, Any]) -> list[str]:
    """The parts mmgp should compile for the `compile` setting: those declaring repeated blocks
    (`_repeated_blocks`, host/compile.py).

    Why mmgp's compile and not host/compile.py's on CUDA: mmgp replaces the forward of every module of an
    offloaded part with its own loader (Python that moves weights to the GPU block by block), which a
    compile applied from outside would have to trace. With `profile(compile=...)` mmgp installs loaders
    made for compiled code instead: each block is loaded by a forward pre-hook that runs before its
    compiled forward, and the per-module checks are excluded from tracing (mmgp 3.8.2 offload.py
    `hook_preload_blocks_for_compilation`, `_pre_check`); it also resets PyTorch's compile caches and raises
    the recompile limit. This is the path Wan2GP's own --compile takes. It compiles the block stacks it
    detects (5 blocks or more: the main layers), not the short refiner stacks. Not run on a GPU here yet."""
    return [name for name, part in parts.items() if isinstance(part, torch.nn.Module) and repeated_blocks(part)]


@dataclass
class OffloadTransform:
    """mmgp offload as a transform: applied after the others (it wraps the parts' forwards last); after each
    generation the parts go back to RAM; removing it, or releasing the model, undoes the offload."""

    profile: int | str | None
    device: str
    dtype: torch.dtype | None = None
    components: Sequence[str] | None = None
    name: str = "offload"
    reversible: bool = True
    handle: OffloadHandle | None = None
    cotenants: Mapping[str, Sequence[str]] = field(default_factory=dict)  # parts that share the GPU (step_cotenants)
    compile: bool = False  # the `compile` setting: mmgp compiles the parts' block stacks (compile_parts)

    def apply(self, model: Any) -> None:
        compiled = []
        if self.compile:
            names = list(self.components) if self.components is not None else list(model.components())
            compiled = compile_parts({name: component(model, name) for name in names})
        self.handle = apply_offload(model, self.profile, self.device, self.dtype, self.components, self.cotenants, compiled)
        hooks = hooks_of(model)
        if hooks is not None:
            hooks.after_generate.add(self.name, self.handle.after_generation)
            hooks.on_release.add(self.name, self.handle.release)

    def remove(self, model: Any) -> None:
        hooks = hooks_of(model)
        if hooks is not None:
            hooks.after_generate.remove(self.name)
            hooks.on_release.remove(self.name)
        if self.handle is not None:
            self.handle.release()
            self.handle = None
