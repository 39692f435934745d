"""Settings a family declares: one `SettingSpec` per setting, and the checks derived from them.

A family lists what it accepts once (`family_handler.query_settings_schema(model_type)`); the host builds
its validation, command-line flags, web form, documentation table and saved-image settings from that list.
This module is family-agnostic (families and the host both import it) and imports nothing from either.

Conversion is the same for every caller: text stays text (None -> ""), integers accept whole numbers
(also written as text: "8", "8.0"), numbers must be finite, sizes are "WxH", images are a readable image
file (a path) or an in-memory PIL image. Errors are `SettingsError`s that name the setting and say what
is allowed; the caller adds where the setting came from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import struct
import warnings
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import SettingsError

# What a setting holds. "size" is "WxH" (width first, as Wan2GP); "image" is a path (task files, the command
# line) or a PIL image (Python API); "text_or_list" is text or a list (LoRA multipliers); "mapping" a JSON object.
KINDS = ("text", "int", "float", "bool", "choice", "size", "image", "list", "text_or_list", "mapping")
# Where a setting shows in the web form: the main column, the "Advanced options" and "LoRAs" panels, the
# "Image inputs" panel, or not as a form field (set another way, e.g. the model picker, or by the program).
GROUPS = ("basic", "advanced", "lora", "image", "hidden")
SIZE_PATTERN = re.compile(r"\s*(\d+)\s*[xX*]\s*(\d+)\s*")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class SettingSpec:
    """One setting: what it holds, its default, what is allowed, and how the CLI and the form show it.

    `minimum`/`maximum` bound numbers (and each side of a size); `range_text` replaces the generated
    "between a and b" in error messages where a bound needs a word of explanation. `flag` is the CLI flag
    (and web form field id) where it differs from the name (`steps` for num_inference_steps).
    """

    name: str
    kind: str
    default: Any = None
    help: str = ""
    group: str = "basic"
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False  # `> minimum` instead of `>= minimum`
    multiple_of: int | None = None  # sizes: each side a multiple of this
    choices: tuple[Any, ...] = ()  # a choice's values; for text, suggestions (the form's dropdown)
    aliases: tuple[tuple[str, Any], ...] = ()  # extra accepted spellings of a choice: ("jpg", "jpeg")
    range_text: str = ""
    bool_as_number: bool = False  # numbers: true -> 1, false -> 0 (a switch that also takes a strength)
    changes_image: bool = True  # False: only how or where it runs, or how the file is written
    flag: str = ""  # short name for `--flag` and the form field; "" -> the name
    cli: bool = True  # has a one-shot command-line flag
    label: str = ""  # the form's label; "" -> from the name
    lines: int = 1  # text: lines of the form's text box
    step: float | None = None  # numbers: the form's step
    preview: bool = False  # image: the family shows it as the model will read it (handler.preview_input)
    # The settings this one acts through: it has an effect only while one of them is above its value (the web
    # form marks it inactive otherwise). The negative prompt: (("guidance_scale", 0), ("NAG_scale", 1)).
    active_when: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        # A malformed declaration is the family author's bug: say so when the schema is built.
        if self.kind not in KINDS:
            raise ValueError(f"setting {self.name!r}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.group not in GROUPS:
            raise ValueError(f"setting {self.name!r}: group {self.group!r} is not one of {', '.join(GROUPS)}")
        if self.kind == "choice" and not self.choices:
            raise ValueError(f"setting {self.name!r}: a choice needs its choices")

    @property
    def short(self) -> str:
        """The CLI flag's name without dashes and the form field id: `steps`, `guidance`, `prompt`."""
        return (self.flag or self.name).replace("-", "_")

    @property
    def flag_name(self) -> str:
        """`--steps`, `--negative-prompt`."""
        return "--" + self.short.replace("_", "-")

    @property
    def title(self) -> str:
        return self.label or self.name.replace("_", " ").capitalize()

    def with_default(self, default: Any) -> SettingSpec:
        return dataclasses.replace(self, default=default)


def with_defaults(specs: Iterable[SettingSpec], defaults: Mapping[str, Any]) -> list[SettingSpec]:
    """The same specs with some defaults replaced (a model type's own: Turbo 8 steps, Base 30)."""
    specs = list(specs)
    unknown = set(defaults) - {s.name for s in specs}
    if unknown:
        raise ValueError(f"defaults for settings the schema does not declare: {', '.join(sorted(unknown))}")
    return [s.with_default(defaults[s.name]) if s.name in defaults else s for s in specs]


def is_active(spec: SettingSpec, values: Mapping[str, Any]) -> bool:
    """Whether `spec` has an effect with these values (its `active_when`; always without one). A setting
    named there but missing or not a number counts as not above its value."""
    if not spec.active_when:
        return True
    for name, above in spec.active_when:
        try:
            if float(values.get(name)) > above:
                return True
        except (TypeError, ValueError):
            continue
    return False


