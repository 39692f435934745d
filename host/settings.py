"""Settings shared by every family: the host's own keys, merging and validation.

A task's settings are: family defaults (`update_default_settings`) < the preset's top-level
settings < the task itself. The host checks its own keys here; the family checks the rest
(`validate_settings`). A key neither knows is an error that suggests the closest known key.
"""

from __future__ import annotations

import difflib
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import SettingsError, UserInputError
from host.registry import FamilyHandler

OUTPUT_FORMATS = {"png": "png", "jpeg": "jpeg", "jpg": "jpeg", "webp": "webp"}
QUANTIZATIONS = ("int8", "bf16", "fp16", "fp32")


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
    host_part = check_host_values(settings, where)
    host_part.pop("generation_info", None)  # provenance of a saved image, never an input
    family_part = {k: v for k, v in settings.items() if k not in HOST_ONLY}
    try:
        normalised = handler.validate_settings(model_type, family_part)
    except SettingsError as exc:
        raise SettingsError(f"{where}: {exc}") from None
    return {**host_part, **normalised}


def read_json_file(path: Path, error: type[UserInputError], what: str) -> Any:
    """Parse a JSON file (preset or tasks); errors name the file, and bad JSON its line and column."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise error(f"{path}:{exc.lineno}:{exc.colno}: bad JSON: {exc.msg}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot read the {what}: {exc}") from None


def resolve_seed(settings: dict[str, Any]) -> dict[str, Any]:
    """A copy with seed -1 (or missing) replaced by a random seed, so the used seed is recorded."""
    out = dict(settings)
    if int(out.get("seed", -1)) < 0:
        out["seed"] = secrets.randbelow(2**32)
    return out


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else dict(value) if isinstance(value, dict) else value
