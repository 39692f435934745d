"""The generation form of the web UI as plain data: fields <-> task settings, sizes, saved defaults, and
settings read back from images. No Gradio here, so all of it is unit-tested without a browser.
"""

from __future__ import annotations

import json
import logging
import re
import struct
import warnings
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from common.errors import SettingsError
from host import settings as host_settings
from host.atomic import atomic_write_json
from host.outputs import EXIF_IFD, IMAGE_DESCRIPTION, PARAMETERS_KEY, read_settings
from host.presets import Preset
from host.registry import REPO_ROOT
from host.session import Session

log = logging.getLogger(__name__)

DEFAULT_SETTINGS_DIR = REPO_ROOT / "settings"  # "save as my defaults" writes <model_type>.json here
SIZE_MULTIPLE = 16  # VAE factor 8 x patch 2; every shipped family needs it (the family still validates)
MAX_SIDE = 4096
CUSTOM = "custom"
# What PIL raises for a file that is not an image, a decompression bomb, a text chunk that inflates too far,
# or broken chunks: each means "no settings can be read from this file".
UNREADABLE_IMAGE_ERRORS = (
    OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, Image.DecompressionBombError
)

# (aspect ratio, sizes); every side a multiple of 16, about 0.4 to 4 megapixels.
RESOLUTION_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("1:1", ("512x512", "768x768", "1024x1024", "1280x1280", "1536x1536", "2048x2048")),
    ("4:3", ("1024x768", "1152x864", "1280x960", "1600x1200")),
    ("3:4", ("768x1024", "864x1152", "960x1280", "1200x1600")),
    ("3:2", ("1152x768", "1536x1024")),
    ("2:3", ("768x1152", "1024x1536")),
    ("5:3", ("1280x768",)),
    ("3:5", ("768x1280",)),
    ("16:9", ("1280x720", "1920x1088")),
    ("9:16", ("720x1280", "1088x1920")),
    ("21:9", ("1680x720",)),
    ("9:21", ("720x1680",)),
)

# Form field (Gradio elem_id) -> task setting. The page's input components follow this order.
FORM_FIELDS: tuple[tuple[str, str], ...] = (
    ("model", "model_type"),
    ("prompt", "prompt"),
    ("negative_prompt", "negative_prompt"),
    ("width", "width"),
    ("height", "height"),
    ("steps", "num_inference_steps"),
    ("guidance", "guidance_scale"),
    ("flow_shift", "flow_shift"),
    ("seed", "seed"),
    ("batch_size", "batch_size"),
    ("cfg_normalization", "cfg_normalization"),
    ("cfg_truncation", "cfg_truncation"),
    ("max_tokens", "max_sequence_length"),
    ("quantization", "quantization"),
    ("profile", "profile"),
    ("attention", "attention"),
    ("output_format", "output_format"),
    ("loras", "activated_loras"),
    ("loras_multipliers", "loras_multipliers"),
)
FIELD_IDS = tuple(f for f, _ in FORM_FIELDS)
INT_FIELDS = {"width", "height", "steps", "seed", "batch_size", "max_tokens"}
FLOAT_FIELDS = {"guidance", "flow_shift", "cfg_normalization", "cfg_truncation"}


def resolution_choices(extra: Sequence[str] = ()) -> list[tuple[str, str]]:
    """(label, value) pairs grouped by aspect ratio, then any extra sizes (a preset's own), then custom."""
    choices = [(f"{ratio} · {size}", size) for ratio, sizes in RESOLUTION_GROUPS for size in sizes]
    known = {value for _, value in choices}
    choices += [(f"preset · {size}", size) for size in extra if size not in known]
    return choices + [("custom (width x height below)", CUSTOM)]


