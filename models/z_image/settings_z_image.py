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
from common.sampling import TWINFLOW_MAX_STEPS
from common.settings_schema import SettingSpec, as_int, by_name, check_side, convert, parse_size

SIZE_MULTIPLE = 16  # VAE factor 8 x patch size 2
MAX_SIDE = 4096
MAX_TOKENS = 1024

SETTINGS: tuple[SettingSpec, ...] = (
    SettingSpec("prompt", "text", "", "what to draw", lines=3),
    SettingSpec(
        "negative_prompt", "text", "", "what to avoid; acts only when guidance_scale > 0 or NAG_scale > 1", lines=2,
        active_when=(("guidance_scale", 0.0), ("NAG_scale", 1.0)),
    ),
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
    # NAG: negative prompting without CFG (common/nag.py; Wan2GP's names). Off at 1; needs guidance_scale 0.
    SettingSpec(
        "NAG_scale", "float", 1.0,
        "Normalized Attention Guidance: > 1 steers the image away from the negative prompt with guidance off "
        "(Turbo); 1 = off",
        minimum=1, range_text=">= 1 (1 = off)", flag="nag_scale", label="NAG scale (1 = off)", step=0.1,
    ),
    SettingSpec(
        "NAG_tau", "float", 3.5, "NAG: cap on how far (L1 ratio) a guided attention feature may grow",
        minimum=0, exclusive_minimum=True, group="advanced", flag="nag_tau", label="NAG tau", step=0.1,
    ),
    SettingSpec(
        "NAG_alpha", "float", 0.5, "NAG: blend of the guided attention with the plain one (1 = only guided)",
        minimum=0, maximum=1, group="advanced", flag="nag_alpha", label="NAG alpha", step=0.05,
    ),
    SettingSpec(
        "sample_solver", "choice", "default",
        "sampler: default (flow-matching Euler over the shifted schedule) or twinflow (TwinFlow's 1-4 step sampler, "
        "for TwinFlow weights; its own time grid, flow_shift unused)",
        choices=("default", "twinflow"), aliases=(("unified", "twinflow"), ("euler", "default"), ("", "default")),
        group="advanced", label="Sampler",
    ),
    # Seed variety (models/z_image/variety_z_image.py): off at 0.
    SettingSpec(
        "seed_variety", "float", 0.0,
        "more different images across seeds: seeded noise of this strength (x each feature's spread over the "
        "prompt's tokens) is added to the prompt embedding in the first seed_variety_steps steps; 0 = off",
        minimum=0, maximum=5, group="advanced", label="Seed variety (0 = off)", step=0.05,
    ),
    SettingSpec(
        "seed_variety_steps", "int", 2, "how many first steps use the noisy prompt embedding (with seed_variety > 0)",
        minimum=1, maximum=1000, group="advanced", label="Seed variety steps",
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
    NAG_scale: float = 1.0
    NAG_tau: float = 3.5
    NAG_alpha: float = 0.5
    sample_solver: str = "default"
    seed_variety: float = 0.0
    seed_variety_steps: int = 2
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
        settings = cls(**out)
        settings.check_combinations()
        return settings

    def check_combinations(self) -> None:
        """Settings that are valid alone but not together."""
        if self.uses_nag and self.guidance_scale > 0:
            raise SettingsError(
                f"NAG_scale {self.NAG_scale:g} needs guidance_scale 0 (NAG is the negative prompt's way in without CFG): "
                "set NAG_scale to 1 or guidance_scale to 0"
            )
        if self.sample_solver == "twinflow" and not 1 <= self.num_inference_steps <= TWINFLOW_MAX_STEPS:
            raise SettingsError(
                f"sample_solver twinflow takes 1 to {TWINFLOW_MAX_STEPS} steps (got num_inference_steps "
                f"{self.num_inference_steps}): lower the steps or use sample_solver 'default'"
            )

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_scale > 0

    @property
    def uses_nag(self) -> bool:
        """NAG on: the negative prompt guides the attention (guidance is off then, see check_combinations)."""
        return self.NAG_scale > 1

    @property
    def uses_negative_prompt(self) -> bool:
        return self.uses_guidance or self.uses_nag


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
