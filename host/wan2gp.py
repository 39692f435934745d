"""Wan2GP's settings dialect: read its files the way it meant them, and write ours in its shape.

Reading: a task that comes from Wan2GP (read from one of its containers, or carrying its `settings_version`
or a `type` naming WanGP) is adapted where Wan2GP behaves differently from this program and the user's
intent is clear, each change with a one-line note:
- `image_quality` ("png", "jpeg_95", "webp_lossless") gives `output_format` when the task has none;
- a start image its `image_prompt_type` flags say it did not use is left out;
- a size that is not a multiple of the family's `multiple_of` is rounded down to one, as Wan2GP does
  (this program refuses such sizes from its own files);
- the family's own differences come from its `fix_settings(model_type, settings_version, model_def,
  settings)` (Wan2GP's name for the hook that migrates saved settings), which returns its notes.

Writing: `to_wan2gp` is the settings of one of our images as Wan2GP stores them (PNG iTXt `comment`
JSON, read by Wan2GP's image metadata reader): its names, `image_mode` 1, a `type` naming this program.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from common.errors import SettingsError
from common.settings_schema import SettingSpec, is_pil_image, parse_size
from host import PROGRAM_NAME

log = logging.getLogger(__name__)

SOURCE = "Wan2GP"
# Wan2GP's `image_quality` (shared/utils/audio_video.py get_image_format) -> our output_format.
IMAGE_QUALITY_FORMATS = {"png": "png", "jpeg": "jpeg", "webp": "webp"}
# Host keys that are about how this program runs or writes files; Wan2GP has its own for those.
NOT_IN_WAN2GP_SHAPE = frozenset({"quantization", "attention", "profile", "output_format", "generation_info", "lset"})


def is_wan2gp(settings: Mapping[str, Any]) -> bool:
    """Written by Wan2GP: its settings format version, or its program name in `type`."""
    return "settings_version" in settings or str(settings.get("type", "")).lstrip().lower().startswith(("wangp", "wan2gp"))


def adapt(
    raw: Mapping[str, Any],
    source: str | None,
    handler: Any,
    architecture: str,
    model_def: Mapping[str, Any],
    specs: Sequence[SettingSpec],
) -> tuple[dict[str, Any], list[str]]:
    """A Wan2GP task as this program should run it, and one note per change; other tasks as they are."""
    if source != SOURCE and not is_wan2gp(raw):
        return dict(raw), []
    out, notes = dict(raw), []
    notes += _output_format(out)
    notes += _unused_start_image(out)
    notes += _round_sizes(out, specs)
    fix = getattr(handler, "fix_settings", None)
    if fix is not None:
        notes += list(fix(architecture, settings_version(out), model_def, out) or [])
    return out, notes


def settings_version(settings: Mapping[str, Any]) -> float:
    """Wan2GP's `settings_version` as a number (0 when absent or unreadable: the oldest format)."""
    try:
        return float(settings.get("settings_version", 0) or 0)
    except (TypeError, ValueError):
        return 0.0


def _output_format(out: dict[str, Any]) -> list[str]:
    quality = out.get("image_quality")
    if not isinstance(quality, str) or "output_format" in out:
        return []
    fmt = IMAGE_QUALITY_FORMATS.get(quality.split("_", 1)[0].strip().lower())
    if fmt is None:
        return []
    out["output_format"] = fmt
    return []  # the file format, not the image: no note needed


def _unused_start_image(out: dict[str, Any]) -> list[str]:
    """Wan2GP uses `image_start` only when its `image_prompt_type` has "S"; a file naming one without the flag
    ran without it there."""
    flags = out.get("image_prompt_type")
    if not isinstance(flags, str) or "S" in flags.upper() or out.get("image_start") in (None, ""):
        return []
    out.pop("image_start")
    return [f"image_start left out: Wan2GP did not use it (image_prompt_type {flags!r} has no S)"]


def _round_sizes(out: dict[str, Any], specs: Sequence[SettingSpec]) -> list[str]:
    """Sizes rounded down to the family's multiple (Wan2GP's behaviour), with a note each."""
    notes = []
    for spec in specs:
        if spec.kind != "size" or not spec.multiple_of or not isinstance(out.get(spec.name), str):
            continue
        try:
            width, height = parse_size(out[spec.name], spec.name)
        except SettingsError:
            continue  # validation reports it
        m = spec.multiple_of
        rounded = (max(m, width // m * m), max(m, height // m * m))
        if rounded != (width, height):
            out[spec.name] = f"{rounded[0]}x{rounded[1]}"
            notes.append(
                f"{spec.name} {width}x{height} rounded down to {out[spec.name]} (multiples of {m}), as Wan2GP does"
            )
    return notes


def to_wan2gp(settings: Mapping[str, Any], info: Mapping[str, Any], now: datetime | None = None) -> dict[str, Any]:
    """The settings of one of our images in Wan2GP's shape: its setting names (ours follow them), image mode,
    a `type` naming this program and the model, and the creation date. In-memory input images are left out."""
    out = {k: v for k, v in settings.items() if k not in NOT_IN_WAN2GP_SHAPE and not is_pil_image(v)}
    fmt = settings.get("output_format")
    if fmt in ("jpeg", "webp"):
        out["image_quality"] = "jpeg_95" if fmt == "jpeg" else "webp_lossless"  # what host/outputs.py writes
    elif fmt == "png":
        out["image_quality"] = "png"
    out["image_mode"] = 1
    out["type"] = f"{info.get('program') or PROGRAM_NAME} - {info.get('model_name') or settings.get('model_type', '')}"
    out["creation_date"] = (now or datetime.now()).isoformat(sep=" ", timespec="seconds")
    return out
