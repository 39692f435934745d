"""Settings shared by every family: the host's own keys, merging and validation.

A task's settings are: family defaults (`update_default_settings`) < the preset's top-level
settings < the task itself. The host checks its own keys here; the family checks the rest
(`validate_settings`). A key neither knows is an error that suggests the closest known key.
"""

from __future__ import annotations

import difflib
import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import SettingsError, UserInputError
from host.registry import FamilyHandler

OUTPUT_FORMATS = {"png": "png", "jpeg": "jpeg", "jpg": "jpeg", "webp": "webp"}
QUANTIZATIONS = ("int8", "bf16", "fp16", "fp32")
# Longest text any setting may hold. Text encoders read at most ~1024 tokens, a few characters each, so 64
# characters per token is far beyond any prompt that reaches them; the cap bounds tokenizing time and memory
# and the settings embedded in every saved image (a 50-million-character prompt took minutes and gigabytes).
MAX_TEXT_CHARS = 65_536
SIZE_KEYS = ("width", "height")


@dataclass(frozen=True)
class HostKey:
    """One setting the host itself reads: accepted types, default, and a one-line meaning."""

    types: tuple[type, ...]
    default: Any
    meaning: str


HOST_KEYS: dict[str, HostKey] = {
    "model_type": HostKey((str,), None, "preset id, e.g. z_image or z_image_base"),
    "output_format": HostKey((str,), "png", "png, jpeg or webp"),
    "quantization": HostKey((str,), "int8", "weights variant: int8 where one exists, else bf16"),
    "attention": HostKey((str,), "auto", "attention backend: auto (preset rules) or a backend name, e.g. sdpa"),
    "profile": HostKey((int, str), "auto", "memory profile (offload), auto or a number"),
    "activated_loras": HostKey((list,), [], "LoRA file names in the LoRA folders (or absolute paths), after the preset's"),
    "loras_multipliers": HostKey((str, list), "", "one multiplier per activated LoRA (a,b,c = per-step schedule)"),
    "lset": HostKey((str,), None, "an .lset file in the LoRA folder: its LoRAs come before activated_loras"),
    "generation_info": HostKey((dict,), None, "written into saved images (files, hashes, version); ignored on input"),
}
HOST_ONLY = frozenset(HOST_KEYS)


def host_defaults() -> dict[str, Any]:
    """The host keys' defaults (model_type and generation_info have none)."""
    return {k: _copy(spec.default) for k, spec in HOST_KEYS.items() if spec.default is not None}


def family_defaults(handler: FamilyHandler, model_type: str, model_def: Mapping[str, Any]) -> dict[str, Any]:
    """Every setting the family accepts, with the family's fallback values."""
    settings: dict[str, Any] = {}
    handler.update_default_settings(model_type, model_def, settings)
    return settings


def check_known_keys(settings: Mapping[str, Any], known: set[str], where: str, noun: str = "setting") -> None:
    """Unknown keys are errors naming the key, the place, and the closest known key."""
    for key in settings:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(sorted(known))}"
            raise SettingsError(f"{where}: unknown {noun} '{key}'{hint}")


