"""Load the Z-Image parts from local paths, in every layout users have (REFERENCE.md section 5).

Weights load the flux way: the model is built on the meta device (no memory, no init cost), each tensor is
read from the memory-mapped safetensors file, cast to the requested dtype and moved to the device one at a
time, then attached with `load_state_dict(assign=True)`: no second full copy exists at any point (tensors
already in the requested dtype on CPU stay backed by the file mapping: page cache, not process memory). Missing
and unexpected keys are logged every time; a missing key or a shape mismatch is a `CheckpointError`.

This module never imports mmgp (importing it patches transformers/torch globally); int8 quanto files are
loaded by a hook that the quantization module registers (`register_quantized_loader`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from common.errors import CheckpointError
from models.z_image.convert_z_image import (
    QUANTO_SUFFIXES,
    ConversionPlan,
    TensorRef,
    detect_layout,
    plan_conversion,
    strip_prefixes,
)
from models.z_image.transformer_z_image import ZImageConfig, ZImageTransformer

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
Device = str | torch.device

# fmt -> fn(model built on meta, weight files, dtype, device) -> loaded model.
QuantizedLoader = Callable[[nn.Module, list[Path], "torch.dtype | None", Device], nn.Module]
_QUANTIZED_LOADERS: dict[str, QuantizedLoader] = {}


def register_quantized_loader(fn: QuantizedLoader, fmt: str = "quanto") -> None:
    """Let the quantization module load int8 files: `fn(meta_model, files, dtype, device) -> model`."""
    _QUANTIZED_LOADERS[fmt] = fn


# -- safetensors files -----------------------------------------------------------------------------


class WeightFiles:
    """The header of one or more safetensors files (one model): key -> file, key -> shape, metadata."""

    def __init__(self, files: list[Path]):
        self.files = files
        self.key_file: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.metadata: dict[str, str] = {}
        for file in files:
            with _open(file) as f:
                self.metadata.update(f.metadata() or {})
                for key in f.keys():
                    self.key_file[key] = file
                    self.shapes[key] = tuple(f.get_slice(key).get_shape())

    @property
    def name(self) -> str:
        return str(self.files[0]) if len(self.files) == 1 else f"{self.files[0].parent} ({len(self.files)} shards)"

    def is_quanto(self) -> bool:
        return self.metadata.get("quantization_format") == "quanto" or any(
            k.endswith(".weight._data") for k in self.shapes
        )


def _open(file: Path) -> Any:
    """safe_open with errors that name the file and say what to do."""
    if not file.is_file():
        raise CheckpointError(f"weights file not found: {file}")
    try:
        return safe_open(str(file), framework="pt", device="cpu")  # memory-mapped
    except SafetensorError as e:
        raise CheckpointError(
            f"{file} is incomplete or corrupt ({e}); the download was probably interrupted: "
            "delete it and download it again."
        ) from e


def weight_files(path: Path, stem: str = "diffusion_pytorch_model") -> list[Path]:
    """The safetensors file(s) of one model: a file, or a folder with `<stem>.safetensors`, a sharded
    `*.safetensors.index.json`, or exactly one `*.safetensors` file."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"weights not found: {path} (expected a .safetensors file or a folder)")
    if (path / f"{stem}.safetensors").is_file():
        return [path / f"{stem}.safetensors"]
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{indexes[0]} is not a valid safetensors index ({e}); download it again.") from e
        return [path / name for name in sorted(set(weight_map.values()))]
    singles = sorted(path.glob("*.safetensors"))
    if len(singles) == 1:
        return singles
    raise CheckpointError(
        f"{path}: expected {stem}.safetensors or a *.safetensors.index.json, found {[p.name for p in singles]}"
    )


