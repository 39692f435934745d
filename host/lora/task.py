"""The LoRAs of one task, in the order they apply: the preset's (`model.loras`), then an `.lset`'s (the
task's `lset` key), then the task's own (`activated_loras`). Each group keeps its own multipliers
(`model.loras_multipliers`, the set's `loras_mult`, `loras_multipliers`), in Wan2GP's syntax.

Names resolve in the family's LoRA folder, then in the root `loras/` folder; only an absolute path the
user wrote reaches elsewhere (host.lora.resolve_lora). A name given as a URL (Wan2GP metadata) is looked up
by its file name in those folders (LoRAs are never downloaded). Everything here runs before any weights load.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from common.errors import CheckpointError, SettingsError
from host.lora import lora_root, parse_multipliers, resolve_lora
from host.lora.sets import load_lset, resolve_lset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraChoice:
    """The LoRAs a task applies, in order, each with its own multiplier (hashable: the session compares them)."""

    names: tuple[str, ...] = ()  # as written: relative to a LoRA folder, or an absolute path
    paths: tuple[Path, ...] = ()  # the resolved files
    multipliers: tuple[str, ...] = ()  # one Wan2GP token per LoRA: "0.8", or a per-step schedule "1.0,0.5"

    def __bool__(self) -> bool:
        return bool(self.paths)

    def __add__(self, other: LoraChoice) -> LoraChoice:
        return LoraChoice(self.names + other.names, self.paths + other.paths, self.multipliers + other.multipliers)


def lora_folders(handler: Any, architecture: str, args: argparse.Namespace | None) -> list[Path]:
    """Where LoRA names resolve: the family's folder first, then the root `loras/` folder."""
    family, root = Path(handler.get_lora_dir(architecture, args)), lora_root(args)
    return [family] if family == root else [family, root]


def multiplier_tokens(text: str | Sequence[Any], count: int, what: str) -> list[str]:
    """Wan2GP multipliers for `count` LoRAs -> one canonical token each ("#" comments dropped, 1.0 filled in)."""
    try:
        schedules = parse_multipliers(text, count)
    except SettingsError as err:
        raise SettingsError(f"{what}: {err}") from None
    return [",".join(repr(v) for v in values) for values in schedules]


def resolve_group(names: Sequence[str], multipliers: str | Sequence[Any], folders: Sequence[Path], keys: tuple[str, str]) -> LoraChoice:
    """One group of LoRAs (a preset's, a set's or a task's): multipliers checked, then every file found.

    `keys` name the group's two settings in error messages, e.g. ("activated_loras", "loras_multipliers").
    """
    tokens = multiplier_tokens(multipliers, len(names), keys[1])
    paths = []
    for name in names:
        try:
            paths.append(resolve_lora_url(str(name), folders) if is_url(name) else resolve_lora(name, folders))
        except CheckpointError as err:
            raise CheckpointError(f"{keys[0]}: {err}") from None
    return LoraChoice(tuple(str(n) for n in names), tuple(paths), tuple(tokens))


def is_url(name: Any) -> bool:
    return str(name).startswith(("http://", "https://"))


def url_file_name(url: str) -> str:
    """The LoRA file a URL names, as Wan2GP stores it: `https://.../resolve/main/x.safetensors?download=1` ->
    `x.safetensors`; Wan2GP's `URL|sub/folder` form -> `sub/folder/x.safetensors`."""
    link, _, subfolder = url.partition("|")
    name = PurePosixPath(link.split("?", 1)[0].split("#", 1)[0]).name
    return f"{subfolder.strip().strip('/')}/{name}" if subfolder.strip().strip("/") else name


def resolve_lora_url(url: str, folders: Sequence[Path]) -> Path:
    """A LoRA named by URL (Wan2GP metadata often does): the file of that name in the LoRA folders, since
    LoRAs are never downloaded here. Not found: an error saying where to save it."""
    name = url_file_name(url)
    if not name or PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
        raise CheckpointError(f"LoRA URL {url!r} names no file; save the LoRA into {folders[0]} and give its file name")
    try:
        path = resolve_lora(name, folders)
    except CheckpointError:
        where = ", ".join(str(f) for f in folders)
        raise CheckpointError(
            f"LoRA {url!r} is a URL, and LoRAs are not downloaded: no file {name!r} in {where}; "
            f"save it into {folders[0]} (its name is looked up there)"
        ) from None
    log.info("LoRA %s: using %s (found by its file name)", url, path)
    return path


def expand_lset(settings: Mapping[str, Any], folders: Sequence[Path]) -> dict[str, Any]:
    """A task's `lset` -> its LoRAs and multipliers placed before the task's own `activated_loras`.

    The result names every LoRA explicitly (no `lset` key), so a saved image regenerates without the set.
    The set's `prompt` is for the web UI (it fills the prompt box); a task's prompt is its own.
    """
    out = dict(settings)
    name = out.pop("lset", None)
    if not name:
        return out
    lset = load_lset(resolve_lset(name, folders))
    own = list(out.get("activated_loras", []))
    ours = multiplier_tokens(lset.loras_mult, len(lset.loras), f"LoRA set {name!r} loras_mult")
    theirs = multiplier_tokens(out.get("loras_multipliers", ""), len(own), "loras_multipliers")
    out["activated_loras"] = [*lset.loras, *own]
    out["loras_multipliers"] = " ".join([*ours, *theirs])
    return out


def task_loras(model_def: Mapping[str, Any], settings: Mapping[str, Any], folders: Sequence[Path], preset_id: str) -> LoraChoice:
    """The preset's LoRAs, then the task's (`lset` already expanded), resolved, each with its multipliers."""
    preset_keys = (f"preset {preset_id} model.loras", f"preset {preset_id} model.loras_multipliers")
    preset_part = resolve_group(model_def.get("loras", []), model_def.get("loras_multipliers", ""), folders, preset_keys)
    task_keys = ("activated_loras", "loras_multipliers")
    task_part = resolve_group(settings.get("activated_loras", []), settings.get("loras_multipliers", ""), folders, task_keys)
    return preset_part + task_part
