"""Foreign Z-Image checkpoint keys -> our module names (the diffusers names), driven by tables.

Three transformer layouts exist in the wild (REFERENCE.md section 5):
- diffusers / DeepBeepMeep flat files: already our names;
- ComfyUI / original single files: `model.diffusion_model.` prefix, fused `attention.qkv`, `attention.out`,
  `q_norm`/`k_norm`, `x_embedder`, `final_layer`, sometimes a fused FFN;
- quanto int8 files: our names with `<m>.weight._data` / `<m>.weight._scale` (loaded by a registered hook).

Nothing here reads files: the functions take key names and shapes, so the LoRA dialect tables can reuse
`strip_prefixes`, `rename_key` and the tables themselves.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from common.errors import CheckpointError

# Prefixes that wrappers put in front of the transformer's own names; stripped per key (files can mix them).
TRANSFORMER_PREFIXES: tuple[str, ...] = ("model.diffusion_model.", "diffusion_model.")

# (regex, replacement) applied in order to each prefix-stripped key. ComfyUI / original names -> ours.
KEY_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^x_embedder\.", "all_x_embedder.2-1."),
    (r"^final_layer\.", "all_final_layer.2-1."),
    (r"\.attention\.out\.", ".attention.to_out.0."),
    (r"\.attention\.q_norm\.", ".attention.norm_q."),
    (r"\.attention\.k_norm\.", ".attention.norm_k."),
    (r"\.feed_forward\.net\.2\.", ".feed_forward.w2."),
)

# Fused tensors split row-wise into equal parts, in this order.
FUSED_SPLITS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # Rows q, k, v: what diffusers' own single-file converter reads (tests/test_loading.py checks ours against it).
    (".attention.qkv.", (".attention.to_q.", ".attention.to_k.", ".attention.to_v.")),
    # Fused SwiGLU input projection, diffusers' `FeedForward(activation_fn="swiglu")` naming: its
    # `hidden, gate = proj(x).chunk(2)` then `hidden * silu(gate)` makes the first half w3 and the second w1
    # (tested against that module; a public nunchaku-style converter writes `cat([w3, w1])` too). No real
    # fused-FFN Z-Image file has been tested: if such a file gives wrong images, swap these two.
    (".feed_forward.net.0.proj.", (".feed_forward.w3.", ".feed_forward.w1.")),
)

# Keys with no counterpart in our model (ComfyUI's unused final norm).
DROPPED_KEYS: tuple[str, ...] = ("norm_final.weight",)

# Keys that identify another model family, checked on prefix-stripped keys: (regex, family name).
FOREIGN_SIGNATURES: tuple[tuple[str, str], ...] = (
    (r"^(double_blocks|single_blocks)\.\d+\.", "Flux"),
    (r"^single_transformer_blocks\.\d+\.", "Flux (diffusers)"),
    (r"^blocks\.\d+\.(self_attn|cross_attn)\.", "Wan"),
    (r"^transformer_blocks\.\d+\.(img_mod|img_mlp|txt_mod)\.", "Qwen-Image"),
    (r"^joint_blocks\.\d+\.", "Stable Diffusion 3"),
    (r"^(input_blocks|output_blocks|middle_block)\.", "Stable Diffusion (UNet)"),
    (r"^(down_blocks|up_blocks)\.\d+\.(resnets|attentions)\.", "Stable Diffusion (diffusers UNet)"),
    (r"^(encoder|decoder)\.(down|up|mid)", "VAE"),
    (r"^(model\.)?layers\.\d+\.self_attn\.q_proj\.", "text encoder (Qwen3 / LLM)"),
    (r"^layers\.\d+\.attn\.to_q\.", "Lumina2 (diffusers)"),
    (r"^layers\.\d+\.adaLN_modulation\.1\.", "Lumina2"),
    (r"^transformer_blocks\.\d+\.", "diffusers DiT (SD3 / Flux / PixArt style)"),
)

QUANTO_SUFFIXES: tuple[str, ...] = ("._data", "._scale", ".input_scale", ".output_scale")


@dataclass(frozen=True)
class TensorRef:
    """Where one of our tensors comes from: a source key, and for fused tensors a row range [start, stop)."""

    key: str
    rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class ConversionPlan:
    """Our key -> its source; `dropped` are source keys deliberately ignored, `unknown` the rest."""

    sources: dict[str, TensorRef]
    dropped: list[str]
    unknown: list[str]


def strip_prefixes(key: str, prefixes: Iterable[str] = TRANSFORMER_PREFIXES) -> str:
    """Remove the first matching wrapper prefix from one key (keys without one are returned as is)."""
    for prefix in prefixes:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def rename_key(key: str, renames: Iterable[tuple[str, str]] = KEY_RENAMES) -> str:
    """Apply the rename table to one prefix-stripped key."""
    for pattern, replacement in renames:
        key = re.sub(pattern, replacement, key)
    return key


def _is_z_image(keys: set[str]) -> bool:
    has = lambda pattern: any(re.match(pattern, k) for k in keys)  # noqa: E731
    return has(r"^noise_refiner\.\d+\.") and has(r"^context_refiner\.\d+\.") and has(r"^layers\.\d+\.")


def foreign_family(keys: Iterable[str]) -> str | None:
    """Name of the other model family these (prefix-stripped) keys belong to; None if they may be Z-Image."""
    keys = set(keys)
    for pattern, family in FOREIGN_SIGNATURES:
        if any(re.match(pattern, k) for k in keys):
            return family
    if not _is_z_image(keys) and any(re.match(r"^layers\.\d+\.attention\.qkv\.", k) for k in keys):
        return "Lumina2"  # Z-Image's ComfyUI layout without the refiners
    return None


def detect_layout(keys: Iterable[str], metadata: Mapping[str, str] | None = None, source: str = "checkpoint") -> str:
    """Return "diffusers", "comfy" or "quanto" for a Z-Image transformer; raise CheckpointError otherwise.

    `source` names the file in the error message.
    """
    raw = list(keys)
    stripped = {strip_prefixes(k) for k in raw}
    family = foreign_family(stripped)
    if family is not None:
        raise CheckpointError(
            f"{source}: this file is a {family} checkpoint, not Z-Image. Pick a Z-Image transformer file "
            "(e.g. ZImageTurbo_bf16.safetensors, a ComfyUI Z-Image file or a diffusers transformer/ folder)."
        )
    if not _is_z_image(stripped):
        raise CheckpointError(
            f"{source}: this file does not look like a Z-Image transformer (no layers / noise_refiner / "
            f"context_refiner keys); first keys: {sorted(raw)[:5]}"
        )
    if (metadata or {}).get("quantization_format") == "quanto" or any(k.endswith(".weight._data") for k in stripped):
        return "quanto"
    foreign_names = (r"\.attention\.qkv\.", r"\.attention\.out\.", r"\.q_norm\.", r"^x_embedder\.", r"^final_layer\.")
    if any(k != strip_prefixes(k) for k in raw) or any(re.search(p, k) for k in stripped for p in foreign_names):
        return "comfy"
    return "diffusers"


def plan_conversion(shapes: Mapping[str, tuple[int, ...]], expected: Iterable[str] | None = None) -> ConversionPlan:
    """Map source keys (with their shapes) to our keys; fused tensors become row ranges.

    If `expected` (our model's keys) is given, converted keys not in it are reported as unknown
    instead of being planned.
    """
    wanted = set(expected) if expected is not None else None
    sources: dict[str, TensorRef] = {}
    dropped: list[str] = []
    unknown: list[str] = []
    for src_key, shape in shapes.items():
        key = strip_prefixes(src_key)
        if key in DROPPED_KEYS:
            dropped.append(src_key)
            continue
        targets = _split_targets(rename_key(key), src_key, shape)
        for target, ref in targets.items():
            if wanted is not None and target not in wanted:
                unknown.append(src_key)
                break
            sources[target] = ref
    return ConversionPlan(sources, dropped, unknown)


def _split_targets(key: str, src_key: str, shape: tuple[int, ...]) -> dict[str, TensorRef]:
    for fused, parts in FUSED_SPLITS:
        if fused in key:
            rows, rest = divmod(shape[0], len(parts))
            if rest:
                raise CheckpointError(
                    f"fused tensor {src_key} has {shape[0]} rows, not divisible into {len(parts)} parts"
                )
            return {
                key.replace(fused, part): TensorRef(src_key, (i * rows, (i + 1) * rows)) for i, part in enumerate(parts)
            }
    return {key: TensorRef(src_key)}


def convert_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert an in-memory state dict of any supported layout to our names (fused tensors are split as views)."""
    plan = plan_conversion({k: tuple(v.shape) for k, v in state_dict.items()})
    out = {}
    for key, ref in plan.sources.items():
        tensor = state_dict[ref.key]
        out[key] = tensor if ref.rows is None else tensor[ref.rows[0] : ref.rows[1]]
    return out