def defaults_of(specs: Iterable[SettingSpec]) -> dict[str, Any]:
    """name -> default (lists and dicts copied, so callers may change them)."""
    return {s.name: _copy(s.default) for s in specs}


def by_name(specs: Iterable[SettingSpec]) -> dict[str, SettingSpec]:
    return {s.name: s for s in specs}


def convert_settings(specs: Sequence[SettingSpec], values: Mapping[str, Any]) -> dict[str, Any]:
    """Convert and check the values the specs name (others are left to the caller), in the specs' order."""
    return {s.name: convert(s, values[s.name]) for s in specs if s.name in values}


def convert(spec: SettingSpec, value: Any) -> Any:
    """One value -> its normalised form; SettingsError naming the setting and what it accepts."""
    return _CONVERTERS[spec.kind](spec, value)


# -- numbers -------------------------------------------------------------------------------------


def as_int(key: str, value: Any) -> int:
    """Whole numbers, also as text ("8", "8.0"); bool, inf and nan are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise SettingsError(f"'{key}' must be an integer (got {value!r})")
    if isinstance(value, int):
        return value  # exact, however large (ranges are checked later); float() of a huge int would overflow
    try:
        number = float(value)
    except ValueError:
        raise SettingsError(f"'{key}' must be an integer (got {value!r})") from None
    if not number.is_integer():  # also false for inf and nan, which int() cannot convert
        raise SettingsError(f"'{key}' must be a whole number (got {value!r})")
    return int(number)


def as_float(key: str, value: Any) -> float:
    """Finite numbers, also as text; bool, inf and nan are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise SettingsError(f"'{key}' must be a number (got {value!r})")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise SettingsError(f"'{key}' must be a number (got {value!r})") from None
    if not math.isfinite(number):  # JSON and float() both accept inf and nan; no setting means anything with them
        raise SettingsError(f"'{key}' must be a finite number (got {value!r})")
    return number


