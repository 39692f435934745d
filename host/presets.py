"""Presets: `defaults/<model_type>.json` shipped with the program and users' `finetunes/*.json`.

A preset is Wan2GP-shaped: a `model` block (name, architecture, files, attention rules, LoRAs,
visibility) plus default generation settings at the top level. A finetune with a new id adds a model
type; one with an existing id overrides it field by field. Every file is validated on load; a bad
file is reported and skipped, the others still load.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from common.errors import UserInputError
from common.model_facts import ModelFacts
from host import settings as host_settings
from host.registry import REPO_ROOT, Registry, query_facts

log = logging.getLogger(__name__)

DEFAULTS_DIR = REPO_ROOT / "defaults"
FINETUNES_DIR = REPO_ROOT / "finetunes"


class PresetError(UserInputError):
    """A preset file is unreadable or invalid; the message names the file and the field."""


# model block key -> (accepted JSON types, meaning)
MODEL_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "name": ((str,), "label shown to users"),
    "architecture": ((str,), "architecture a family handler claims, e.g. z_image"),
    "description": ((str,), "one paragraph for users"),
    "URLs": ((list, str), "transformer file variants (https URL, local file or diffusers folder), or another preset id"),
    "text_encoder_URLs": ((list, str), "text encoder file variants, or another preset id"),
    "attention": ((dict,), 'attention backend by GPU compute capability, e.g. {"<89": "sdpa"}'),
    "loras": ((list,), "LoRA files always applied with this preset"),
    "loras_multipliers": ((list, str), "multipliers for `loras`"),
    "visible": ((bool,), "listed in the UI and --list-models"),
    "selftest": ((bool,), "files are tiny random weights the family writes itself"),
}
REQUIRED_MODEL_KEYS = ("name", "architecture")
# Model block keys Wan2GP's Finetune Editor writes (shared/gradio/finetune_editor.py) that describe the model
# for its UI or its downloader and change no image: accepted and ignored, so its presets and finetunes load.
WAN2GP_MODEL_KEYS: dict[str, str] = {
    "infos": "Wan2GP's model help text",
    "prompt_infos": "Wan2GP's prompt help text",
    "resolutions": "sizes Wan2GP's resolution picker offers",
    "auto_quantize": "Wan2GP quantizes on the fly when no int8 file exists (this program does that for int8 anyway)",
    "preload_URLs": "files Wan2GP downloads at start-up (not downloaded here)",
    "finetune_source_model": "the model a finetune was made from",
}
NUNCHAKU = "Nunchaku SVDQuant"
# File-name token -> a weight format no loader here reads (Wan2GP ships presets for several of them).
UNLOADABLE_FORMATS = {
    "svdq": NUNCHAKU,
    "nunchaku": NUNCHAKU,
    "nvfp4": "NVFP4 (4-bit float)",
    "mxfp4": "MXFP4 (4-bit float)",
    "fp4": "fp4 (4-bit float)",
    "int4": "int4 (4-bit integer)",
    "nf4": "bitsandbytes NF4 (4-bit)",
    "gguf": "GGUF",
}


@dataclass(frozen=True)
class Preset:
    """One usable model type: its validated model definition and default settings."""

    model_type: str
    model_def: dict[str, Any]
    settings: dict[str, Any]
    sources: tuple[Path, ...]
    facts: ModelFacts  # the family's answer to query_model_facts: sizes, int8 layers, latent format

    @property
    def name(self) -> str:
        return str(self.model_def["name"])

    @property
    def architecture(self) -> str:
        return str(self.model_def["architecture"])

    @property
    def visible(self) -> bool:
        return bool(self.model_def.get("visible", True))


@dataclass
class PresetCatalog:
    """All presets that loaded, plus one message per file that did not."""

    presets: dict[str, Preset] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # model type (file name) -> why it was skipped

    def get(self, model_type: str) -> Preset:
        """The preset for `model_type`, or an error that says why it was skipped or suggests the closest id."""
        if model_type in self.presets:
            return self.presets[model_type]
        if model_type in self.skipped:
            raise PresetError(f"model_type '{model_type}' is not usable: {self.skipped[model_type]}")
        close = difflib.get_close_matches(model_type, sorted(self.presets), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(sorted(self.presets))}"
        raise PresetError(f"unknown model_type '{model_type}'{hint}")


def load_presets(registry: Registry, defaults_dir: Path = DEFAULTS_DIR, finetunes_dir: Path | None = FINETUNES_DIR) -> PresetCatalog:
    """Read, merge and validate every preset; bad files end up in `catalog.errors`."""
    catalog = PresetCatalog()
    raw: dict[str, tuple[dict[str, Any], tuple[Path, ...]]] = {}
    for folder in (defaults_dir, finetunes_dir):
        if folder is None or not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.json")):
            try:
                data = read_preset_file(path)
            except PresetError as exc:
                catalog.errors.append(str(exc))
                catalog.skipped.setdefault(path.stem, str(exc))
                continue
            if path.stem in raw:
                base, sources = raw[path.stem]
                raw[path.stem] = (merge_preset(base, data), (*sources, path))
            else:
                raw[path.stem] = (data, (path,))
    for model_type, (data, sources) in raw.items():
        try:
            catalog.presets[model_type] = build_preset(model_type, data, sources, raw, registry)
        except UserInputError as exc:
            catalog.errors.append(str(exc))
            catalog.skipped[model_type] = str(exc)
    for message in catalog.errors:  # shown to users once, by whoever shows them (the CLI prints them)
        log.info("preset skipped: %s", message)
    return catalog


def read_preset_file(path: Path) -> dict[str, Any]:
    """Parse one JSON preset; bad JSON names the file, line and column."""
    data = host_settings.read_json_file(path, PresetError, "preset")
    if not isinstance(data, dict) or not isinstance(data.get("model", {}), dict):
        raise PresetError(f"{path}: a preset is a JSON object with a 'model' object and default settings")
    return data


def merge_preset(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Field-by-field override: the model block key by key, then each top-level setting."""
    merged = dict(base)
    for key, value in override.items():
        if key == "model":
            merged["model"] = {**base.get("model", {}), **value}
        else:
            merged[key] = value
    return merged


