"""Settings keys other tools write that this program does not act on: read leniently, never silently wrong.

A settings dict read from a Wan2GP file carries, besides the settings we share with it (prompt, seed,
resolution, ...), keys that only say where the file came from (`type`, `settings_version`, `creation_date`)
and keys of Wan2GP features we do not have (`repeat_generation`, `guidance_phases`, NAG, start images).
`split_settings` sorts a task's keys:

- ours (the host's specs and the model family's schema): checked strictly by their specs afterwards;
- provenance: kept aside (they end up in the saved image's `generation_info.ignored_settings`) and ignored;
- another tool's feature at its neutral value (`repeat_generation` 1, `image_mode` 1, `NAG_scale` <= 1,
  no start image): kept aside and ignored, since it changes nothing;
- another tool's feature at a value that would change the image: refused with
  "not supported by this program: KEY=VALUE" and what to do;
- anything else: "unknown setting" with the closest of our own keys (a typo of ours is still a typo).

A key a family declares in its schema is the family's, whatever this table says: the table only covers
keys no schema declares (NAG, start images, ControlNet weights until a family takes them).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from common.errors import SettingsError

Neutral = Callable[[Any, Mapping[str, Any]], bool]  # (value, the whole task) -> the value changes nothing


@dataclass(frozen=True)
class ForeignKey:
    """A key another tool writes. `neutral` None means provenance: ignored whatever its value."""

    name: str
    meaning: str
    neutral: Neutral | None = None
    fix: str = ""  # what to write instead, for the refusal message


def _empty(value: Any, _: Mapping[str, Any] | None = None) -> bool:
    return value is None or value == "" or value == [] or value == {}


def _number_at_most(limit: float) -> Neutral:
    def check(value: Any, _: Mapping[str, Any]) -> bool:
        number = _as_number(value)
        return number is not None and number <= limit

    return check


def _at_least(limit: float) -> Neutral:
    def check(value: Any, _: Mapping[str, Any]) -> bool:
        number = _as_number(value)
        return number is not None and number >= limit

    return check


def _number_in(*values: float) -> Neutral:
    def check(value: Any, _: Mapping[str, Any]) -> bool:
        return _as_number(value) in values

    return check


def _text_in(*values: str) -> Neutral:
    def check(value: Any, _: Mapping[str, Any]) -> bool:
        return _empty(value) or (isinstance(value, str) and value.strip().lower() in values)

    return check


def _when(key: str, neutral: Neutral, default: Any = None) -> Neutral:
    """Neutral whatever its value when `key` (another foreign key) is at its own neutral value."""

    def check(value: Any, task: Mapping[str, Any]) -> bool:
        return neutral(task.get(key, default), task)

    return check


def _without(*image_keys: str) -> Neutral:
    """Neutral when none of `image_keys` holds an image: the flag or weight then has nothing to act on."""

    def check(value: Any, task: Mapping[str, Any]) -> bool:
        return all(_empty(task.get(k)) for k in image_keys)

    return check


def _either(*checks: Neutral) -> Neutral:
    def check(value: Any, task: Mapping[str, Any]) -> bool:
        return any(c(value, task) for c in checks)

    return check


def _one_prompt(value: Any, task: Mapping[str, Any]) -> bool:
    """Wan2GP's multi_prompts_gen_type splits a prompt into several generations (by line "G", by paragraph
    "PG"; "FG" keeps the whole text); it changes nothing when the prompt is one line."""
    mode = str(value).strip().upper() if value is not None else ""
    prompt = "\n".join(line for line in str(task.get("prompt", "")).splitlines() if not line.strip().startswith("#"))
    return mode in ("FG", "2") or len([line for line in prompt.splitlines() if line.strip()]) <= 1


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


START_IMAGES = ("image_start", "image_end", "image_refs")
GUIDE_IMAGES = ("image_guide", "image_mask", "video_guide", "video_mask", "custom_guide")
MEDIA_INPUTS = (*START_IMAGES, *GUIDE_IMAGES, "video_source", "audio_guide", "audio_guide2", "audio_source")
_ONE_PHASE = _number_at_most(1)
_OFF = _either(_empty, _number_in(0))  # a switch off: 0, false, "" or absent

# Provenance: where and when a file was made, how it was written; never an input.
_PROVENANCE = (
    ForeignKey("type", "the program and model that made the file"),
    ForeignKey("settings_version", "Wan2GP's settings format version"),
    ForeignKey("model_filename", "the weights file Wan2GP loaded"),
    ForeignKey("generation_time", "how long Wan2GP took"),
    ForeignKey("creation_date", "when the file was made"),
    ForeignKey("creation_timestamp", "when the file was made"),
    ForeignKey("image_quality", "Wan2GP's file format and JPEG/WebP quality (read as output_format)"),
    ForeignKey("lset_name", "the LoRA set chosen in Wan2GP's UI (its LoRAs are in activated_loras)"),
    ForeignKey("override_profile", "Wan2GP's memory profile (memory only)"),
    ForeignKey("override_attention", "Wan2GP's attention kernel (speed only)"),
    ForeignKey("output_filename", "Wan2GP's file name template"),
)
# Features of other tools: ignored at their neutral value, refused otherwise.
_FEATURES = (
    ForeignKey("image_mode", "Wan2GP's output kind (1 = image)", _number_in(1), "1"),
    ForeignKey("repeat_generation", "Wan2GP's repeat count", _number_in(1), "1 (or several tasks / batch_size)"),
    ForeignKey("multi_prompts_gen_type", "Wan2GP's prompt splitting", _one_prompt, "FG, or one prompt per task"),
    ForeignKey("guidance_phases", "Wan2GP's multi-phase guidance", _ONE_PHASE, "1"),
    ForeignKey("guidance2_scale", "guidance of Wan2GP's 2nd phase", _when("guidance_phases", _ONE_PHASE, 1)),
    ForeignKey("guidance3_scale", "guidance of Wan2GP's 3rd phase", _when("guidance_phases", _ONE_PHASE, 1)),
    ForeignKey("switch_threshold", "Wan2GP's phase switch", _when("guidance_phases", _ONE_PHASE, 1)),
    ForeignKey("switch_threshold2", "Wan2GP's phase switch", _when("guidance_phases", _ONE_PHASE, 1)),
    ForeignKey("model_switch_phase", "Wan2GP's phase switch", _when("guidance_phases", _ONE_PHASE, 1)),
    ForeignKey("NAG_scale", "Normalized Attention Guidance", _number_at_most(1), "1 (NAG off)"),
    ForeignKey("NAG_tau", "NAG's threshold", _when("NAG_scale", _number_at_most(1), 1)),
    ForeignKey("NAG_alpha", "NAG's mix", _when("NAG_scale", _number_at_most(1), 1)),
    ForeignKey("alt_prompt", "Wan2GP's second prompt", _empty, '""'),
    ForeignKey("prompt_enhancer", "Wan2GP's LLM prompt rewriting", _empty, '"" (put the rewritten prompt in prompt)'),
    ForeignKey("sample_solver", "Wan2GP's sampler", _text_in("default"), '"default" (Euler flow matching)'),
    ForeignKey("skip_steps_cache_type", "Wan2GP's step skipping cache", _empty, '""'),
    ForeignKey("skip_steps_multiplier", "Wan2GP's step skipping", _when("skip_steps_cache_type", _empty)),
    ForeignKey("skip_steps_start_step_perc", "Wan2GP's step skipping", _when("skip_steps_cache_type", _empty)),
    ForeignKey("slg_switch", "skip layer guidance", _OFF, "0"),
    ForeignKey("slg_layers", "skip layer guidance", _when("slg_switch", _OFF, 0)),
    ForeignKey("slg_start_perc", "skip layer guidance", _when("slg_switch", _OFF, 0)),
    ForeignKey("slg_end_perc", "skip layer guidance", _when("slg_switch", _OFF, 0)),
    ForeignKey("apg_switch", "adaptive projected guidance", _OFF, "0"),
    ForeignKey("cfg_star_switch", "CFG-Zero*", _OFF, "0"),
    ForeignKey("cfg_zero_step", "CFG-Zero* first steps", _either(_empty, _number_in(-1)), "-1"),
    ForeignKey("temporal_upsampling", "Wan2GP's frame interpolation", _empty, '""'),
    ForeignKey("spatial_upsampling", "Wan2GP's upscaler", _empty, '""'),
    ForeignKey("film_grain_intensity", "Wan2GP's film grain", _OFF, "0"),
    ForeignKey("film_grain_saturation", "Wan2GP's film grain", _when("film_grain_intensity", _OFF, 0)),
    ForeignKey("RIFLEx_setting", "RIFLEx (video length extension)", _OFF, "0"),
    # Which inputs Wan2GP's UI had switched on: the input keys themselves are checked (and a start image the
    # flags say was not used is left out, host/wan2gp.py), so the flags are only a record.
    ForeignKey("image_prompt_type", "which start images Wan2GP used"),
    ForeignKey("video_prompt_type", "which control/guide inputs Wan2GP used"),
    ForeignKey("remove_background_images_ref", "Wan2GP's reference image cleanup", _without("image_refs")),
    ForeignKey("denoising_strength", "how much of a start image is repainted", _either(_without("image_start"), _at_least(1)), "1"),
    ForeignKey("control_net_weight", "ControlNet strength", _without("image_guide", "video_guide")),
    ForeignKey("control_net_weight2", "ControlNet strength", _without("image_guide", "video_guide")),
    *(ForeignKey(name, "an input file of a Wan2GP feature", _empty, "null") for name in MEDIA_INPUTS),
)
FOREIGN_KEYS: dict[str, ForeignKey] = {k.name: k for k in (*_PROVENANCE, *_FEATURES)}


def split_settings(
    settings: Mapping[str, Any], known: set[str], where: str, foreign: Mapping[str, ForeignKey] = FOREIGN_KEYS
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(ours, ignored): our keys to check strictly, and other tools' keys that change nothing.

    Raises SettingsError naming `where` for a key nobody declares (with the closest key of ours) or another
    tool's feature at a value that would change the image.
    """
    ours: dict[str, Any] = {}
    ignored: dict[str, Any] = {}
    for key, value in settings.items():
        if key in known:
            ours[key] = value
        elif key in foreign:
            entry = foreign[key]
            if entry.neutral is not None and not entry.neutral(value, settings):
                raise SettingsError(f"{where}: {unsupported_message(entry, value)}")
            ignored[key] = value
        else:
            raise SettingsError(f"{where}: unknown setting '{key}'{closest_hint(key, known)}")
    return ours, ignored


def unsupported_message(entry: ForeignKey, value: Any) -> str:
    """`not supported by this program: NAG_scale=4 (Normalized Attention Guidance); use 1 (NAG off) or remove the key`."""
    use = f"use {entry.fix} or remove the key" if entry.fix else "remove the key"
    return f"not supported by this program: {entry.name}={show_value(value)} ({entry.meaning}); {use}"


def closest_hint(key: str, known: set[str]) -> str:
    """'; did you mean 'prompt'?' or the list of known keys."""
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(sorted(known))}"


def show_value(value: Any, limit: int = 60) -> str:
    """A value as a user wrote it: text bare, the rest as JSON, cut to `limit` characters."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"
