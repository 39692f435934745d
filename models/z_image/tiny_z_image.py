"""Tiny random Z-Image components, built offline in a second, written in every checkpoint layout.

Used by the tests and by `wgp.py --selftest` (REFERENCE.md section 8). The same seed gives the same
weights in every layout. Tensors are stored in fp32 even where the file name says bf16: the name is the
layout, and CPUs without native bf16 compute it slowly.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from models.z_image.convert_z_image import FUSED_SPLITS, TRANSFORMER_PREFIXES
from models.z_image.transformer_z_image import ZImageConfig

logger = logging.getLogger(__name__)

# cap_feat_dim must equal the text encoder's hidden size (64).
TINY_CONFIG = ZImageConfig(
    dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=64, axes_dims=(8, 12, 12)
)
TEXT_HIDDEN = 64

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
# Qwen3's template reduced to what Z-Image uses: with thinking enabled no think block is added.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
TRAINING_TEXT = (
    "a photo of a cat sitting on a red chair, studio lighting, high detail",
    "a watercolor painting of mountains at sunrise with mist in the valley",
    "portrait of an old man with a beard, black and white, film grain",
    "low quality, worst quality, blurry, pixelated, noisy, artifacts, watermark, text, logo",
    "The quick brown fox jumps over the lazy dog. 0123456789 !?,.;:'\"()[]{}",
)

FLAT_NAMES = {
    "transformer": "ZImageTurbo_bf16.safetensors",
    "vae": "ZImageTurbo_VAE_bf16.safetensors",
    "vae_config": "ZImageTurbo_VAE_bf16_config.json",
    "scheduler_config": "ZImageTurbo_scheduler_config.json",
    "text_encoder": "Qwen3/qwen3_bf16.safetensors",
    "text_encoder_config": "Qwen3/config.json",
    "tokenizer": "Qwen3",
}


@dataclass
class TinyComponents:
    """diffusers / transformers objects with random weights."""

    transformer: Any  # diffusers ZImageTransformer2DModel
    vae: Any  # diffusers AutoencoderKL
    text_encoder: Any  # transformers Qwen3Model
    tokenizer: Any  # PreTrainedTokenizerFast
    scheduler: Any  # FlowMatchEulerDiscreteScheduler


def build_tokenizer() -> Any:
    """Byte-level BPE trained in memory on a few sentences, with Qwen's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TRAINING_TEXT, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter (pad tokens and the zero-initialised final layer included) a random value.

    Matrices ~ N(0, 1/fan_in) keep activations O(1); norm weights ~ 1 + N(0, 0.1); other vectors ~ N(0, 0.1).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif "norm" in name:
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def build_tiny_components(seed: int = 0) -> TinyComponents:
    """All five parts with weights drawn from `seed` (global RNG state untouched)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = ZImageTransformer2DModel(**TINY_CONFIG.to_dict()).eval()
        _randomise(transformer, seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=8,
            sample_size=32,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ).eval()
        _randomise(vae, seed + 1)
        text_config = Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_HIDDEN,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
        )
        text_encoder = Qwen3Model(text_config).eval()
        _randomise(text_encoder, seed + 2)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return TinyComponents(transformer, vae, text_encoder, tokenizer, scheduler)


def write_diffusers_layout(folder: Path, seed: int = 0) -> Path:
    """Write a tiny model with diffusers' own `ZImagePipeline.save_pretrained` (transformer/ vae/ ...)."""
    from diffusers import ZImagePipeline

    parts = build_tiny_components(seed)
    pipe = ZImagePipeline(
        scheduler=parts.scheduler,
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        transformer=parts.transformer,
    )
    folder = Path(folder)
    pipe.save_pretrained(folder)
    return folder


def write_flat_layout(folder: Path, seed: int = 0) -> dict[str, Path]:
    """Write a tiny model under the DeepBeepMeep/Z-Image file names; returns role -> path.

    Roles: transformer, vae, vae_config, scheduler_config, text_encoder, text_encoder_config, tokenizer
    (the `Qwen3/` folder with tokenizer.json, tokenizer_config.json, vocab.json, merges.txt).
    The text encoder is stored like the real file: `model.` prefix and a (tied) `lm_head`.
    """
    folder = Path(folder)
    paths = {role: folder / name for role, name in FLAT_NAMES.items()}
    paths["tokenizer"].mkdir(parents=True, exist_ok=True)
    parts = build_tiny_components(seed)

    save_file(_contiguous(parts.transformer.state_dict()), paths["transformer"])
    save_file(_contiguous(parts.vae.state_dict()), paths["vae"])
    paths["vae_config"].write_text(parts.vae.to_json_string())
    paths["scheduler_config"].write_text(parts.scheduler.to_json_string())

    text_sd = {f"model.{k}": v for k, v in parts.text_encoder.state_dict().items()}
    text_sd["lm_head.weight"] = text_sd["model.embed_tokens.weight"].clone()
    save_file(_contiguous(text_sd), paths["text_encoder"])
    text_config = parts.text_encoder.config.to_dict()
    text_config["architectures"] = ["Qwen3ForCausalLM"]
    paths["text_encoder_config"].write_text(json.dumps(text_config, indent=2, sort_keys=True))

    parts.tokenizer.save_pretrained(paths["tokenizer"])
    parts.tokenizer.backend_tokenizer.model.save(str(paths["tokenizer"]))  # vocab.json + merges.txt
    return paths


# Our names -> ComfyUI names (plain substring replacements; the converter's KEY_RENAMES undo them).
COMFY_NAMES: tuple[tuple[str, str], ...] = (
    (".attention.to_out.0.", ".attention.out."),
    (".attention.norm_q.", ".attention.q_norm."),
    (".attention.norm_k.", ".attention.k_norm."),
    ("all_x_embedder.2-1.", "x_embedder."),
    ("all_final_layer.2-1.", "final_layer."),
)


def comfy_state_dict(state_dict: dict[str, torch.Tensor], fuse_ffn: bool = False) -> dict[str, torch.Tensor]:
    """Our (diffusers) transformer state dict -> ComfyUI names: the inverse of the converter's tables."""
    splits = FUSED_SPLITS if fuse_ffn else FUSED_SPLITS[:1]
    names = COMFY_NAMES + ((".feed_forward.w2.", ".feed_forward.net.2."),) if fuse_ffn else COMFY_NAMES
    fused: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    for fused_name, parts in splits:
        for key in [k for k in state_dict if parts[0] in k]:
            members = [key.replace(parts[0], part) for part in parts]
            fused[key.replace(parts[0], fused_name)] = torch.cat([state_dict[m] for m in members])
            consumed.update(members)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in [*fused.items(), *((k, v) for k, v in state_dict.items() if k not in consumed)]:
        for ours, theirs in names:
            key = key.replace(ours, theirs)
        out[TRANSFORMER_PREFIXES[0] + key] = tensor
    out[TRANSFORMER_PREFIXES[0] + "norm_final.weight"] = torch.ones(state_dict["x_pad_token"].shape[-1])
    return out


def write_comfy_transformer(path: Path, seed: int = 0, fuse_ffn: bool = False) -> Path:
    """Write the tiny transformer as a ComfyUI single file (prefix, fused qkv; optionally fused FFN)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state_dict = build_tiny_components(seed).transformer.state_dict()
    save_file(_contiguous(comfy_state_dict(state_dict, fuse_ffn)), path)
    return path


def _contiguous(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in state_dict.items()}