def build_preset(
    model_type: str,
    data: Mapping[str, Any],
    sources: tuple[Path, ...],
    all_raw: Mapping[str, tuple[dict[str, Any], tuple[Path, ...]]],
    registry: Registry,
) -> Preset:
    """Validate the model block and settings of one (merged) preset."""
    where = " + ".join(str(p) for p in sources)
    block = dict(data.get("model", {}))
    for key in REQUIRED_MODEL_KEYS:
        if key not in block:
            raise PresetError(f"{where}: model block lacks '{key}'")
    _check_weight_formats(block, where)  # before the other checks: the format is the reason that matters
    arch = block["architecture"]
    if not isinstance(arch, str) or arch not in registry.handlers:
        known = ", ".join(registry.architectures) or "none"
        raise PresetError(f"{where}: unknown architecture {arch!r} (known: {known})")
    handler = registry.handlers[arch]
    try:  # a family may refuse a model-block value: say which file
        family_fields = handler.query_model_def(model_type, block)
    except UserInputError as exc:
        raise PresetError(f"{where}: {exc}") from None
    _check_model_block(block, set(family_fields), where)
    model_def = {**family_fields, **block}
    for key in ("URLs", "text_encoder_URLs"):
        if isinstance(model_def.get(key), str):
            model_def[key] = _resolve_reference(model_type, key, model_def[key], all_raw, where)
    _check_weight_formats(model_def, where)  # lists reached through a reference
    if model_def.get("selftest"):
        _check_selftest_paths(model_def, where)
    settings = {k: v for k, v in data.items() if k != "model"}
    if "model_type" in settings:
        raise PresetError(f"{where}: 'model_type' is the file name ({model_type}), remove it from the preset")
    merged = {**host_settings.family_defaults(handler, arch, model_def), **settings}
    host_settings.validate(handler, arch, model_def, merged, where)
    return Preset(model_type, model_def, settings, sources, query_facts(handler, arch, model_def, where))


