"""Settings shared by every family: the host's own settings, merging and validation.

A task's settings are: the family's defaults (its schema, `query_settings_schema`) < the preset's
top-level settings < the task itself. Every value is checked against its `SettingSpec` (the host's
below, the family's own), then by the family's `validate_settings`. Other tools' keys that change nothing
(Wan2GP's provenance, its features at their neutral value: host/foreign.py) are set aside; one that would
change the image is refused as not supported; any other key is an error that suggests the closest known key.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common import settings_schema as schema
from common.errors import SettingsError, UserInputError
from common.settings_schema import SettingSpec
from host import foreign
from host.registry import FamilyHandler, Registry

log = logging.getLogger(__name__)

QUANTIZATIONS = ("int8", "bf16", "fp16", "fp32")
# Longest text any setting may hold. Text encoders read at most ~1024 tokens, a few characters each, so 64
# characters per token is far beyond any prompt that reaches them; the cap bounds tokenizing time and memory
# and the settings embedded in every saved image (a 50-million-character prompt took minutes and gigabytes).
MAX_TEXT_CHARS = 65_536
SIZE_KEYS = ("width", "height")


# The host's own settings, declared like a family's (common/settings_schema.py): the form shows them after
# the family's, in this order. mmgp's memory profiles are host/lowvram/offload.py PROFILES.
HOST_SPECS: tuple[SettingSpec, ...] = (
    SettingSpec("model_type", "text", None, "preset id (required), e.g. one listed by --list-models", group="hidden", cli=False),
    SettingSpec(
        "quantization", "choice", "int8", "weights variant: int8 where one exists, else bf16", group="advanced",
        choices=QUANTIZATIONS, label="Weights",
    ),
    SettingSpec(
        "profile", "choice", "auto", "memory profile (offload with mmgp on CUDA): auto or 1-5, 4 = low RAM / low VRAM",
        group="advanced", choices=("auto", 1, 2, 3, 4, 5), changes_image=False, label="Offload profile (CUDA)",
    ),
    SettingSpec(
        "attention", "text", "auto", "attention backend: auto (preset rules) or a backend name, e.g. sdpa",
        group="advanced", choices=("auto", "sdpa", "flash", "sage", "sage2"), changes_image=False,
    ),
    SettingSpec(
        "output_format", "choice", "png", "file format of saved images", group="advanced",
        choices=("png", "jpeg", "webp"), aliases=(("jpg", "jpeg"),), changes_image=False, label="File format",
    ),
    SettingSpec(
        "cache", "choice", "off",
        "step cache: skip denoiser steps whose output barely changes (EasyCache's criterion; fewer forwards, a "
        "slightly different image); fast or faster as the model type offers them",
        group="advanced", choices=("off", "fast", "faster"), label="Step cache",
    ),
    SettingSpec(
        "compile", "bool", False,
        "torch.compile the denoiser's repeated blocks (the first generation compiles, a new batch shape or LoRA set "
        "may compile again: the seconds are reported; on the CPU inductor needs a C++ compiler, else it runs eager "
        "with a warning)",
        group="advanced", changes_image=False, label="Compile (torch.compile)",
    ),
    SettingSpec(
        "activated_loras", "list", [], "LoRA file names in the LoRA folders (or absolute paths), after the preset's",
        group="lora", flag="loras", cli=False, label="LoRAs (family folder)",
    ),
    SettingSpec(
        "loras_multipliers", "text_or_list", "",
        "one per LoRA, space separated (0.8 1.0); a comma list is a schedule over the steps (1,0.5,0)",
        group="lora", cli=False, label="Multipliers",
    ),
    SettingSpec(
        "lset", "text", None, "an .lset file in the LoRA folder: its LoRAs come before activated_loras",
        group="hidden", cli=False,
    ),
    SettingSpec(
        "generation_info", "mapping", None, "written into saved images (files, hashes, version); ignored on input",
        group="hidden", cli=False, changes_image=False,
    ),
)
HOST_ONLY = frozenset(s.name for s in HOST_SPECS)


def host_defaults() -> dict[str, Any]:
    """The host keys' defaults (model_type, lset and generation_info have none)."""
    return {k: v for k, v in schema.defaults_of(HOST_SPECS).items() if v is not None}


def family_specs(handler: FamilyHandler, model_type: str) -> list[SettingSpec]:
    """The settings a family declares for `model_type` (its `query_settings_schema`), checked once here:
    a family may not declare a host setting or the same name twice."""
    query = getattr(handler, "query_settings_schema", None)
    if query is None:
        raise SettingsError(f"the family of {model_type!r} declares no settings (its handler has no query_settings_schema)")
    specs = list(query(model_type))
    names = [s.name for s in specs]
    clashes = sorted(HOST_ONLY.intersection(names) | {n for n in names if names.count(n) > 1})
    if clashes or not all(isinstance(s, SettingSpec) for s in specs):
        raise SettingsError(
            f"the settings schema of {model_type!r} is malformed: SettingSpec entries with unique names that are not "
            f"host settings ({', '.join(clashes) or 'an entry is not a SettingSpec'})"
        )
    return specs


