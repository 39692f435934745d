"""Z-Image LoRA key normaliser: every dialect of REFERENCE.md section 6 -> one `LoraDelta` per Linear.

A key is read in four table-driven steps, each applied per key (files mix prefixes):
  1. suffix  -> role (down / up / alpha / lokr_w1 / hada_w1_a / dora_scale ...), e.g. `.lora_down.weight`;
  2. prefix  -> dialect, stripped, e.g. `diffusion_model.`, `lora_unet_`;
  3. names   -> underscore-flattened names are un-flattened (protecting `to_q`, `feed_forward`, ...) and
                foreign spellings renamed (`attention.out` -> `attention.to_out.0`, `x_embedder` -> ...);
  4. fused   -> `attention.qkv` deltas are split into to_q / to_k / to_v (B row-wise, A shared).
Anything that does not end on a Z-Image Linear is an error that names the key: nothing is skipped
silently. Text-encoder keys are reported as not applied.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from common.errors import CheckpointError
from common.lora_delta import LoraDelta, NormalizedLora, rebuild_tucker

# (suffix, role, dialect or None); longest suffixes first so `.lora_A.default.weight` wins over `.weight`.
SUFFIXES: list[tuple[str, str, str | None]] = [
    (".lora_A.default.weight", "down", "DiffSynth/ModelScope"),
    (".lora_B.default.weight", "up", "DiffSynth/ModelScope"),
    (".lora_magnitude_vector.default.weight", "dora_scale", "DoRA"),
    (".lora_magnitude_vector.weight", "dora_scale", "DoRA"),
    (".lora_magnitude_vector", "dora_scale", "DoRA"),
    (".lora_A.weight", "down", None),
    (".lora_B.weight", "up", None),
    (".lora_down.weight", "down", None),
    (".lora_up.weight", "up", None),
    (".lora.down.weight", "down", "ComfyUI dot-mangled"),
    (".lora.up.weight", "up", "ComfyUI dot-mangled"),
    (".alpha", "alpha", None),
    (".dora_scale", "dora_scale", "DoRA"),
    *[(f".lokr_{p}", f"lokr_{p}", "LyCORIS LoKr") for p in ("w1_a", "w1_b", "w2_a", "w2_b", "w1", "w2", "t2")],
    *[(f".hada_{p}", f"hada_{p}", "LyCORIS LoHa") for p in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")],
    (".diff_b", "diff_b", "ComfyUI diff"),
    (".diff", "diff", "ComfyUI diff"),
]

# (prefix, dialect); longest first. Stripped per key.
PREFIXES: list[tuple[str, str]] = [
    ("base_model.model.transformer.", "diffusers/PEFT"),
    ("model.diffusion_model.", "ComfyUI"),
    ("base_model.model.", "PEFT"),
    ("diffusion_model.", "ai-toolkit/ComfyUI"),
    ("transformer.", "diffusers/PEFT"),
    ("lora_transformer_", "OneTrainer"),
    ("lora_unet__", "VideoX-Fun"),
    ("lora_unet_", "musubi/kohya"),
    ("lycoris_", "LyCORIS"),
]

TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoders.", "te.")

# Names that contain underscores and must survive un-flattening `layers_0_attention_to_q` -> dots.
PROTECTED = (
    "to_q", "to_k", "to_v", "to_out", "feed_forward", "context_refiner", "noise_refiner", "adaLN_modulation",
    "adaln_modulation", "all_x_embedder", "all_final_layer", "t_embedder", "cap_embedder", "x_embedder",
    "final_layer",
)
_PROTECTED_RE = re.compile(
    r"(?<![A-Za-z0-9])(" + "|".join(sorted(PROTECTED, key=len, reverse=True)) + r")(?![A-Za-z0-9])"
)

# Foreign spellings -> diffusers module names (regex, replacement), applied in order.
RENAMES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"adaln_modulation"), "adaLN_modulation"),
    (re.compile(r"^x_embedder(?=$|\.)"), "all_x_embedder.2-1"),
    (re.compile(r"^final_layer(?=$|\.)"), "all_final_layer.2-1"),
    (re.compile(r"\.attention\.(out|wo|to_out)$"), ".attention.to_out.0"),
    (re.compile(r"\.feed_forward\.net\.2$"), ".feed_forward.w2"),
    (re.compile(r"^((?:layers|noise_refiner)\.\d+\.adaLN_modulation)$"), r"\1.0"),
    (re.compile(r"^(all_final_layer\.2-1\.adaLN_modulation)$"), r"\1.1"),
]

FUSED_QKV = re.compile(r"^(.*\.attention)\.qkv$")

# The Linear layers of a Z-Image transformer (used when the caller gives no module shapes).
TARGETS = re.compile(
    r"^(?:(?:layers|noise_refiner)\.\d+\.(?:attention\.(?:to_[qkv]|to_out\.0)|feed_forward\.w[123]|adaLN_modulation\.0)"
    r"|context_refiner\.\d+\.(?:attention\.(?:to_[qkv]|to_out\.0)|feed_forward\.w[123])"
    r"|all_x_embedder\.2-1|all_final_layer\.2-1\.(?:linear|adaLN_modulation\.1)|t_embedder\.mlp\.[02]|cap_embedder\.1)$"
)

# Keys that betray a LoRA for another model: (regex searched in each key, model name). First match wins.
FOREIGN: list[tuple[re.Pattern, str]] = [
    (re.compile(r"double_blocks|single_blocks|single_transformer_blocks"), "Flux"),
    (re.compile(r"(?:^|[._])blocks[._]\d+[._](?:self_attn|cross_attn|ffn)"), "Wan"),
    (re.compile(r"img_mod|txt_mod|img_mlp|txt_mlp"), "Qwen-Image"),
    (re.compile(r"transformer_blocks"), "Qwen-Image"),
    (re.compile(r"down_blocks|up_blocks|input_blocks|output_blocks|mid_block"), "Stable Diffusion (UNet)"),
]
LUMINA2_DIM = 2304  # Lumina 2 uses Z-Image's module names with dim 2304 and grouped-query (fused) qkv


def normalize_lora(
    state_dict: Mapping[str, torch.Tensor], target_shapes: Mapping[str, tuple[int, int]] | None = None
) -> NormalizedLora:
    """Map a LoRA state dict of any supported dialect to Z-Image deltas.

    target_shapes: {module: (out, in)} of the model's Linear layers; when given, every delta must land
    on one of them with that shape. Raises CheckpointError naming the offending key otherwise.
    """
    _refuse_foreign(state_dict)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    sources: dict[str, dict[str, str]] = {}
    dialects: set[str] = set()
    ignored: dict[str, str] = {}
    unmapped: list[str] = []
    for key, tensor in state_dict.items():
        if key.startswith(TEXT_ENCODER_PREFIXES):
            ignored[key] = "text-encoder LoRA keys are not applied (only the transformer takes LoRAs)"
            continue
        parsed = _parse_key(key)
        if parsed is None:
            unmapped.append(key)
            continue
        module, role, labels = parsed
        dialects.update(labels)
        if role in parts.setdefault(module, {}):
            raise CheckpointError(f"LoRA keys {sources[module][role]!r} and {key!r} both map to {module}.{role}")
        parts[module][role] = tensor
        sources.setdefault(module, {})[role] = key
    if unmapped:
        raise CheckpointError(_unmapped_message(unmapped))
    deltas: dict[str, LoraDelta] = {}
    for module, roles in parts.items():
        for delta in _split_fused(module, _build_delta(module, roles, list(sources[module].values()))):
            deltas[delta.module] = delta
    _check_targets(deltas, target_shapes)
    return NormalizedLora(deltas=deltas, dialects=sorted(dialects), ignored=ignored)


def _refuse_foreign(state_dict: Mapping[str, torch.Tensor]) -> None:
    for pattern, model in FOREIGN:
        for key in state_dict:
            if pattern.search(key):
                raise CheckpointError(
                    f"this LoRA is for {model}, not Z-Image (key {key!r}); pick a LoRA trained for Z-Image"
                )


def _parse_key(key: str) -> tuple[str, str, list[str]] | None:
    """key -> (module as spelled by the file but with prefix stripped and dots restored, role, dialect labels)."""
    found = next((entry for entry in SUFFIXES if key.endswith(entry[0])), None)
    if found is None:
        return None
    suffix, role, suffix_dialect = found
    stem = key[: -len(suffix)]
    labels = [suffix_dialect] if suffix_dialect else []
    for prefix, prefix_dialect in PREFIXES:
        if stem.startswith(prefix):
            stem = stem[len(prefix):]
            labels.append(prefix_dialect)
            break
    else:
        if not labels:
            labels.append("kohya (no prefix)" if suffix.startswith(".lora_down") else "PEFT (no prefix)")
    if "." not in stem:
        stem = _unflatten(stem)
    for pattern, repl in RENAMES:
        stem = pattern.sub(repl, stem)
    if FUSED_QKV.match(stem):
        labels.append("fused qkv")
    return stem, role, labels


def _unflatten(name: str) -> str:
    """`layers_0_attention_to_out_0` -> `layers.0.attention.to_out.0`, keeping protected names whole."""
    kept: list[str] = []

    def hide(m: re.Match) -> str:
        kept.append(m.group(1))
        return f"\0{len(kept) - 1}\0"

    hidden = _PROTECTED_RE.sub(hide, name.strip("_")).replace("_", ".")
    return re.sub(r"\0(\d+)\0", lambda m: kept[int(m.group(1))], hidden)


def _unmapped_message(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
    return (
        f"{len(keys)} LoRA key(s) do not map to Z-Image: {shown}. The file may be for another model or use a "
        "dialect this tool does not know; report the key names if it is a Z-Image LoRA"
    )


def _need(module: str, roles: Mapping[str, torch.Tensor], *names: str) -> list[torch.Tensor]:
    missing = [n for n in names if n not in roles]
    if missing:
        raise CheckpointError(f"LoRA module {module!r} has {sorted(roles)} but lacks {missing}: the file is incomplete")
    return [roles[n].float() for n in names]


def _scale(alpha: float | None, rank: int | None) -> float:
    """alpha / rank; no alpha (or no decomposed rank) means scale 1.0, i.e. alpha = rank."""
    return alpha / rank if alpha is not None and rank else 1.0


def _build_delta(module: str, roles: dict[str, torch.Tensor], keys: list[str]) -> LoraDelta:
    alpha = float(roles["alpha"].float().item()) if "alpha" in roles else None
    dora = roles["dora_scale"].float() if "dora_scale" in roles else None
    bias = roles["diff_b"].float() if "diff_b" in roles else None
    if "down" in roles or "up" in roles:
        down, up = _need(module, roles, "down", "up")
        if down.dim() != 2 or up.dim() != 2 or down.shape[0] != up.shape[1]:
            raise CheckpointError(
                f"LoRA module {module!r}: down {tuple(down.shape)} and up {tuple(up.shape)} are not a rank-r pair"
            )
        rank = down.shape[0]
        return LoraDelta(module, "lora", {"down": down, "up": up}, _scale(alpha, rank), rank, alpha, dora, bias, keys)
    if any(r.startswith("lokr_") for r in roles):
        return _build_lokr(module, roles, keys, alpha, dora, bias)
    if any(r.startswith("hada_") for r in roles):
        return _build_loha(module, roles, keys, alpha, dora, bias)
    if "diff" in roles:
        return LoraDelta(module, "full", {"diff": roles["diff"].float()}, 1.0, None, alpha, dora, bias, keys)
    raise CheckpointError(f"LoRA module {module!r} has only {sorted(roles)} and no weight delta (keys {keys})")


def _lokr_factor(module: str, roles: dict[str, torch.Tensor], n: str) -> tuple[torch.Tensor, int | None]:
    if f"lokr_w{n}" in roles:
        return roles[f"lokr_w{n}"].float(), None
    wa, wb = _need(module, roles, f"lokr_w{n}_a", f"lokr_w{n}_b")
    if n == "2" and "lokr_t2" in roles:
        return rebuild_tucker(roles["lokr_t2"].float(), wa, wb), wb.shape[0]
    return wa @ wb, wb.shape[0]


def _build_lokr(module, roles, keys, alpha, dora, bias) -> LoraDelta:
    w1, rank1 = _lokr_factor(module, roles, "1")
    w2, rank2 = _lokr_factor(module, roles, "2")
    rank = rank2 if rank2 is not None else rank1
    factors = {"w1": w1, "w2": w2}
    return LoraDelta(module, "lokr", factors, _scale(alpha, rank), rank, alpha, dora, bias, keys)


def _build_loha(module, roles, keys, alpha, dora, bias) -> LoraDelta:
    w1a, w1b, w2a, w2b = _need(module, roles, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    rank = w1b.shape[0]
    scale = _scale(alpha, rank)
    if "hada_t1" in roles or "hada_t2" in roles:  # Tucker form: rebuild both products, keep as a plain diff
        t1, t2 = _need(module, roles, "hada_t1", "hada_t2")
        diff = rebuild_tucker(t1, w1a, w1b) * rebuild_tucker(t2, w2a, w2b) * scale
        return LoraDelta(module, "full", {"diff": diff}, 1.0, rank, alpha, dora, bias, keys)
    factors = {"w1a": w1a, "w1b": w1b, "w2a": w2a, "w2b": w2b}
    return LoraDelta(module, "loha", factors, scale, rank, alpha, dora, bias, keys)


def _split_fused(module: str, delta: LoraDelta) -> list[LoraDelta]:
    """`attention.qkv` (rows q, k, v) -> three deltas; other modules pass through."""
    m = FUSED_QKV.match(module)
    if m is None:
        return [delta]
    out, inp = delta.shape
    if out != 3 * inp:
        dim_hint = " (Lumina 2)" if inp == LUMINA2_DIM else ""
        raise CheckpointError(
            f"this LoRA is for Lumina 2 or another grouped-query model{dim_hint}, not Z-Image: fused qkv "
            f"{module!r} has {out} rows for width {inp} (Z-Image has 3 x width)"
        )
    if delta.dora_scale is not None and delta.dora_scale.reshape(-1).numel() != out:
        raise CheckpointError(f"{module!r}: a per-column DoRA magnitude on a fused qkv cannot be split")
    names = [f"{m.group(1)}.to_{p}" for p in "qkv"]
    if delta.kind == "lora":
        ups = [{"down": delta.factors["down"], "up": u} for u in delta.factors["up"].chunk(3, dim=0)]
    else:  # no row-wise factorisation: split the full delta (scale already applied)
        ups = [{"diff": d} for d in delta.weight().chunk(3, dim=0)]
    kind, scale = ("lora", delta.scale) if delta.kind == "lora" else ("full", 1.0)
    dora = delta.dora_scale.reshape(-1, 1).chunk(3, dim=0) if delta.dora_scale is not None else [None] * 3
    bias = delta.bias.chunk(3, dim=0) if delta.bias is not None else [None] * 3
    return [
        LoraDelta(n, kind, f, scale, delta.rank, delta.alpha, d, b, delta.keys)
        for n, f, d, b in zip(names, ups, dora, bias, strict=True)
    ]


def _check_targets(deltas: Mapping[str, LoraDelta], target_shapes: Mapping[str, tuple[int, int]] | None) -> None:
    for name, delta in deltas.items():
        known = name in target_shapes if target_shapes is not None else TARGETS.match(name) is not None
        if not known:
            raise CheckpointError(
                f"LoRA key {delta.keys[0]!r} maps to {name!r}, which is not a Linear layer of this Z-Image model"
            )
        if target_shapes is None:
            continue
        want = tuple(target_shapes[name])
        if tuple(delta.shape) != want:
            if delta.shape[1] == LUMINA2_DIM or delta.shape[0] == LUMINA2_DIM:
                raise CheckpointError(
                    f"this LoRA is for Lumina 2 (width {LUMINA2_DIM}), not Z-Image (key {delta.keys[0]!r})"
                )
            raise CheckpointError(
                f"LoRA key {delta.keys[0]!r} has shape (out, in) = {tuple(delta.shape)} but {name} of this model is "
                f"{want}: the LoRA was trained for a different model size"
            )