def _check_model_block(block: Mapping[str, Any], family_keys: set[str], where: str) -> None:
    """Unknown keys and wrong types in the model block name the file and the field."""
    known = set(MODEL_KEYS) | family_keys | set(WAN2GP_MODEL_KEYS)
    host_settings.check_known_keys(block, known, f"{where}: model block", noun="key")
    for key, value in block.items():
        if key not in MODEL_KEYS:  # a family's key (it checks its own) or one of Wan2GP's that is ignored
            continue
        types = MODEL_KEYS[key][0]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            wanted = " or ".join(t.__name__ for t in types)
            raise PresetError(f"{where}: model.{key} must be {wanted} ({MODEL_KEYS[key][1]}), got {value!r}")
        # The family checks the keys it adds (query_model_def), e.g. Wan2GP's "modules": [[bf16, int8]].
        if key in MODEL_KEYS and isinstance(value, list) and key != "loras_multipliers" and not all(isinstance(v, str) for v in value):
            raise PresetError(f"{where}: model.{key} must be a list of strings, got {value!r}")


def _check_selftest_paths(model_def: Mapping[str, Any], where: str) -> None:
    """A self-test preset's files are written by the program, so they must lie in a sub-folder of the
    checkpoints folder: no URL, no absolute path, no `..`, not the checkpoints folder itself."""
    for key in ("URLs", "text_encoder_URLs"):
        for entry in model_def.get(key) or []:
            parts = PurePosixPath(entry.replace("\\", "/"))
            if "://" in entry or parts.is_absolute() or Path(entry).is_absolute() or ".." in parts.parts or len(parts.parts) < 2:
                raise PresetError(
                    f"{where}: model.{key} entry {entry!r} of a self-test preset must be a file in a sub-folder of the "
                    'checkpoints folder (e.g. "my_selftest/model.safetensors"): the program writes those files itself'
                )


def unloadable_format(entry: str) -> str | None:
    """The weight format a file name marks when no loader here reads it ('svdq-fp4_r128-...' -> 'Nunchaku
    SVDQuant fp4'), else None. Tokens are split on '_', '-' and '.', as for dtypes (host/files.py)."""
    tokens = re.split(r"[_\-.]", PurePosixPath(entry.split("?", 1)[0]).name.lower())
    found = [UNLOADABLE_FORMATS[t] for t in tokens if t in UNLOADABLE_FORMATS]
    if not found:
        return None
    precision = next((t for t in tokens if t in ("fp4", "nvfp4", "int4")), None)
    return f"{found[0]} {precision}" if found[0] == NUNCHAKU and precision else found[0]


def _check_weight_formats(model_def: Mapping[str, Any], where: str) -> None:
    """Refuse a preset whose files no loader here reads, at start-up rather than after a multi-GB download."""
    for key in ("URLs", "text_encoder_URLs"):
        entries = model_def.get(key)
        for entry in entries if isinstance(entries, list) else []:
            fmt = unloadable_format(entry) if isinstance(entry, str) else None
            if fmt is not None:
                name = PurePosixPath(entry.split("?", 1)[0]).name
                raise PresetError(
                    f"{where}: model.{key} file {name!r} is {fmt} weights, a format this program cannot load "
                    "(no kernels for it here); use a bf16 or int8 preset instead (see --list-models)"
                )


def _resolve_reference(
    model_type: str, key: str, target: str, all_raw: Mapping[str, tuple[dict[str, Any], tuple[Path, ...]]], where: str
) -> list[str]:
    """`"URLs": "z_image"` reuses another preset's list (chains followed, cycles refused)."""
    seen = {model_type}
    while True:
        if target in seen:
            raise PresetError(f"{where}: model.{key} references form a cycle through '{target}'")
        if target not in all_raw:
            raise PresetError(f"{where}: model.{key} refers to preset '{target}', which does not exist")
        seen.add(target)
        value = all_raw[target][0].get("model", {}).get(key)
        if isinstance(value, list):
            return list(value)
        if not isinstance(value, str):
            raise PresetError(f"{where}: model.{key} refers to '{target}', which has no {key} list")
        target = value