def load_weights(
    model: nn.Module, weights: WeightFiles, plan: ConversionPlan, dtype: torch.dtype | None, device: Device
) -> None:
    """Fill a meta-built `model` from `weights` following `plan`, one tensor at a time (see module doc)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(plan.sources))
    unexpected = sorted(plan.unknown + [k for k in plan.sources if k not in expected])
    log = logger.warning if unexpected else logger.info
    log("%s: %d tensors, missing keys: %s, unexpected keys: %s", weights.name, len(expected), missing, unexpected)
    if plan.dropped:
        logger.debug("%s: ignored keys %s", weights.name, plan.dropped)
    if missing:
        raise CheckpointError(
            f"{weights.name} lacks {len(missing)} tensors the model needs, e.g. {missing[:8]}; the file is of another "
            "variant or incomplete."
        )
    mismatched = []
    for key, ref in plan.sources.items():
        shape = _ref_shape(ref, weights.shapes)
        if key in expected and shape != expected[key]:
            mismatched.append(f"{key}: file {list(shape)}, model {list(expected[key])}")
    if mismatched:
        raise CheckpointError(
            f"{weights.name} does not fit the model config ({len(mismatched)} shape mismatches, "
            f"e.g. {mismatched[:4]}); check the config JSON used for this file."
        )

    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[tuple[str, TensorRef]]] = {}
    for key, ref in plan.sources.items():
        if key in expected:
            by_file.setdefault(weights.key_file[ref.key], []).append((key, ref))
    for file, refs in by_file.items():
        with _open(file) as f:
            for key, ref in refs:
                try:
                    tensor = (
                        f.get_tensor(ref.key) if ref.rows is None else f.get_slice(ref.key)[ref.rows[0] : ref.rows[1]]
                    )
                except SafetensorError as e:
                    raise CheckpointError(
                        f"{file}: cannot read {ref.key} ({e}); the file is corrupt: download it again."
                    ) from e
                cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
                tensor = tensor.to(device=device, dtype=cast)
                if tensor.untyped_storage().nbytes() > tensor.nbytes:
                    # A row slice of a fused tensor is a view of the whole; give each parameter its own
                    # storage so replacing one later (LoRA merge, quantization) frees its memory.
                    tensor = tensor.clone()
                state[key] = tensor
    model.load_state_dict(state, strict=True, assign=True)
    model.to(device)  # buffers built in __init__ (e.g. rotary tables); parameters are already there


def _ref_shape(ref: TensorRef, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
    shape = shapes[ref.key]
    return shape if ref.rows is None else (ref.rows[1] - ref.rows[0], *shape[1:])


def _build_on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """Parameters on the meta device; buffers (e.g. rotary tables computed in __init__) stay real."""
    from accelerate import init_empty_weights

    with torch.device("cpu"), init_empty_weights(include_buffers=False):  # never the caller's default device
        return build()


def _load_quantized(model: nn.Module, weights: WeightFiles, dtype: torch.dtype | None, device: Device) -> nn.Module:
    loader = _QUANTIZED_LOADERS.get("quanto")
    if loader is None:
        raise CheckpointError(
            f"{weights.name} is an int8 quanto file; loading int8 weights needs the quantization module, which is not "
            "available in this build. Use the bf16 file instead "
            "(e.g. ZImageTurbo_bf16.safetensors / qwen3_bf16.safetensors)."
        )
    logger.info("%s: int8 quanto file, loading through the registered quantized loader", weights.name)
    return loader(model, weights.files, dtype, device)


# -- transformer -----------------------------------------------------------------------------------


SCALED_FP8_MARKERS = ("scaled_fp8", ".scale_weight", ".scale_input")


def load_transformer(
    path: Path, config: ZImageConfig | Path | None, dtype: torch.dtype | None, device: Device = "cpu"
) -> ZImageTransformer:
    """Load the transformer from a flat / ComfyUI / quanto .safetensors file or a diffusers `transformer/` folder.

    config: a ZImageConfig, a config JSON, or None (the folder's config.json, else inferred from tensor shapes).
    """
    path = Path(path)
    weights = WeightFiles(weight_files(path))
    layout = detect_layout(weights.shapes, weights.metadata, source=weights.name)
    if any(k.endswith(SCALED_FP8_MARKERS) for k in weights.shapes):
        raise CheckpointError(
            f"{weights.name} is a ComfyUI scaled-fp8 file (per-tensor `scale_weight`), which this loader does not "
            "dequantize. Use a bf16 file (e.g. ZImageTurbo_bf16.safetensors) or the int8 quanto file."
        )
    if layout == "quanto":
        shapes = {_strip_quanto(k): s for k, s in weights.shapes.items() if not k.endswith(QUANTO_SUFFIXES[1:])}
        plan = None
    else:
        plan = plan_conversion(weights.shapes)
        shapes = {k: _ref_shape(ref, weights.shapes) for k, ref in plan.sources.items()}
    config = _resolve_config(path, config, shapes)
    logger.info("loading Z-Image transformer (%s layout) from %s: %s", layout, weights.name, config)
    model = _build_on_meta(lambda: ZImageTransformer(config))
    if plan is None:
        model = _load_quantized(model, weights, dtype, device)
    else:
        plan = plan_conversion(weights.shapes, expected=model.state_dict().keys())
        load_weights(model, weights, plan, dtype, device)
    return model.eval()


def _strip_quanto(key: str) -> str:
    return key[: -len("._data")] if key.endswith("._data") else key


def _resolve_config(
    path: Path, config: ZImageConfig | Path | None, shapes: Mapping[str, tuple[int, ...]]
) -> ZImageConfig:
    if isinstance(config, ZImageConfig):
        return config
    file = Path(config) if config is not None else path / "config.json" if (path / "config.json").is_file() else None
    if file is None:
        return infer_config(shapes)
    try:
        return ZImageConfig.from_json(file)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"transformer config {file}: {e}") from e


def infer_config(shapes: Mapping[str, tuple[int, ...]]) -> ZImageConfig:
    """Read the architecture off our-named tensor shapes (flat and ComfyUI files ship no config).

    dim from x_pad_token, layer counts from the highest block indices, cap_feat_dim from cap_embedder,
    head dim from the QK-norm weight, patch sizes from the embedder's name, in_channels from its width.
    RoPE axes are split like the released model (1/4, 3/8, 3/8 of the head dim: 32/48/48 for 128); the
    remaining fields (theta, axes_lens, eps) keep the released model's values.
    """
    try:
        dim = shapes["x_pad_token"][-1]
        cap_feat_dim = shapes["cap_embedder.1.weight"][1]
        head_dim = shapes["layers.0.attention.norm_q.weight"][0]
        embedder = next(k for k in shapes if re.match(r"^all_x_embedder\.\d+-\d+\.weight$", k))
    except (KeyError, StopIteration) as e:
        raise CheckpointError(f"cannot infer the transformer config: tensor {e} is missing; pass a config JSON") from e
    patch, f_patch = (int(v) for v in embedder.split(".")[1].split("-"))
    quarter = head_dim // 4
    axes = (quarter, (head_dim - quarter) // 2, (head_dim - quarter) // 2)
    try:
        return ZImageConfig(
            all_patch_size=(patch,),
            all_f_patch_size=(f_patch,),
            in_channels=shapes[embedder][1] // (patch * patch * f_patch),
            dim=dim,
            n_layers=_count_blocks(shapes, "layers"),
            n_refiner_layers=_count_blocks(shapes, "noise_refiner"),
            n_heads=dim // head_dim,
            n_kv_heads=dim // head_dim,
            cap_feat_dim=cap_feat_dim,
            axes_dims=axes,
        )
    except ValueError as e:
        raise CheckpointError(
            f"cannot infer the transformer config from the tensor shapes ({e}); pass a config JSON"
        ) from e


def _count_blocks(shapes: Mapping[str, Any], name: str) -> int:
    indices = [int(m.group(1)) for k in shapes if (m := re.match(rf"^{name}\.(\d+)\.", k))]
    return max(indices) + 1 if indices else 0


# -- text encoder, tokenizer, VAE ------------------------------------------------------------------

TEXT_ENCODER_PREFIXES = ("model.",)


def load_text_encoder(
    path: Path, config_path: Path | None, dtype: torch.dtype | None, device: Device = "cpu"
) -> nn.Module:
    """Qwen3 (transformers `Qwen3Model`: the pipeline takes hidden_states[-2], so no LM head is needed).

    path: a flat file (`Qwen3/qwen3_bf16.safetensors`; keys with or without `model.`, an `lm_head` is ignored)
    with `config_path` (default: `config.json` beside it), or a diffusers `text_encoder/` folder.
    """
    from transformers import Qwen3Config, Qwen3Model

    path = Path(path)
    if path.is_dir():
        WeightFiles(weight_files(path, stem="model"))  # validates the files first, for a clear error
        with torch.device("cpu"):  # built in RAM first, whatever default device a library left set
            model = Qwen3Model.from_pretrained(path, dtype=dtype, local_files_only=True)
        return model.to(device).eval()
    config_path = Path(config_path) if config_path is not None else path.parent / "config.json"
    try:
        config = Qwen3Config.from_json_file(str(config_path))
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"text encoder config {config_path} cannot be read ({e}); it ships beside the weights"
        ) from e
    weights = WeightFiles([path])
    model = _build_on_meta(lambda: Qwen3Model(config))
    if weights.is_quanto():
        return _load_quantized(model, weights, dtype, device).eval()
    sources, dropped = {}, []
    for key in weights.shapes:
        if key.startswith("lm_head."):
            dropped.append(key)  # tied to the embeddings, or unused: we only need hidden states
        else:
            sources[strip_prefixes(key, TEXT_ENCODER_PREFIXES)] = TensorRef(key)
    if not any(k.startswith("layers.") and ".self_attn." in k for k in sources):
        raise CheckpointError(
            f"{path} is not a Qwen3 text encoder (no layers.N.self_attn keys); first keys: {sorted(sources)[:5]}"
        )
    load_weights(model, weights, ConversionPlan(sources, dropped, []), dtype, device)
    return model.eval()


def load_tokenizer(folder: Path) -> Any:
    """The Qwen3 tokenizer from a local folder (tokenizer.json, tokenizer_config.json), offline."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise CheckpointError(f"no tokenizer in {folder}: expected tokenizer.json and tokenizer_config.json")
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the tokenizer from {folder}: {e}") from e


def load_vae(path: Path, config_path: Path | None, dtype: torch.dtype | None, device: Device = "cpu") -> nn.Module:
    """diffusers AutoencoderKL from a flat file + config JSON (default `<stem>_config.json`) or a `vae/` folder."""
    from diffusers import AutoencoderKL

    path = Path(path)
    if path.is_dir():
        WeightFiles(weight_files(path))
        with torch.device("cpu"):  # built in RAM first, whatever default device a library left set
            model = AutoencoderKL.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
        return model.to(device).eval()
    config_path = Path(config_path) if config_path is not None else path.with_name(f"{path.stem}_config.json")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"VAE config {config_path} cannot be read ({e}); it ships beside the VAE weights") from e
    weights = WeightFiles([path])
    model = _build_on_meta(lambda: AutoencoderKL.from_config(config))
    load_weights(model, weights, ConversionPlan({k: TensorRef(k) for k in weights.shapes}, [], []), dtype, device)
    return model.eval()