def all_family_specs(registry: Registry) -> list[SettingSpec]:
    """Every discovered family's settings, each name once (family order, then schema order): what the
    command line and the web form offer. Two families declaring one name as different kinds share a text
    entry, and the chosen model's schema converts the value. A family whose schema fails is left out (logged)."""
    found: dict[str, SettingSpec] = {}
    for family in sorted(registry.families.values(), key=lambda f: (f.order, f.label)):
        for model_type in family.types:
            try:
                specs = family_specs(family.handler, model_type)
            except (UserInputError, ValueError) as exc:
                log.warning("family %s: settings of %s left out: %s", family.name, model_type, exc)
                continue
            for spec in specs:
                known = found.setdefault(spec.name, spec)
                if known.kind != spec.kind and known.kind != "text":
                    found[spec.name] = SettingSpec(
                        spec.name, "text", help=f"{known.help} (checked by the model's family)", group=known.group,
                        flag=known.flag, cli=known.cli, label=known.label,
                    )
    return list(found.values())


def family_defaults(handler: FamilyHandler, model_type: str, model_def: Mapping[str, Any]) -> dict[str, Any]:
    """Every setting the family accepts, with the family's defaults for `model_type` (in its schema's order);
    `update_default_settings` may still adjust them for a model definition."""
    specs = family_specs(handler, model_type)
    settings = schema.defaults_of(specs)
    handler.update_default_settings(model_type, model_def, settings)
    for key in [k for k in settings if k not in {s.name for s in specs}]:
        log.warning("family of %s: default for undeclared setting %r ignored", model_type, key)
        settings.pop(key)
    return settings


def check_known_keys(settings: Mapping[str, Any], known: set[str], where: str, noun: str = "setting") -> None:
    """Unknown keys are errors naming the key, the place, and the closest known key."""
    for key in settings:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(sorted(known))}"
            raise SettingsError(f"{where}: unknown {noun} '{key}'{hint}")


def validate(
    handler: FamilyHandler, model_type: str, model_def: Mapping[str, Any], settings: Mapping[str, Any], where: str
) -> dict[str, Any]:
    """Check a merged settings dict against the host's and the family's schemas, then the family's own checks.

    Known keys, text lengths, then each value converted by its spec (types, ranges, finite numbers, readable
    images); the family's `validate_settings` then sees the values as written (it may be stricter, and checks
    settings against each other) except image inputs, which the host owns. Returns the normalised dict
    (host keys + the family's values), seed not yet resolved.
    """
    specs = family_specs(handler, model_type)
    settings, _ = foreign.split_settings(settings, HOST_ONLY | {s.name for s in specs}, where)  # others' keys set aside
    check_text_lengths(settings, where)
    try:
        host_part = schema.convert_settings(HOST_SPECS, settings)
        converted = schema.convert_settings(specs, settings)
    except SettingsError as exc:
        raise SettingsError(f"{where}: {exc}") from None
    host_part.pop("generation_info", None)  # provenance of a saved image, never an input
    images = {s.name for s in specs if s.kind == "image"}
    family_part = {k: v for k, v in settings.items() if k not in HOST_ONLY and k not in images}
    try:
        normalised = handler.validate_settings(model_type, family_part)
    except SettingsError as exc:
        raise SettingsError(f"{where}: {exc}") from None
    return {**host_part, **converted, **normalised, **{k: converted[k] for k in images if k in converted}}


def ignored_settings(handler: FamilyHandler, model_type: str, settings: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Other tools' keys in `settings` that change nothing here (host/foreign.py): kept for the record."""
    specs = family_specs(handler, model_type)
    return foreign.split_settings(settings, HOST_ONLY | {s.name for s in specs}, where)[1]


def generation_inputs(specs: list[SettingSpec], settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a family's `generate` receives: no host keys, image inputs read into PIL images."""
    kinds = {s.name: s.kind for s in specs}
    return {
        k: schema.load_image(v, k) if kinds.get(k) == "image" else v for k, v in settings.items() if k not in HOST_ONLY
    }


def input_records(specs: list[SettingSpec], settings: Mapping[str, Any]) -> dict[str, Any]:
    """Image inputs as a saved image records them: file name and sha256 (pixels' sha256 for in-memory images)."""
    return {s.name: schema.image_record(settings[s.name]) for s in specs if s.kind == "image" and settings.get(s.name) is not None}


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
