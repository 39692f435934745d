"""Generation settings for Z-Image: the same names as the host's task files, validated at the boundary.

Defaults here are only a fallback; the presets in `defaults/*.json` carry each model's real defaults
(Turbo: 8 steps, guidance 0, shift 3; Base: 30 steps, guidance 4, shift 6).
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, fields
from typing import Any

from common.errors import SettingsError

SIZE_MULTIPLE = 16  # VAE factor 8 x patch size 2
MAX_SIDE = 4096
MAX_TOKENS = 1024


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

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> GenerationSettings:
        """Validate a task-style settings dict; raises SettingsError naming the field and the fix."""
        values = dict(raw)
        _check_known_keys(values)
        if "resolution" in values:
            width, height = parse_resolution(values.pop("resolution"))
            for key, parsed in (("width", width), ("height", height)):
                if key in values and _as_int(key, values[key]) != parsed:
                    raise SettingsError(f"'resolution' says {key}={parsed} but '{key}' is {values[key]}: give one of them")
                values[key] = parsed
        if "prompt" not in values:
            raise SettingsError("'prompt' is required")
        out: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in values:
                out[f.name] = _CONVERT[f.name](f.name, values[f.name])
        settings = cls(**out)
        settings._check_ranges()
        return settings

    def _check_ranges(self) -> None:
        for key in ("width", "height"):
            value = getattr(self, key)
            if value < SIZE_MULTIPLE or value > MAX_SIDE:
                raise SettingsError(f"{key} must be between {SIZE_MULTIPLE} and {MAX_SIDE} (got {value})")
            if value % SIZE_MULTIPLE:
                low = value // SIZE_MULTIPLE * SIZE_MULTIPLE
                raise SettingsError(
                    f"{key} must be a multiple of {SIZE_MULTIPLE} (got {value}); nearest valid sizes: {low} or {low + SIZE_MULTIPLE}"
                )
        _require(1 <= self.num_inference_steps <= 1000, "num_inference_steps must be between 1 and 1000", self.num_inference_steps)
        _require(1 <= self.batch_size <= 64, "batch_size must be between 1 and 64", self.batch_size)
        _require(
            1 <= self.max_sequence_length <= MAX_TOKENS,
            f"max_sequence_length must be between 1 and {MAX_TOKENS}",
            self.max_sequence_length,
        )
        _require(self.guidance_scale >= 0, "guidance_scale must be >= 0 (0 turns guidance off)", self.guidance_scale)
        _require(self.flow_shift > 0, "flow_shift must be > 0", self.flow_shift)
        _require(self.cfg_normalization >= 0, "cfg_normalization must be false/true or a number >= 0", self.cfg_normalization)
        _require(self.cfg_truncation >= 0, "cfg_truncation must be >= 0 (values >= 1 never truncate)", self.cfg_truncation)
        _require(self.seed == -1 or 0 <= self.seed < 2**63, "seed must be -1 (random) or between 0 and 2^63-1", self.seed)

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_scale > 0


def parse_resolution(value: Any) -> tuple[int, int]:
    """'1024x768' -> (1024, 768) (width first, as Wan2GP)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*(\d+)\s*", str(value))
    if not match:
        raise SettingsError(f"resolution must look like '1024x768' (width x height), got {value!r}")
    return int(match.group(1)), int(match.group(2))


KNOWN_KEYS = {f.name for f in fields(GenerationSettings)} | {"resolution"}


def _check_known_keys(values: dict[str, Any]) -> None:
    for key in values:
        if key not in KNOWN_KEYS:
            close = difflib.get_close_matches(key, sorted(KNOWN_KEYS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known settings: {', '.join(sorted(KNOWN_KEYS))}"
            raise SettingsError(f"unknown setting '{key}'{hint}")


def _require(ok: bool, message: str, value: Any) -> None:
    if not ok:
        raise SettingsError(f"{message} (got {value})")


def _as_int(key: str, value: Any) -> int:
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


def _as_float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise SettingsError(f"'{key}' must be a number (got {value!r})")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise SettingsError(f"'{key}' must be a number (got {value!r})") from None
    if not math.isfinite(number):  # JSON and float() both accept inf and nan; no setting means anything with them
        raise SettingsError(f"'{key}' must be a finite number (got {value!r})")
    return number


def _as_str(key: str, value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise SettingsError(f"'{key}' must be text (got {type(value).__name__})")
    return value


def _as_norm(key: str, value: Any) -> float:
    """cfg_normalization: false = off, true = 1.0, or a number k."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    return _as_float(key, value)


_CONVERT = {
    "prompt": _as_str,
    "negative_prompt": _as_str,
    "width": _as_int,
    "height": _as_int,
    "num_inference_steps": _as_int,
    "guidance_scale": _as_float,
    "flow_shift": _as_float,
    "seed": _as_int,
    "batch_size": _as_int,
    "cfg_normalization": _as_norm,
    "cfg_truncation": _as_float,
    "max_sequence_length": _as_int,
}
