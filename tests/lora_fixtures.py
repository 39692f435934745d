"""Helpers for the LoRA tests: a tiny random transformer, one random low-rank delta per Linear, that delta
written in every dialect of REFERENCE.md section 6, and a model with the delta merged by hand.

The writers here are deliberately independent of the normaliser (plain string building), so a test
checks the normaliser against the dialects' definitions, not against itself.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from models.z_image.lora_z_image import normalize_lora
from models.z_image.transformer_z_image import ZImageConfig, ZImageTransformer

TINY = ZImageConfig(
    dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=64, axes_dims=(8, 12, 12)
)
NORMALIZER = SimpleNamespace(normalize_lora=normalize_lora)
RANK = 4
ALPHA = 2.0  # scale alpha / rank = 0.5 where the dialect stores alpha


def tiny_model(seed: int = 0, cfg: ZImageConfig = TINY) -> ZImageTransformer:
    """Random weights everywhere (pad tokens and the zero-initialised final layer included), fp32, eval."""
    gen = torch.Generator().manual_seed(seed)
    model = ZImageTransformer(cfg).eval()
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))
            else:
                p.copy_(1 + 0.1 * noise if "norm" in name else 0.1 * noise)
    return model


Inputs = tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]


def inputs(seed: int = 1, batch: int = 1, cfg: ZImageConfig = TINY) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 16, 8, 8, generator=gen)
    t = torch.full((batch,), 0.3)
    captions = [torch.randn(20, cfg.cap_feat_dim, generator=gen) for _ in range(batch)]
    return latents, t, captions


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


@dataclass
class RandomLora:
    """Per module: down (r, in), up (out, r) such that the intended delta is scale * up @ down.

    q, k and v of a block share `down`, so the same LoRA can also be written with a fused qkv.
    """

    down: dict[str, torch.Tensor]
    up: dict[str, torch.Tensor]
    scale: float = ALPHA / RANK

    def delta(self, module: str) -> torch.Tensor:
        return self.scale * self.up[module] @ self.down[module]


def random_lora(model: nn.Module, seed: int = 2, rank: int = RANK) -> RandomLora:
    gen = torch.Generator().manual_seed(seed)
    shapes = {n: m.weight.shape for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    down, up = {}, {}
    for name, (out, inp) in shapes.items():
        shared = name.rsplit(".", 1)[0] + ".to_q" if name.endswith((".to_k", ".to_v")) else None
        down[name] = down[shared] if shared else torch.randn(rank, inp, generator=gen) / math.sqrt(inp)
        up[name] = torch.randn(out, rank, generator=gen) * 0.3
    return RandomLora(down, up)


def merged_by_hand(model: nn.Module, deltas: dict[str, torch.Tensor], multiplier: float) -> nn.Module:
    merged = copy.deepcopy(model)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for name, d in deltas.items():
            modules[name].weight += multiplier * d
    return merged


# -- dialect writers: RandomLora -> state dict ----------------------------------------------------


def _flat(module: str) -> str:
    return module.replace(".", "_")


def _pairs(lora: RandomLora, prefix: str, down: str, up: str, flat: bool = False, alpha: bool = False) -> dict:
    """`{prefix}{module}{down|up}` (+ `.alpha`); without alpha the scale is folded into up."""
    sd = {}
    for m in lora.down:
        stem = prefix + (m.replace(".", "_") if flat else m)
        sd[stem + down] = lora.down[m].clone()
        sd[stem + up] = lora.up[m] * (1.0 if alpha else lora.scale)
        if alpha:
            sd[stem + ".alpha"] = torch.tensor(ALPHA)
    return sd


def mixed_prefixes(lora: RandomLora) -> dict:
    """Prefixes alternate between modules: the normaliser must not decide from the first key."""
    a = _pairs(lora, "diffusion_model.", ".lora_A.weight", ".lora_B.weight")
    b = _pairs(lora, "transformer.", ".lora_A.weight", ".lora_B.weight")
    return {k: v for i, (k, v) in enumerate(a.items()) if (i // 2) % 2} | {
        k: v for i, (k, v) in enumerate(b.items()) if not (i // 2) % 2
    }


PEFT = (".lora_A.weight", ".lora_B.weight")
KOHYA = (".lora_down.weight", ".lora_up.weight")
DIALECTS: dict[str, Callable[[RandomLora], dict]] = {
    "ai-toolkit": lambda lo: _pairs(lo, "diffusion_model.", *PEFT),
    "diffusers": lambda lo: _pairs(lo, "transformer.", *PEFT, alpha=True),
    "peft": lambda lo: _pairs(lo, "base_model.model.transformer.", *PEFT),
    "musubi": lambda lo: _pairs(lo, "lora_unet_", *KOHYA, flat=True, alpha=True),
    "videox-fun": lambda lo: _pairs(lo, "lora_unet__", *KOHYA, flat=True, alpha=True),
    "onetrainer": lambda lo: _pairs(lo, "lora_transformer_", *KOHYA, flat=True, alpha=True),
    "diffsynth": lambda lo: _pairs(lo, "", ".lora_A.default.weight", ".lora_B.default.weight"),
    "mixed-prefixes": mixed_prefixes,
}


def comfy_fused(lora: RandomLora, out_name: str = "out") -> dict:
    """ComfyUI-native: fused qkv (A shared, B stacked q,k,v), `attention.out` dot-mangled, x_embedder / final_layer."""
    sd = {}
    for m in lora.down:
        if m.endswith((".to_k", ".to_v")):
            continue
        name = m.replace("all_x_embedder.2-1", "x_embedder").replace("all_final_layer.2-1", "final_layer")
        if m.endswith(".to_q"):
            base = m[: -len(".to_q")]
            up = torch.cat([lora.up[f"{base}.to_{p}"] for p in "qkv"]) * lora.scale
            sd[f"diffusion_model.{base}.qkv.lora_A.weight"] = lora.down[m].clone()
            sd[f"diffusion_model.{base}.qkv.lora_B.weight"] = up
        elif m.endswith(".to_out.0"):
            base = m[: -len(".to_out.0")]
            sd[f"diffusion_model.{base}.{out_name}.lora.down.weight"] = lora.down[m].clone()
            sd[f"diffusion_model.{base}.{out_name}.lora.up.weight"] = lora.up[m] * lora.scale
        else:
            sd[f"diffusion_model.{name}.lora_A.weight"] = lora.down[m].clone()
            sd[f"diffusion_model.{name}.lora_B.weight"] = lora.up[m] * lora.scale
    return sd


DIALECTS["comfy-fused"] = comfy_fused
DIALECTS["comfy-fused-wo"] = lambda lo: comfy_fused(lo, "wo")


def run(model: nn.Module, seed: int = 1) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs(seed))


def peft_with_header(lora: RandomLora, modules: list[str], config: dict, prefix: str = "transformer.") -> tuple[dict, dict]:
    """What diffusers' training scripts save: `{prefix}{module}.lora_A/B.weight` with no alpha tensor (B not
    scaled), and the LoraConfig as JSON in the safetensors header under `lora_adapter_metadata`, its keys
    prefixed like the tensors. Returns (state dict, header metadata) for `save_file(sd, path, metadata=...)`."""
    sd = {}
    for m in modules:
        sd[f"{prefix}{m}.lora_A.weight"] = lora.down[m].clone()
        sd[f"{prefix}{m}.lora_B.weight"] = lora.up[m].clone()
    header = {f"{prefix}{k}": v for k, v in config.items()}
    return sd, {"format": "pt", "lora_adapter_metadata": json.dumps(header, sort_keys=True)}
