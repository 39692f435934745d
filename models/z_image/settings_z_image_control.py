"""Settings of the ControlNet model types (`z_image_control`: v1; `z_image_control2`, `z_image_control2_1`:
v2, v2.1), with Wan2GP's names so its presets and saved settings run unchanged.

A control type takes Turbo's settings without image-to-image (`denoising_strength`; the ControlNet
inpainting of diffusers' `ZImageControlNetInpaintPipeline` always runs every step), plus:
- `image_guide`: the control image (diffusers' `control_image`), made from a picture by
  `control_preprocess` (models/z_image/control_images.py) or used as it is;
- `control_net_weight`: the ControlNet's strength (diffusers' `controlnet_conditioning_scale`);
- v2 / v2.1 only: `image_mask` (white = repaint) and `image_start` (the picture to repaint; without it,
  the guide image is the one repainted, as in Wan2GP).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.errors import SettingsError
from common.settings_schema import SettingSpec, by_name, convert

V1_TYPES = ("z_image_control",)
V2_TYPES = ("z_image_control2", "z_image_control2_1")
CONTROL_TYPES = V1_TYPES + V2_TYPES
IMAGE_TO_IMAGE_ONLY = ("denoising_strength",)  # Turbo's settings a control type does not take
PREPROCESSORS = ("raw", "canny", "soft_edge", "scribble", "gray")

CONTROL_SETTINGS: tuple[SettingSpec, ...] = (
    SettingSpec(
        "image_guide", "image", None,
        "the control image: your own pose / depth / edge map (control_preprocess raw), or a picture turned into "
        "one by control_preprocess; stretched to the chosen resolution",
        group="image", label="Control image (guide)", preview=True,
    ),
    SettingSpec(
        "control_preprocess", "choice", "raw",
        "what is made of image_guide before the ControlNet sees it: raw (as it is), canny (thin edges), soft_edge "
        "(soft edges), scribble (thick white strokes), gray (grayscale)",
        choices=PREPROCESSORS, aliases=(("none", "raw"), ("edges", "canny"), ("grayscale", "gray"), ("softedge", "soft_edge")),
        group="image", label="Make the control image from it",
    ),
    SettingSpec(
        "control_net_weight", "float", 0.75,
        "strength of the control: the ControlNet's residuals are multiplied by it (0 = no control)",
        minimum=0, maximum=2, label="Control strength", step=0.05,
    ),
    # Wan2GP's presets carry a second control weight; Z-Image has one ControlNet, so it changes nothing.
    SettingSpec(
        "control_net_weight_alt", "float", 0.75, "Wan2GP's weight of a second control; unused by Z-Image (one ControlNet)",
        minimum=0, group="hidden", changes_image=False, cli=False,
    ),
)
CONTROL_SPECS = by_name(CONTROL_SETTINGS)
CONTROL_KEYS = tuple(CONTROL_SPECS)  # the keys the engine's GenerationSettings does not hold


def control_schema(base: list[SettingSpec], model_type: str) -> list[SettingSpec]:
    """A control type's settings: Turbo's (with this type's defaults) without image-to-image's strength, and
    the control settings. `image_start` / `image_mask` keep Turbo's specs (for a v2 / v2.1 ControlNet they
    are ControlNet inpainting's picture and mask); v1 does not take them."""
    dropped = set(IMAGE_TO_IMAGE_ONLY) | (set() if model_type in V2_TYPES else {"image_start", "image_mask"})
    return [s for s in base if s.name not in dropped] + list(CONTROL_SETTINGS)


@dataclass(frozen=True)
class ControlSettings:
    """The engine's control settings (image_guide a PIL image, or a path when the engine is called directly)."""

    image_guide: Any = None
    control_preprocess: str = "raw"
    control_net_weight: float = 0.75
    control_net_weight_alt: float = 0.75

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ControlSettings:
        """Checked with the specs (SettingsError naming the field); an image stays as given."""
        values = {k: v if k == "image_guide" else convert(CONTROL_SPECS[k], v) for k, v in raw.items()}
        return cls(**values)


def split_control_settings(settings: Mapping[str, Any]) -> tuple[ControlSettings, dict[str, Any]]:
    """(the control settings, the rest for GenerationSettings)."""
    control = {k: v for k, v in settings.items() if k in CONTROL_SPECS}
    rest = {k: v for k, v in settings.items() if k not in CONTROL_SPECS}
    return ControlSettings.from_dict(control), rest


CONTROL_VERSIONS = {"z_image_control": "v1", "z_image_control2": "v2.0", "z_image_control2_1": "v2.1"}


def check_modules(modules: Any) -> list[list[str]]:
    """A ControlNet preset's `"modules"` (Wan2GP: `[[bf16 file, int8 file]]`, the variants of each module file;
    a plain list of files is one module) -> a list of variant lists; SettingsError saying the expected shape."""
    shape = 'e.g. "modules": [["https://.../Z-Image-Turbo-Fun-Controlnet-Union_bf16.safetensors", "..._int8.safetensors"]]'
    if isinstance(modules, list) and modules and all(isinstance(m, str) for m in modules):
        modules = [modules]
    if (
        not isinstance(modules, list)
        or not modules
        or not all(isinstance(m, list) and m and all(isinstance(v, str) and v for v in m) for m in modules)
    ):
        raise SettingsError(f"model.modules must list the ControlNet file and its variants ({shape}), got {modules!r}")
    if len(modules) > 1:
        raise SettingsError(f"model.modules lists {len(modules)} modules; a Z-Image ControlNet preset takes one ({shape})")
    return [list(m) for m in modules]