def check_host_values(settings: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Type-check the host keys present in `settings`; returns them normalised."""
    out: dict[str, Any] = {}
    for key, spec in HOST_KEYS.items():
        if key not in settings:
            continue
        value = settings[key]
        if isinstance(value, bool) or not isinstance(value, spec.types):
            wanted = " or ".join(t.__name__ for t in spec.types)
            raise SettingsError(f"{where}: '{key}' must be {wanted} ({spec.meaning}), got {value!r}")
        out[key] = _normalise_host_value(key, value, where)
    return out


def _normalise_host_value(key: str, value: Any, where: str) -> Any:
    if key == "output_format":
        if value.lower() not in OUTPUT_FORMATS:
            raise SettingsError(f"{where}: 'output_format' must be png, jpeg or webp, got {value!r}")
        return OUTPUT_FORMATS[value.lower()]
    if key == "quantization" and value not in QUANTIZATIONS:
        raise SettingsError(f"{where}: 'quantization' must be one of {', '.join(QUANTIZATIONS)}, got {value!r}")
    if key == "activated_loras" and not all(isinstance(v, str) for v in value):
        raise SettingsError(f"{where}: 'activated_loras' must be a list of file names, got {value!r}")
    return value


def validate(
    handler: FamilyHandler, model_type: str, model_def: Mapping[str, Any], settings: Mapping[str, Any], where: str
) -> dict[str, Any]:
    """Check a merged settings dict: known keys, host types, then the family's own validation.

    Returns the normalised dict (host keys + the family's normalised values), seed not yet resolved.
    """
    family = family_defaults(handler, model_type, model_def)
    check_known_keys(settings, HOST_ONLY | set(family), where)
    check_text_lengths(settings, where)
    host_part = check_host_values(settings, where)
    host_part.pop("generation_info", None)  # provenance of a saved image, never an input
    family_part = {k: v for k, v in settings.items() if k not in HOST_ONLY}
    try:
        normalised = handler.validate_settings(model_type, family_part)
    except SettingsError as exc:
        raise SettingsError(f"{where}: {exc}") from None
    return {**host_part, **normalised}


def check_text_lengths(settings: Mapping[str, Any], where: str) -> None:
    """Refuse text settings longer than MAX_TEXT_CHARS before anything tokenizes, embeds or saves them."""
    for key, value in settings.items():
        if isinstance(value, str) and len(value) > MAX_TEXT_CHARS:
            raise SettingsError(
                f"{where}: '{key}' is {len(value):,} characters; at most {MAX_TEXT_CHARS:,} are accepted "
                "(the text encoder reads at most about 1024 tokens): shorten it"
            )


def parse_json_text(text: str, error: type[UserInputError], where: str) -> Any:
    """json.loads with every way it can fail turned into `error` naming `where` (bad JSON with line and column)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{where}:{exc.lineno}:{exc.colno}: bad JSON: {exc.msg}") from None
    except RecursionError:
        raise error(f"{where}: the JSON is nested too deeply to be settings") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise error(f"{where}: bad JSON: {exc}") from None


def read_json_file(path: Path, error: type[UserInputError], what: str) -> Any:
    """Parse a JSON file (preset or tasks); errors name the file, and bad JSON its line and column."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot read the {what}: {exc}") from None
    return parse_json_text(text, error, str(path))


def parse_size(value: Any) -> tuple[int, int] | None:
    """'1024x768' -> (1024, 768); None when `value` is not of that form."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*(\d+)\s*", str(value))
    return (int(match.group(1)), int(match.group(2))) if match else None


def size_keys_to_resolution(
    raw: Mapping[str, Any], family: Mapping[str, Any], fallback: Any, where: str
) -> dict[str, Any]:
    """diffusers' `width`/`height` -> the Wan2GP `resolution` "WxH", for families whose setting is `resolution`.

    A side not given comes from the task's `resolution`, else `fallback` (the preset's); a task that gives
    `resolution` and a different width/height is an error.
    """
    out = dict(raw)
    given = {key: out.pop(key) for key in SIZE_KEYS if key in out}
    if not given or "resolution" not in family or any(key in family for key in SIZE_KEYS):
        return dict(raw)
    for key, value in given.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, str)) or not _is_whole(value):
            raise SettingsError(f"{where}: '{key}' must be a whole number of pixels (got {value!r})")
    base = dict(zip(SIZE_KEYS, parse_size(out.get("resolution", fallback)) or (None, None), strict=True))
    sides = {key: int(float(given[key])) if key in given else base[key] for key in SIZE_KEYS}
    width, height = sides["width"], sides["height"]
    if width is None or height is None:
        raise SettingsError(f"{where}: give both 'width' and 'height' (or 'resolution', e.g. '1024x768')")
    resolution = f"{width}x{height}"
    if "resolution" in raw and parse_size(raw["resolution"]) != (width, height):
        raise SettingsError(f"{where}: 'resolution' is {raw['resolution']!r} but width/height say {resolution}: give one of them")
    out["resolution"] = resolution
    return out


def overlay(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`override` over `base`, where a size given one way replaces the other way in `base`.

    width/height in `override` replace `base`'s resolution (a side not given keeps `base`'s), and a
    resolution in `override` replaces `base`'s width/height: `load_model(resolution=...)` then
    `generate(width=..., height=...)` is a new size, not a conflict.
    """
    out = {**base, **override}
    if "resolution" in override:
        for key in SIZE_KEYS:
            if key not in override:
                out.pop(key, None)
    elif any(key in override for key in SIZE_KEYS) and "resolution" in base:
        size = parse_size(out.pop("resolution"))
        for key, side in zip(SIZE_KEYS, size or (), strict=False):
            out.setdefault(key, side)
    return out


def _is_whole(value: int | float | str) -> bool:
    try:
        return float(value).is_integer()  # false for inf and nan
    except (ValueError, OverflowError):
        return False


def resolve_seed(settings: dict[str, Any]) -> dict[str, Any]:
    """A copy with seed -1 (or missing) replaced by a random seed, so the used seed is recorded."""
    out = dict(settings)
    if int(out.get("seed", -1)) < 0:
        out["seed"] = secrets.randbelow(2**32)
    return out


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else dict(value) if isinstance(value, dict) else value