def parse_size(text: str) -> tuple[int, int]:
    """'1024x768' -> (1024, 768); SettingsError otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX×*]\s*(\d+)\s*", str(text))
    if not match:
        raise SettingsError(f"resolution must be WIDTHxHEIGHT, e.g. 1024x768 (got {text!r})")
    return int(match[1]), int(match[2])


def snap_size(width: float, height: float) -> tuple[int, int, str]:
    """Round each side to the nearest multiple of 16; returns (w, h, note). Out-of-range sides are left
    as they are, so validation reports them with the allowed range."""
    snapped, changed = [], []
    for name, value in (("width", width), ("height", height)):
        v = int(round(float(value)))
        if SIZE_MULTIPLE <= v <= MAX_SIDE and v % SIZE_MULTIPLE:
            new = min(MAX_SIDE, max(SIZE_MULTIPLE, (v + SIZE_MULTIPLE // 2) // SIZE_MULTIPLE * SIZE_MULTIPLE))
            changed.append(f"{name} {v} -> {new}")
            v = new
        snapped.append(v)
    note = f"snapped to multiples of {SIZE_MULTIPLE}: {', '.join(changed)}" if changed else ""
    return snapped[0], snapped[1], note


def resolution_value(width: int, height: int, choices: Sequence[tuple[str, str]]) -> str:
    """The resolution dropdown's value for a size: the matching preset, else 'custom'."""
    size = f"{int(width)}x{int(height)}"
    return size if any(value == size for _, value in choices) else CUSTOM


@dataclass
class FormResult:
    """Raw task settings from the form, plus notes for the user (snapped sizes)."""

    settings: dict[str, Any]
    notes: list[str]


def settings_from_form(values: Mapping[str, Any], accepted: set[str]) -> FormResult:
    """Form values (by field id) -> raw task settings limited to the keys the model type accepts."""
    v = dict(values)
    width, height, note = snap_size(v.pop("width") or 0, v.pop("height") or 0)
    raw: dict[str, Any] = {"resolution": f"{width}x{height}"}
    for field_id, key in FORM_FIELDS:
        if field_id not in v or key not in accepted:
            continue
        value = v[field_id]
        if field_id in INT_FIELDS and value is not None:
            value = int(round(float(value)))
        elif field_id in FLOAT_FIELDS and value is not None:
            value = float(value)
        elif field_id == "loras":
            value = list(value or [])
        elif field_id == "profile" and isinstance(value, str) and value.isdigit():
            value = int(value)
        elif value is None:
            continue
        raw[key] = value
    if "resolution" not in accepted:
        raw.pop("resolution")
    return FormResult(raw, [note] if note else [])


def form_from_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Task settings -> form values by field id (only the fields the settings mention)."""
    out: dict[str, Any] = {}
    key_to_field = {key: field_id for field_id, key in FORM_FIELDS}
    for key, value in settings.items():
        if key == "resolution":
            try:
                out["width"], out["height"] = parse_size(str(value))
            except SettingsError:
                log.warning("ignoring resolution %r", value)
        elif key in key_to_field:
            field_id = key_to_field[key]
            if field_id == "profile":
                value = str(value)
            elif field_id == "cfg_normalization" and isinstance(value, bool):
                value = 1.0 if value else 0.0
            elif field_id == "loras":
                value = list(value or [])
            out[field_id] = value
    return out


# -- defaults ------------------------------------------------------------------------------------


def accepted_keys(session: Session, preset: Preset) -> set[str]:
    """Every setting a model type accepts: the host's keys and the family's."""
    handler = session.handler(preset)
    family = host_settings.family_defaults(handler, preset.architecture, preset.model_def)
    return set(host_settings.HOST_KEYS) | set(family)


def preset_defaults(session: Session, preset: Preset, settings_dir: Path | None) -> dict[str, Any]:
    """Host defaults < family defaults < preset < the user's saved defaults for this model type."""
    handler = session.handler(preset)
    family = host_settings.family_defaults(handler, preset.architecture, preset.model_def)
    merged = {**host_settings.host_defaults(), **family, **preset.settings}
    saved = load_user_defaults(settings_dir, preset.model_type)
    known = set(host_settings.HOST_KEYS) | set(family)
    for key, value in saved.items():
        if key in known and key not in ("model_type", "generation_info"):
            merged[key] = value
        else:
            log.warning("saved defaults of %s: ignoring unknown setting %r", preset.model_type, key)
    return {"model_type": preset.model_type, **merged}


