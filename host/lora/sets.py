"""`.lset` files: a named choice of LoRAs with their multipliers (and optionally a prompt), saved in the
family's LoRA folder. Wan2GP's format: JSON `{"loras": [...], "loras_mult": "1 0.5", "prompt": "..."}`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from common.errors import SettingsError
from host.atomic import atomic_write_json

LSET_SUFFIX = ".lset"
_FIELDS = {"loras": list, "loras_mult": str, "prompt": str, "full_prompt": str}


@dataclass
class LoraSet:
    loras: list[str]  # names relative to the LoRA folder (or absolute paths)
    loras_mult: str = ""  # Wan2GP multiplier syntax, see host.lora.parse_multipliers
    prompt: str = ""


def _lset_path(folder: Path, name: str) -> Path:
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise SettingsError(f"LoRA set name {name!r} must be a plain file name (no folders)")
    return Path(folder) / (name if name.endswith(LSET_SUFFIX) else name + LSET_SUFFIX)


def save_lset(folder: Path, name: str, lset: LoraSet) -> Path:
    """Write `<folder>/<name>.lset` atomically (a crash never leaves half a file)."""
    path = _lset_path(folder, name)
    return atomic_write_json(path, asdict(lset), indent=2)


def load_lset(path: Path) -> LoraSet:
    """Read and validate an .lset file; unknown fields or wrong types are errors naming the file and field."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise SettingsError(f"LoRA set {path}: cannot read it as JSON ({err})") from err
    if not isinstance(raw, dict):
        raise SettingsError(f"LoRA set {path}: expected a JSON object with 'loras' and 'loras_mult'")
    for key, value in raw.items():
        if key not in _FIELDS:
            raise SettingsError(f"LoRA set {path}: unknown field {key!r} (known: {', '.join(_FIELDS)})")
        if not isinstance(value, _FIELDS[key]):
            raise SettingsError(f"LoRA set {path}: {key!r} must be a {_FIELDS[key].__name__}, got {value!r}")
    if "loras" not in raw or not all(isinstance(n, str) for n in raw["loras"]):
        raise SettingsError(f"LoRA set {path}: 'loras' must be a list of file names")
    return LoraSet(raw["loras"], raw.get("loras_mult", ""), raw.get("prompt", ""))


def resolve_lset(name: str, folders: Sequence[Path], allow_absolute: bool = True) -> Path:
    """An .lset name (`portrait` or `portrait.lset`) in the first of `folders` that has it, or an absolute path.

    `allow_absolute=False` (the web UI: a request names the file) keeps to the folders: any other path is refused.
    """
    if not allow_absolute and (Path(name).expanduser().is_absolute() or name.startswith("~")):
        raise SettingsError(
            f"LoRA set {name!r}: only sets in the LoRA folders can be loaded here; pick one from the list"
        )
    if Path(name).expanduser().is_absolute():
        path = Path(name).expanduser()
        if not path.is_file():
            raise SettingsError(f"LoRA set {path} does not exist")
        return path
    candidates = [_lset_path(folder, name) for folder in folders]
    for path in candidates:
        if path.is_file():
            return path
    known = sorted({n for folder in folders for n in list_lsets(folder)})
    raise SettingsError(
        f"LoRA set {name!r} not found in {', '.join(str(f) for f in folders)} (known: {', '.join(known) or 'none'})"
    )


def list_lsets(folder: Path) -> list[str]:
    """Names of the .lset files directly in `folder`."""
    folder = Path(folder)
    return sorted(p.name for p in folder.glob(f"*{LSET_SUFFIX}")) if folder.is_dir() else []
