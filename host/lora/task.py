"""The LoRAs of one task, in the order they apply: the preset's (`model.loras`), then an `.lset`'s (the
task's `lset` key), then the task's own (`activated_loras`). Each group keeps its own multipliers
(`model.loras_multipliers`, the set's `loras_mult`, `loras_multipliers`), in Wan2GP's syntax.

Names resolve in the family's LoRA folder, then in the root `loras/` folder; only an absolute path the
user wrote reaches elsewhere (host.lora.resolve_lora). Everything here runs before any weights load.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import CheckpointError, SettingsError
from host.lora import lora_root, parse_multipliers, resolve_lora
from host.lora.sets import load_lset, resolve_lset


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
        if str(name).startswith(("http://", "https://")):
            raise SettingsError(
                f"{keys[0]}: {name!r} is a URL, and LoRAs are not downloaded: save the file into {folders[0]} and give its name"
            )
        try:
            paths.append(resolve_lora(name, folders))
        except CheckpointError as err:
            raise CheckpointError(f"{keys[0]}: {err}") from None
    return LoraChoice(tuple(str(n) for n in names), tuple(paths), tuple(tokens))


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
