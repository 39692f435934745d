"""Load a Z-Image ControlNet Union from any file users have, its version read off the keys and shapes.

Layouts (every one holds the checkpoint keys `control_layers.K.*`, `control_all_x_embedder.2-1.*` and, v1 and
v2.1, `control_noise_refiner.R.*`):
- Wan2GP's module files (`Z-Image-Turbo-Fun-Controlnet-Union*_bf16.safetensors`, a preset's `"modules"`), and
  their int8 quanto twins (`*_quanto_bf16_int8.safetensors`, read by the registered quantized loader);
- VideoX-Fun's single files (the same keys; a `model.diffusion_model.` prefix is stripped);
- a diffusers `ZImageControlNetModel` folder (`config.json` + `diffusion_pytorch_model.safetensors`).

Version (REFERENCE.md section 9): a control context of the transformer's latent channels (16) is v1; of
2 x 16 + 1 = 33 channels (guide, keep mask, masked image) it is v2: v2.1 when its `control_noise_refiner`
blocks carry a non-zero `before_proj` (v2.0 files keep those blocks untrained, zero, or lack them; diffusers'
single-file loader tells them apart the same way), else v2.0. A file names no layer places: they are spread
evenly over the main layers (`n_layers // blocks` apart: v1 6 blocks -> [0, 5, ..., 25], v2 15 -> [0, 2, ..., 28],
the released configs), unless a config JSON (a folder's `config.json`, or `<stem>_config.json` beside a file)
says otherwise. Weights load the flux way (loading_z_image.load_weights): meta build, one tensor at a time,
missing and unexpected keys reported, a missing key or a shape mismatch is a CheckpointError.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from common.errors import CheckpointError
from models.z_image.controlnet_z_image import (
    CHAIN_IN_REFINER,
    CONTROL_REFINER,
    PLAIN_REFINER,
    ZImageControlNet,
    ZImageControlNetConfig,
)
from models.z_image.convert_z_image import QUANTO_SUFFIXES, TRANSFORMER_PREFIXES, ConversionPlan, TensorRef, strip_prefixes
from models.z_image.loading_z_image import (
    Device,
    WeightFiles,
    _build_on_meta,
    _load_quantized,
    _open,
    load_weights,
    weight_files,
)
from models.z_image.transformer_z_image import ZImageConfig

logger = logging.getLogger(__name__)

CONTROL_KEY = re.compile(r"^control_(layers|all_x_embedder|noise_refiner)\.")
EMBEDDER_KEY = re.compile(r"^control_all_x_embedder\.(\d+)-(\d+)\.weight$")
FIRST_REFINER_PROJ = "control_noise_refiner.0.before_proj.weight"


def load_controlnet(
    path: Path, backbone: ZImageConfig, dtype: torch.dtype | None, device: Device = "cpu", config: Path | None = None
) -> ZImageControlNet:
    """A ControlNet for a transformer of config `backbone`, from a file or a diffusers folder (see module doc).

    config: a diffusers config JSON; default: the folder's `config.json` or `<stem>_config.json` beside a
    file, else the architecture is read off the tensors (`detect_config`).
    """
    path = Path(path)
    weights = WeightFiles(weight_files(path))
    quanto = weights.is_quanto()
    shapes = control_shapes(weights)
    config_file = config or _config_beside(path)
    if config_file is not None:
        try:
            cfg = ZImageControlNetConfig.from_json(config_file)
        except (OSError, ValueError, TypeError) as e:
            raise CheckpointError(f"ControlNet config {config_file}: {e}") from e
    else:
        cfg = detect_config(shapes, lambda: _is_zero(weights, FIRST_REFINER_PROJ), backbone, weights.name)
    logger.info("loading Z-Image ControlNet %s from %s: %s", cfg.version, weights.name, cfg)
    try:
        model = _build_on_meta(lambda: ZImageControlNet(cfg, backbone))
    except ValueError as e:
        raise CheckpointError(f"{weights.name}: {e}; pick the ControlNet made for this transformer") from e
    if quanto:
        return _load_quantized(model, weights, dtype, device).eval()
    load_weights(model, weights, plan_controlnet(weights.shapes, model.state_dict().keys(), cfg), dtype, device)
    return model.eval()


def control_shapes(weights: WeightFiles) -> dict[str, tuple[int, ...]]:
    """Prefix-stripped ControlNet keys -> shapes (int8 files: the weights' `._data`); refuses a file without them."""
    shapes = {}
    for key, shape in weights.shapes.items():
        name = strip_prefixes(key, TRANSFORMER_PREFIXES)
        if name.endswith(QUANTO_SUFFIXES[1:]):
            continue  # scales of an int8 file
        shapes[name.removesuffix("._data")] = shape
    control = {k: v for k, v in shapes.items() if CONTROL_KEY.match(k)}
    if not control:
        hint = ""
        if any(re.match(r"^layers\.\d+\.", k) for k in shapes):
            hint = " It is a transformer file: the ControlNet is the preset's \"modules\" file."
        raise CheckpointError(
            f"{weights.name} is not a Z-Image ControlNet (no control_layers.* / control_all_x_embedder.* keys; "
            f"first keys: {sorted(shapes)[:5]}).{hint}"
        )
    return control


def detect_config(
    shapes: Mapping[str, tuple[int, ...]], refiner_proj_is_zero: Callable[[], bool], backbone: ZImageConfig, source: str
) -> ZImageControlNetConfig:
    """The architecture from the ControlNet's (prefix-stripped) key shapes; `refiner_proj_is_zero()` reads
    `control_noise_refiner.0.before_proj` (v2.0 vs v2.1, asked only for a v2 file that has that tensor)."""
    embedder = next((k for k in shapes if EMBEDDER_KEY.match(k)), None)
    if embedder is None or "control_layers.0.before_proj.weight" not in shapes:
        raise CheckpointError(
            f"{source}: a Z-Image ControlNet needs control_all_x_embedder.P-F.weight and control_layers.0.before_proj; "
            "the file is incomplete or of another ControlNet"
        )
    patch, f_patch = (int(v) for v in EMBEDDER_KEY.match(embedder).groups())
    dim, patch_in = shapes[embedder]
    control_in_dim = patch_in // (patch * patch * f_patch)
    chain = _count(shapes, "control_layers")
    refiners = _count(shapes, "control_noise_refiner")
    channels = backbone.in_channels
    if control_in_dim == channels:
        mode = PLAIN_REFINER
        if not refiners or "control_noise_refiner.0.after_proj.weight" in shapes:
            raise CheckpointError(f"{source}: a v1 ControlNet ({channels} control channels) needs plain control_noise_refiner blocks")
    elif control_in_dim == 2 * channels + 1:
        has_proj = FIRST_REFINER_PROJ in shapes
        mode = CONTROL_REFINER if has_proj and not refiner_proj_is_zero() else CHAIN_IN_REFINER
    else:
        raise CheckpointError(
            f"{source}: control context of {control_in_dim} channels, expected {channels} (v1) or {2 * channels + 1} (v2, v2.1)"
        )
    stride = max(backbone.n_layers // chain, 1)
    n_refiner = refiners if mode != CHAIN_IN_REFINER else backbone.n_refiner_layers
    refiner_places = () if mode == PLAIN_REFINER else tuple(range(min(n_refiner, backbone.n_refiner_layers)))
    head_dim = shapes.get("control_layers.0.attention.norm_q.weight", (backbone.head_dim,))[0]
    try:
        return ZImageControlNetConfig(
            control_layers_places=tuple(i * stride for i in range(chain)),
            control_refiner_layers_places=refiner_places,
            control_in_dim=control_in_dim,
            add_control_noise_refiner=mode,
            all_patch_size=(patch,),
            all_f_patch_size=(f_patch,),
            dim=dim,
            n_refiner_layers=n_refiner,
            n_heads=dim // head_dim,
            n_kv_heads=dim // head_dim,
            norm_eps=backbone.norm_eps,
        )
    except ValueError as e:
        raise CheckpointError(f"{source}: cannot read the ControlNet's architecture from its tensors ({e}); pass a config JSON") from e


def plan_controlnet(
    shapes: Mapping[str, tuple[int, ...]], expected: object, cfg: ZImageControlNetConfig
) -> ConversionPlan:
    """File keys -> ours (prefixes stripped). Dropped: a v2.0 file's unused `control_noise_refiner.*`;
    unknown: everything else the model lacks (e.g. a full control transformer's own layers)."""
    wanted = set(expected)  # type: ignore[arg-type]
    sources: dict[str, TensorRef] = {}
    dropped, unknown = [], []
    for key in shapes:
        name = strip_prefixes(key, TRANSFORMER_PREFIXES)
        if name in wanted:
            sources[name] = TensorRef(key)
        elif cfg.add_control_noise_refiner == CHAIN_IN_REFINER and name.startswith("control_noise_refiner."):
            dropped.append(key)
        else:
            unknown.append(key)
    if dropped:
        logger.info("ControlNet v2.0: %d unused control_noise_refiner tensors in the file are ignored", len(dropped))
    return ConversionPlan(sources, dropped, unknown)


def _count(shapes: Mapping[str, tuple[int, ...]], name: str) -> int:
    indices = [int(m.group(1)) for k in shapes if (m := re.match(rf"^{name}\.(\d+)\.", k))]
    return max(indices) + 1 if indices else 0


def _is_zero(weights: WeightFiles, name: str) -> bool:
    """Whether the tensor `name` (prefixed or not, int8 `._data` or not) is all zeros."""
    for key, file in weights.key_file.items():
        if strip_prefixes(key, TRANSFORMER_PREFIXES) in (name, f"{name}._data"):
            with _open(file) as f:
                return not bool(f.get_tensor(key).any())
    return True


def _config_beside(path: Path) -> Path | None:
    """A folder's `config.json`, or `<stem>_config.json` next to a file."""
    candidate = path / "config.json" if path.is_dir() else path.with_name(f"{path.stem}_config.json")
    return candidate if candidate.is_file() else None
