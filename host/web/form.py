"""The generation form of the web UI as plain data: fields <-> task settings, sizes, saved defaults, and
settings read back from images. No Gradio here, so all of it is unit-tested without a browser.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import SettingsError
from common.settings_schema import SettingSpec
from host import settings as host_settings
from host import wan2gp
from host.atomic import atomic_write_json
from host.image_settings import A1111_KEYS, ImageSettings, parse_a1111, read_image_settings  # noqa: F401 (re-exported)
from host.presets import Preset
from host.registry import REPO_ROOT, Registry
from host.session import Session

log = logging.getLogger(__name__)

DEFAULT_SETTINGS_DIR = REPO_ROOT / "settings"  # "save as my defaults" writes <model_type>.json here
SIZE_MULTIPLE = 16  # VAE factor 8 x patch 2; every shipped family needs it (the family still validates)
MAX_SIDE = 4096
SIZE_SIDES = ("width", "height")
CUSTOM = "custom"
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

MODEL_FIELD = "model"  # the model picker: sets model_type


@dataclass(frozen=True)
class FormField:
    """One input of the generation form: its element id, the setting it sets, and that setting's spec.

    A size setting is two fields (`width`, `height`) for one key; other ids are the spec's short name
    (`steps` for num_inference_steps, `loras` for activated_loras).
    """

    id: str
    key: str
    spec: SettingSpec | None = None  # None for the model picker


def form_fields(registry: Registry) -> tuple[FormField, ...]:
    """The form's inputs in page order: the model picker, every discovered family's settings (schema order),
    then the host's; settings shown elsewhere or set by the program (group "hidden") are not fields."""
    fields = [FormField(MODEL_FIELD, "model_type")]
    sides = SIZE_SIDES
    for spec in [*host_settings.all_family_specs(registry), *host_settings.HOST_SPECS]:
        if spec.group == "hidden":
            continue
        if spec.kind == "size":  # the first size is the page's width/height; others get their own pair
            fields += [FormField(side, spec.name, spec) for side in sides]
            sides = tuple(f"{spec.short}_{side}" for side in SIZE_SIDES)
        else:
            fields.append(FormField(spec.short, spec.name, spec))
    return tuple(fields)


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


