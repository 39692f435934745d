"""Generation settings for Z-Image: the schema the family declares, and the engine's typed settings.

`SETTINGS` is what the host builds validation, flags, the web form and the docs table from (the same
names as the task files). Its defaults are Turbo's; the handler puts each architecture's own over them
(z_image_handler.py ARCHITECTURE_DEFAULTS), and a preset's values come over those.
`GenerationSettings.from_dict` converts with the same specs, so the engine alone checks what the host checks.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, fields
from typing import Any

from common.errors import SettingsError
from common.settings_schema import SettingSpec, as_int, by_name, check_side, convert, parse_size

SIZE_MULTIPLE = 16  # VAE factor 8 x patch size 2
MAX_SIDE = 4096
MAX_TOKENS = 1024

SETTINGS: tuple[SettingSpec, ...] = (
    SettingSpec("prompt", "text", "", "what to draw", lines=3),
    SettingSpec("negative_prompt", "text", "", "what to avoid; acts only when guidance_scale > 0", lines=2),
    SettingSpec(
        "resolution", "size", "1024x1024", "width x height in pixels (or diffusers' width and height)",
        minimum=SIZE_MULTIPLE, maximum=MAX_SIDE, multiple_of=SIZE_MULTIPLE,
    ),
    SettingSpec(
        "num_inference_steps", "int", 8, "sampler steps; N steps = N transformer evaluations per guidance branch",
        minimum=1, maximum=1000, flag="steps", label="Steps",
    ),
    SettingSpec(
        "guidance_scale", "float", 0.0, "classifier-free guidance scale; 0 turns guidance off", minimum=0,
        range_text=">= 0 (0 turns guidance off)", flag="guidance", label="Guidance", step=0.1,
    ),
    SettingSpec("flow_shift", "float", 3.0, "shift of the sigma schedule", minimum=0, exclusive_minimum=True, step=0.1),
    SettingSpec(
        "seed", "int", -1, "-1 = random; the used seed is recorded in the image", minimum=-1, maximum=2**63 - 1,
        range_text="-1 (random) or between 0 and 2^63-1", label="Seed (-1 = random)",
    ),
    SettingSpec("batch_size", "int", 1, "images per prompt", minimum=1, maximum=64),
    SettingSpec(
        "cfg_normalization", "float", False,
        "false = off, true = 1, or k: the guided prediction's norm is kept within k times the conditional one",
        minimum=0, range_text="false/true or a number >= 0", bool_as_number=True, group="advanced",
        label="CFG normalization (0 = off)", step=0.1,
    ),
    SettingSpec(
        "cfg_truncation", "float", 1.0, "guidance is switched off on steps where 1 - sigma > this value",
        minimum=0, range_text=">= 0 (values >= 1 never truncate)", group="advanced", label="CFG truncation (>= 1: never)",
        step=0.05,
    ),
    SettingSpec(
        "max_sequence_length", "int", 512, "prompt tokens the text encoder reads (longer prompts are cut)",
        minimum=1, maximum=MAX_TOKENS, group="advanced", flag="max_tokens", label="Max prompt tokens",
    ),
    # Image-to-image and inpainting (models/z_image/pipeline_z_image_img2img.py); no image: text-to-image.
    SettingSpec(
        "image_start", "image", None,
        "start image for image-to-image (with image_mask: the picture to repaint); stretched to the chosen resolution",
        group="image", label="Start image",
    ),
    SettingSpec(
        "image_mask", "image", None,
        "inpainting mask over image_start: white = repaint, black = keep; stretched to the chosen resolution",
        group="image", label="Inpainting mask (white = repaint)",
    ),
    SettingSpec(
        "denoising_strength", "float", 0.6,
        "with image_start: how much is repainted; 1 starts from pure noise and runs every step, lower keeps more "
        "of the image and runs about steps x strength steps",
        minimum=0, maximum=1, group="image", label="Denoising strength", step=0.05,
    ),
)
SPECS = by_name(SETTINGS)


@dataclass(frozen=True)
class GenerationSettings:
    prompt: str
    negative_prompt: str = ""
    width: int = 1024
    height: int = 1024
    num_inference_steps: int = 8
    guidance_scale: float = 0.0
    flow_shift: float = 3.0
    seed: int = -1
    batch_size: int = 1
    cfg_normalization: float = 0.0
    cfg_truncation: float = 1.0
    max_sequence_length: int = 512
    image_start: Any = None  # PIL image or image file path (None: text-to-image)
    image_mask: Any = None  # PIL image or image file path (None: no inpainting)
    denoising_strength: float = 0.6

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> GenerationSettings:
        """Validate a task-style settings dict; raises SettingsError naming the field and the fix."""
        values = dict(raw)
        _check_known_keys(values)
        if "resolution" in values:
            width, height = parse_size(values.pop("resolution"))
            for key, parsed in (("width", width), ("height", height)):
                if key in values and as_int(key, values[key]) != parsed:
                    raise SettingsError(f"'resolution' says {key}={parsed} but '{key}' is {values[key]}: give one of them")
                values[key] = parsed
        if "prompt" not in values:
            raise SettingsError("'prompt' is required")
        out = {f.name: _convert(f.name, values[f.name]) for f in fields(cls) if f.name in values}
        return cls(**out)

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_scale > 0


KNOWN_KEYS = {f.name for f in fields(GenerationSettings)} | {"resolution"}


def _check_known_keys(values: dict[str, Any]) -> None:
    for key in values:
        if key not in KNOWN_KEYS:
            close = difflib.get_close_matches(key, sorted(KNOWN_KEYS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known settings: {', '.join(sorted(KNOWN_KEYS))}"
            raise SettingsError(f"unknown setting '{key}'{hint}")


def _convert(key: str, value: Any) -> Any:
    """A field's value through its spec (type, finite, range); width and height as sides of `resolution`."""
    if key in ("width", "height"):
        side = as_int(key, value)
        check_side(SPECS["resolution"], key, side)
        return side
    return convert(SPECS[key], value)