def as_text(key: str, value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise SettingsError(f"'{key}' must be text (got {type(value).__name__})")
    return value


def check_range(spec: SettingSpec, value: float, name: str | None = None) -> None:
    """`name must be between a and b (got v)`, or the spec's own `range_text`."""
    low, high = spec.minimum, spec.maximum
    too_low = low is not None and (value <= low if spec.exclusive_minimum else value < low)
    if too_low or (high is not None and value > high):
        raise SettingsError(f"{name or spec.name} must be {range_text(spec)} (got {_number(value)})")


def range_text(spec: SettingSpec) -> str:
    """What the bounds allow, in words: 'between 1 and 1000', '>= 0', '> 0' (or the spec's own text)."""
    if spec.range_text:
        return spec.range_text
    low, high = spec.minimum, spec.maximum
    if low is not None and high is not None and not spec.exclusive_minimum:
        return f"between {_number(low)} and {_number(high)}"
    parts = []
    if low is not None:
        parts.append(f"{'>' if spec.exclusive_minimum else '>='} {_number(low)}")
    if high is not None:
        parts.append(f"<= {_number(high)}")
    return " and ".join(parts)


def _int(spec: SettingSpec, value: Any) -> int:
    number = as_int(spec.name, value)
    check_range(spec, number)
    return number


def _float(spec: SettingSpec, value: Any) -> float:
    if spec.bool_as_number and isinstance(value, bool):
        return 1.0 if value else 0.0
    number = as_float(spec.name, value)
    check_range(spec, number)
    return number


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


# -- text, switches, choices ---------------------------------------------------------------------


def _text(spec: SettingSpec, value: Any) -> str:
    return as_text(spec.name, value)


def _bool(spec: SettingSpec, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise SettingsError(f"'{spec.name}' must be true or false (got {value!r})")


def _choice(spec: SettingSpec, value: Any) -> Any:
    """The canonical choice: matched as text, ignoring case (`PNG` -> png, "4" -> 4), aliases included."""
    numeric = any(isinstance(c, int) for c in spec.choices)
    types = (str, int) if numeric else (str,)
    if isinstance(value, bool) or not isinstance(value, types):
        wanted = " or ".join(t.__name__ for t in types)
        raise SettingsError(f"'{spec.name}' must be {wanted} ({spec.help or choices_text(spec)}), got {value!r}")
    known = {str(c).lower(): c for c in spec.choices} | {str(a).lower(): c for a, c in spec.aliases}
    key = str(value).strip().lower()
    if key not in known:
        raise SettingsError(f"'{spec.name}' must be {choices_text(spec)}, got {value!r}")
    return known[key]


def choices_text(spec: SettingSpec) -> str:
    """'png, jpeg or webp'."""
    names = [str(c) for c in spec.choices]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _list(spec: SettingSpec, value: Any) -> list[str]:
    if not isinstance(value, list):
        raise SettingsError(f"'{spec.name}' must be list ({spec.help}), got {value!r}")
    if not all(isinstance(v, str) for v in value):
        raise SettingsError(f"'{spec.name}' must be a list of text ({spec.help}), got {value!r}")
    return list(value)


def _text_or_list(spec: SettingSpec, value: Any) -> str | list[Any]:
    if isinstance(value, bool) or not isinstance(value, (str, list)):
        raise SettingsError(f"'{spec.name}' must be str or list ({spec.help}), got {value!r}")
    return list(value) if isinstance(value, list) else value


def _mapping(spec: SettingSpec, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SettingsError(f"'{spec.name}' must be dict ({spec.help}), got {value!r}")
    return dict(value)


# -- sizes ---------------------------------------------------------------------------------------


def parse_size(value: Any, name: str = "resolution") -> tuple[int, int]:
    """'1024x768' -> (1024, 768), width first as Wan2GP; SettingsError naming `name` otherwise."""
    match = SIZE_PATTERN.fullmatch(str(value)) if isinstance(value, str) else None
    if match is None:
        raise SettingsError(f"{name} must look like '1024x768' (width x height), got {value!r}")
    return int(match.group(1)), int(match.group(2))


def check_side(spec: SettingSpec, side: str, value: int) -> None:
    """One side of a size: `width must be between 16 and 4096`, `... a multiple of 16 ... nearest valid sizes`."""
    check_range(spec, value, side)
    multiple = spec.multiple_of
    if multiple and value % multiple:
        low = value // multiple * multiple
        raise SettingsError(
            f"{side} must be a multiple of {multiple} (got {value}); nearest valid sizes: {low} or {low + multiple}"
        )


def _size(spec: SettingSpec, value: Any) -> str:
    width, height = parse_size(value, spec.name)
    check_side(spec, "width", width)
    check_side(spec, "height", height)
    return f"{width}x{height}"


# -- images --------------------------------------------------------------------------------------


def is_pil_image(value: Any) -> bool:
    """A PIL image, without importing PIL for callers that never pass one."""
    return any(cls.__module__.startswith("PIL.") and cls.__name__ == "Image" for cls in type(value).__mro__)


def _image(spec: SettingSpec, value: Any) -> Any:
    """None (no image), a PIL image (kept), or a path to a readable image file (-> its absolute path as text).

    Only the file's header is read here (no pixels decoded), so checking a task costs nothing.
    """
    if value is None or value == "":
        return None
    if is_pil_image(value):
        return value
    if not isinstance(value, (str, Path)):
        raise SettingsError(f"'{spec.name}' must be the path of an image file (got {type(value).__name__})")
    path = Path(value).expanduser()
    if not path.is_file():
        raise SettingsError(f"'{spec.name}': image file {str(value)!r} not found (give the path of a PNG, JPEG or WebP file)")
    read_image_header(path, spec.name)
    return str(path.resolve())


# What PIL raises for a file that is not an image, broken chunks, or a decompression bomb.
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error)


def read_image_header(path: Path, name: str) -> tuple[int, int]:
    """(width, height) of an image file from its header; SettingsError naming the setting and the file."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # refuse what PIL only warns about
            with Image.open(path) as image:
                return image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SettingsError(f"'{name}': {path} declares too many pixels to be an input image ({exc})") from None
    except _IMAGE_ERRORS as exc:
        raise SettingsError(f"'{name}': {path} is not a readable image ({exc})") from None


def load_image(value: Any, name: str) -> Any:
    """A converted image setting -> the PIL image a family receives (the file read now; EXIF rotation applied)."""
    if value is None or is_pil_image(value):
        return value
    from PIL import Image, ImageOps

    read_image_header(Path(value), name)
    try:
        with Image.open(value) as image:
            return ImageOps.exif_transpose(image)  # a copy, loaded, upright as the photo was taken
    except _IMAGE_ERRORS as exc:
        raise SettingsError(f"'{name}': {value} is not a readable image ({exc})") from None


def image_record(value: Any) -> dict[str, Any] | None:
    """What a saved image records of an input image: the file's name and sha256, or the pixels' sha256
    (with size and mode) for an in-memory image; None for no image."""
    if value is None:
        return None
    if is_pil_image(value):
        digest = hashlib.sha256(f"{value.mode}:{value.size[0]}x{value.size[1]}:".encode())
        digest.update(value.tobytes())
        return {"source": "in-memory image", "size": f"{value.size[0]}x{value.size[1]}", "mode": value.mode,
                "pixels_sha256": digest.hexdigest()}
    digest = hashlib.sha256()
    with open(value, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"name": Path(value).name, "sha256": digest.hexdigest()}


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else dict(value) if isinstance(value, dict) else value


_CONVERTERS = {
    "text": _text,
    "int": _int,
    "float": _float,
    "bool": _bool,
    "choice": _choice,
    "size": _size,
    "image": _image,
    "list": _list,
    "text_or_list": _text_or_list,
    "mapping": _mapping,
}