def snap_size(width: float, height: float, spec: SettingSpec | None = None) -> tuple[int, int, str]:
    """Round each side to the nearest multiple of the size's `multiple_of` (16 where it names none: VAE 8 x
    patch 2, the usual case); returns (w, h, note). Out-of-range sides are left as they are, so validation
    reports them with the allowed range."""
    multiple = (spec.multiple_of if spec else None) or SIZE_MULTIPLE
    low = int(spec.minimum) if spec and spec.minimum is not None else multiple
    high = int(spec.maximum) if spec and spec.maximum is not None else MAX_SIDE
    snapped, changed = [], []
    for name, value in zip(SIZE_SIDES, (width, height), strict=True):
        v = int(round(float(value)))
        if low <= v <= high and v % multiple:
            new = min(high // multiple * multiple, max(multiple, (v + multiple // 2) // multiple * multiple))
            changed.append(f"{name} {v} -> {new}")
            v = new
        snapped.append(v)
    note = f"snapped to multiples of {multiple}: {', '.join(changed)}" if changed else ""
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


def settings_from_form(values: Mapping[str, Any], fields: Sequence[FormField], accepted: set[str]) -> FormResult:
    """Form values (by field id) -> raw task settings limited to the keys the model type accepts; each value
    typed from its spec (a Number's 3.0 -> 3 for an integer, "4" -> 4 for a numeric choice). Empty fields are
    left out (the preset's value applies); sizes are snapped (`snap_size`), with a note."""
    raw: dict[str, Any] = {}
    notes: list[str] = []
    for field in fields:
        spec = field.spec
        if spec is None or field.key not in accepted or field.id not in values or field.key in raw:
            continue
        if spec.kind == "size":
            width_id, height_id = _size_ids(fields, field.key)
            width, height, note = snap_size(values.get(width_id) or 0, values.get(height_id) or 0, spec)
            raw[field.key] = f"{width}x{height}"
            notes += [note] if note else []
        elif values[field.id] is not None or spec.kind == "list":  # an empty multiselect is no LoRA
            raw[field.key] = _from_field(spec, values[field.id])
    return FormResult(raw, notes)


def _from_field(spec: SettingSpec, value: Any) -> Any:
    if spec.kind == "int":
        return int(round(float(value)))
    if spec.kind == "float":
        return float(value)
    if spec.kind == "bool":
        return bool(value)
    if spec.kind == "list":
        return list(value or [])
    if spec.kind == "choice":  # the dropdown holds text: "4" is the choice 4
        return next((c for c in spec.choices if str(c) == str(value)), value)
    return value


def form_from_settings(settings: Mapping[str, Any], fields: Sequence[FormField]) -> dict[str, Any]:
    """Task settings -> form values by field id (only the fields the settings mention). An input image is
    shown when its file is still there (else left out, with a log line)."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        matching = [f for f in fields if f.key == key]
        if not matching:
            continue
        spec = matching[0].spec
        if spec is None:
            out[MODEL_FIELD] = value
        elif spec.kind == "size":
            try:
                sides = parse_size(str(value))
            except SettingsError:
                log.warning("ignoring %s %r", key, value)
                continue
            out.update(zip(_size_ids(fields, key), sides, strict=True))
        elif spec.kind == "image" and value is not None and not Path(str(value)).is_file():
            log.warning("input image %s of %r is not on disk; left out of the form", value, key)
        else:
            out[matching[0].id] = _to_field(spec, value)
    return out


def _to_field(spec: SettingSpec, value: Any) -> Any:
    if spec.kind == "choice" and not all(isinstance(c, str) for c in spec.choices):
        return str(value)  # e.g. profile 2 -> "2", as the dropdown lists it
    if spec.kind == "float" and spec.bool_as_number and isinstance(value, bool):
        return 1.0 if value else 0.0
    if spec.kind == "list":
        return list(value or [])
    return value


def _size_ids(fields: Sequence[FormField], key: str) -> tuple[str, str]:
    width, height = (f.id for f in fields if f.key == key)
    return width, height


# -- defaults ------------------------------------------------------------------------------------


def accepted_keys(session: Session, preset: Preset) -> set[str]:
    """Every setting a model type accepts: the host's keys and the family's."""
    handler = session.handler(preset)
    family = host_settings.family_defaults(handler, preset.architecture, preset.model_def)
    return set(host_settings.HOST_ONLY) | set(family)


def preset_defaults(session: Session, preset: Preset, settings_dir: Path | None) -> dict[str, Any]:
    """Host defaults < family defaults < preset < the user's saved defaults for this model type."""
    handler = session.handler(preset)
    family = host_settings.family_defaults(handler, preset.architecture, preset.model_def)
    merged = {**host_settings.host_defaults(), **family, **preset.settings}
    saved = load_user_defaults(settings_dir, preset.model_type)
    known = set(host_settings.HOST_ONLY) | set(family)
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
# The readers live in host/image_settings.py (the CLI and the API read images too); the form takes what they find.


def settings_from_image(path: Path) -> ImageSettings:
    """Our embedded settings; else Wan2GP's `comment`/UserComment; else a ComfyUI graph; else A1111 `parameters`."""
    return read_image_settings(path)


def settings_for_form(session: Session, found: ImageSettings, model_type: str | None) -> tuple[dict[str, Any], list[str]]:
    """An image's settings as the form should show them, with notes: provenance dropped, and Wan2GP's adapted for
    the model type they will run on (their own when it is here, else the form's) where Wan2GP behaves differently."""
    settings = {k: v for k, v in found.settings.items() if k != "generation_info"}
    notes = list(found.notes)
    wanted = settings.get("model_type")
    preset = session.catalog.presets.get(wanted if wanted in session.catalog.presets else model_type or "")
    if preset is not None:
        handler = session.handler(preset)
        specs = host_settings.family_specs(handler, preset.architecture)
        settings, more = wan2gp.adapt(settings, found.tool, handler, preset.architecture, preset.model_def, specs)
        notes += more
    return settings, notes
