"""Tiny random Z-Image components, built offline in a second, written in every checkpoint layout.

Used by the tests and by `wgp.py --selftest` (REFERENCE.md section 8). The same seed gives the same
weights in every layout. Tensors are stored in fp32 even where the file name says bf16: the name is the
layout, and CPUs without native bf16 compute it slowly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors.torch import save_file

from common.errors import CheckpointError
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
# The tokenizer's files in the `Qwen3/` folder that loading needs (write_flat_layout writes them).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


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
            noise = torch.randn(p.shape, generator=gen, device="cpu")
            if p.ndim >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif "norm" in name:
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def build_tiny_components(seed: int = 0, config: ZImageConfig = TINY_CONFIG, vae_levels: int = 4) -> TinyComponents:
    """All five parts with weights drawn from `seed` (global RNG state untouched).

    `config` and `vae_levels` (the VAE's depth: image pixels per latent pixel = 2 ** (levels - 1)) give
    other shapes diffusers accepts, for the tests of configs unlike the released model's.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = ZImageTransformer2DModel(**config.to_dict()).eval()
        _randomise(transformer, seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * vae_levels,
            up_block_types=("UpDecoderBlock2D",) * vae_levels,
            block_out_channels=(8, 16, 16, 16, 16)[:vae_levels],
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


def write_diffusers_layout(folder: Path, seed: int = 0, config: ZImageConfig = TINY_CONFIG, vae_levels: int = 4) -> Path:
    """Write a tiny model with diffusers' own `ZImagePipeline.save_pretrained` (transformer/ vae/ ...)."""
    from diffusers import ZImagePipeline

    parts = build_tiny_components(seed, config, vae_levels)
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


def write_flat_layout(folder: Path, seed: int = 0, config: ZImageConfig = TINY_CONFIG) -> dict[str, Path]:
    """Write a tiny model under the DeepBeepMeep/Z-Image file names; returns role -> path (`config`: another
    transformer shape, e.g. more layers for a ControlNet to control).

    Roles: transformer, vae, vae_config, scheduler_config, text_encoder, text_encoder_config, tokenizer
    (the `Qwen3/` folder with tokenizer.json, tokenizer_config.json, vocab.json, merges.txt).
    The text encoder is stored like the real file: `model.` prefix and a (tied) `lm_head`.
    """
    folder = Path(folder)
    paths = {role: folder / name for role, name in FLAT_NAMES.items()}
    paths["tokenizer"].mkdir(parents=True, exist_ok=True)
    parts = build_tiny_components(seed, config)

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


def write_selftest_layout(urls: Sequence[str] | None, text_encoder_urls: Sequence[str] | None, ckpts: Path) -> Path:
    """The self-test preset's files: the flat layout (seed 0) in its sub-folder of `ckpts`; returns that folder.

    Only missing files are added; nothing already there is replaced or deleted. The files are written
    into a fresh temporary folder under `ckpts`, moved in one by one, and only that temporary folder is
    removed. Where the preset points is checked first (`selftest_folder`).
    """
    ckpts = Path(ckpts)
    target = selftest_folder(list(urls or []), list(text_encoder_urls or []), ckpts)
    if not missing_selftest_files(target):
        return target
    ckpts.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".selftest-", suffix=".tmp", dir=ckpts))
    try:
        write_flat_layout(staging, seed=0)
        for source in sorted(p for p in staging.rglob("*") if p.is_file()):
            destination = target / source.relative_to(staging)
            if not destination.exists() and not destination.is_symlink():
                destination.parent.mkdir(parents=True, exist_ok=True)
                os.replace(source, destination)  # whole files only: a reader never sees half of one
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # the temporary folder made above, nothing else
    return target


def selftest_folder(urls: list[str], text_encoder_urls: list[str], ckpts: Path) -> Path:
    """`ckpts/<sub-folder>` named by a self-test preset, whose entries must be the flat layout's names.

    Refused with a CheckpointError that says what to write instead: URLs or absolute paths, `..`, the
    checkpoints folder itself (real weights live there), a folder that leads outside `ckpts` through a
    link, and file names this writer does not produce.
    """
    fix = (
        f'write "URLs": ["<folder>/{FLAT_NAMES["transformer"]}"] and "text_encoder_URLs": '
        f'["<folder>/{FLAT_NAMES["text_encoder"]}"], <folder> being a sub-folder name such as z_image_selftest'
    )
    if not urls or not text_encoder_urls:
        raise CheckpointError(f"a self-test preset needs URLs and text_encoder_URLs: {fix}")
    for key, value in (("URLs", urls[0]), ("text_encoder_URLs", text_encoder_urls[0])):
        parts = PurePosixPath(value.replace("\\", "/"))
        if "://" in value or parts.is_absolute() or Path(value).is_absolute() or ".." in parts.parts:
            raise CheckpointError(f"self-test model.{key} {value!r} is not a path inside the checkpoints folder: {fix}")
    entry = PurePosixPath(urls[0])
    if entry.parent == PurePosixPath(".") or entry.name != FLAT_NAMES["transformer"]:
        raise CheckpointError(f"self-test model.URLs {urls[0]!r} is not a file in a sub-folder of the checkpoints folder: {fix}")
    if PurePosixPath(text_encoder_urls[0]) != entry.parent / FLAT_NAMES["text_encoder"]:
        raise CheckpointError(f"self-test model.text_encoder_URLs {text_encoder_urls[0]!r} does not match URLs {urls[0]!r}: {fix}")
    target = ckpts / entry.parent
    if not target.resolve().is_relative_to(ckpts.resolve()):
        raise CheckpointError(f"self-test folder {target} leads outside the checkpoints folder {ckpts} through a link: {fix}")
    return target