def user_defaults_path(settings_dir: Path, model_type: str) -> Path:
    return settings_dir / f"{model_type}.json"


def load_user_defaults(settings_dir: Path | None, model_type: str) -> dict[str, Any]:
    """The saved defaults of a model type ({} when none, or when the file is unreadable: logged)."""
    if settings_dir is None:
        return {}
    path = user_defaults_path(settings_dir, model_type)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("cannot read saved defaults %s: %s", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def save_user_defaults(settings_dir: Path, model_type: str, settings: Mapping[str, Any]) -> Path:
    """Write the form's settings as this model type's defaults (atomically)."""
    settings_dir.mkdir(parents=True, exist_ok=True)
    path = user_defaults_path(settings_dir, model_type)
    data = {k: v for k, v in settings.items() if k not in ("model_type", "generation_info")}
    return atomic_write_json(path, data, indent=2)


# -- settings from images ------------------------------------------------------------------------

A1111_KEYS = {  # A1111 "parameters" field -> (setting, type)
    "Steps": ("num_inference_steps", int),
    "CFG scale": ("guidance_scale", float),
    "Seed": ("seed", int),
    "Size": ("resolution", str),
    "Model": ("model_type", str),
    "Shift": ("flow_shift", float),
}


def parse_a1111(text: str) -> dict[str, Any]:
    """A1111-style 'parameters' text -> settings: prompt, negative prompt, steps, CFG, seed, size, model."""
    lines = text.strip().splitlines()
    if not lines:
        raise SettingsError("the image's parameters text is empty")
    fields_line = lines[-1] if re.search(r"(^|, )Steps: ", lines[-1]) else ""
    body = lines[:-1] if fields_line else lines
    prompt_lines, negative_lines, target = [], [], None
    for line in body:
        if line.startswith("Negative prompt:"):
            target = negative_lines
            line = line[len("Negative prompt:") :].strip()
        (target if target is not None else prompt_lines).append(line)
    out: dict[str, Any] = {"prompt": "\n".join(prompt_lines).strip()}
    if negative_lines:
        out["negative_prompt"] = "\n".join(negative_lines).strip()
    for key, value in re.findall(r'\s*([\w ]+): ("(?:[^"\\]|\\.)*"|[^,]*)(?:,|$)', fields_line):
        if key.strip() in A1111_KEYS:
            name, kind = A1111_KEYS[key.strip()]
            try:
                out[name] = kind(value.strip().strip('"'))
            except ValueError:
                log.warning("ignoring A1111 field %s=%r", key, value)
    return out


@dataclass
class ImageSettings:
    settings: dict[str, Any]
    source: str  # "embedded settings" or "A1111 parameters"


def settings_from_image(path: Path) -> ImageSettings:
    """Our embedded settings JSON; else an A1111 `parameters` text (PNG chunk or EXIF description)."""
    try:
        return ImageSettings(read_settings(path), "embedded settings")
    except SettingsError as first:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # only metadata is read
                with Image.open(path) as image:
                    text = image.info.get(PARAMETERS_KEY) or image.getexif().get(IMAGE_DESCRIPTION)
                    if not text:
                        text = image.getexif().get_ifd(EXIF_IFD).get(IMAGE_DESCRIPTION)
        except UNREADABLE_IMAGE_ERRORS:  # not an image, a bomb, broken chunks: the first reader's message says so
            raise first from None
        if not text:
            raise SettingsError(
                f"{Path(path).name}: no generation settings in this image (ours or A1111 'parameters')"
            ) from None
        return ImageSettings(parse_a1111(str(text)), "A1111 parameters")