def missing_selftest_files(folder: Path) -> list[str]:
    """Files of the flat layout (weights, configs, tokenizer) that `folder` lacks."""
    names = [name for role, name in FLAT_NAMES.items() if role != "tokenizer"]
    names += [f"{FLAT_NAMES['tokenizer']}/{name}" for name in TOKENIZER_FILES]
    return [name for name in names if not (folder / name).is_file()]


# ComfyUI / original single-file layout (REFERENCE.md section 5), spelled out by hand: these fixtures test
# the converter, so they must not share its tables (a wrong split order there must make them disagree).
COMFY_PREFIX = "model.diffusion_model."


def comfy_state_dict(state_dict: dict[str, torch.Tensor], fuse_ffn: bool = False) -> dict[str, torch.Tensor]:
    """Our (diffusers) transformer state dict -> a ComfyUI single file, each fused tensor concatenated by hand.

    - `attention.qkv` = rows [to_q ; to_k ; to_v]: the order diffusers 0.42.1's own single-file converter
      reads (`convert_z_image_transformer_checkpoint_to_diffusers`: `torch.chunk(qkv, 3)` -> q, k, v);
    - with `fuse_ffn`, diffusers' SwiGLU `FeedForward` layout: `feed_forward.net.0.proj` = rows [w3 ; w1]
      (`SwiGLU.forward`: `hidden, gate = proj(x).chunk(2)`, then `hidden * silu(gate)`, and in
      `w2(silu(w1 x) * w3 x)` w1 is the gated one), `feed_forward.net.2` = w2;
    - `attention.out`, `attention.q_norm` / `k_norm`, `x_embedder.`, `final_layer.`, the
      `model.diffusion_model.` prefix, and ComfyUI's unused `norm_final.weight`.
    """
    rest = dict(state_dict)
    out: dict[str, torch.Tensor] = {}
    for q_key in [k for k in state_dict if k.endswith(".attention.to_q.weight")]:
        block = q_key.removesuffix(".attention.to_q.weight")  # layers.N, noise_refiner.R or context_refiner.R
        att, ffn = f"{block}.attention.", f"{block}.feed_forward."
        q, k, v = (rest.pop(f"{att}{name}.weight") for name in ("to_q", "to_k", "to_v"))
        out[f"{att}qkv.weight"] = torch.cat([q, k, v])  # (3 * dim, dim)
        out[f"{att}out.weight"] = rest.pop(f"{att}to_out.0.weight")
        out[f"{att}q_norm.weight"] = rest.pop(f"{att}norm_q.weight")
        out[f"{att}k_norm.weight"] = rest.pop(f"{att}norm_k.weight")
        if fuse_ffn:
            w1, w3 = rest.pop(f"{ffn}w1.weight"), rest.pop(f"{ffn}w3.weight")
            out[f"{ffn}net.0.proj.weight"] = torch.cat([w3, w1])  # (2 * hidden, dim): [hidden ; gate]
            out[f"{ffn}net.2.weight"] = rest.pop(f"{ffn}w2.weight")
    for key, tensor in rest.items():
        for ours, theirs in (("all_x_embedder.2-1.", "x_embedder."), ("all_final_layer.2-1.", "final_layer.")):
            if key.startswith(ours):
                key = theirs + key.removeprefix(ours)
        out[key] = tensor
    out["norm_final.weight"] = torch.ones(state_dict["x_pad_token"].shape[-1])
    return {COMFY_PREFIX + key: tensor for key, tensor in out.items()}


def write_comfy_transformer(path: Path, seed: int = 0, fuse_ffn: bool = False) -> Path:
    """Write the tiny transformer as a ComfyUI single file (prefix, fused qkv; optionally fused FFN)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state_dict = build_tiny_components(seed).transformer.state_dict()
    save_file(_contiguous(comfy_state_dict(state_dict, fuse_ffn)), path)
    return path


def _contiguous(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in state_dict.items()}
