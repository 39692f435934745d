"""One-shot command-line flags derived from the settings schemas: the host's own settings and every
discovered family's, each `--<flag>` typed from its spec (`--steps` for num_inference_steps, `--guidance`
for guidance_scale, `--toy-image PATH` for an image input). A family that adds a setting gets its flag
without any change here.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable
from typing import Any

from common.settings_schema import SettingSpec, range_text
from host.registry import Registry
from host.settings import HOST_SPECS, all_family_specs

log = logging.getLogger(__name__)

METAVARS = {"size": "WxH", "image": "PATH", "text": "TEXT", "int": "N", "float": "X"}


def host_flag_specs() -> list[SettingSpec]:
    """The host's settings that have a flag (quantization, profile, attention, output_format)."""
    return [s for s in HOST_SPECS if s.cli]


def family_flag_specs(registry: Registry) -> list[SettingSpec]:
    """Every discovered family's settings that have a flag, each name once (host/settings.py all_family_specs)."""
    return [s for s in all_family_specs(registry) if s.cli]


def add_setting_flags(group: argparse._ArgumentGroup, specs: Iterable[SettingSpec]) -> list[SettingSpec]:
    """Add one flag per spec to `group`; returns the specs whose flag was added (a flag that clashes with
    another of the command line is skipped, with a warning naming the setting)."""
    added = []
    for spec in specs:
        try:
            group.add_argument(spec.flag_name, dest=spec.short, help=flag_help(spec), **_argparse_options(spec))
        except argparse.ArgumentError as exc:
            log.warning("setting %r gets no command-line flag: %s", spec.name, exc)
            continue
        added.append(spec)
    return added


def settings_from_args(args: argparse.Namespace, specs: Iterable[SettingSpec]) -> dict[str, Any]:
    """setting name -> value of every flag given."""
    values = {spec.name: getattr(args, spec.short, None) for spec in specs}
    return {name: value for name, value in values.items() if value is not None}


def flag_help(spec: SettingSpec) -> str:
    """The spec's help, what it allows, and where the default comes from (`%` escaped for argparse)."""
    allowed = "" if spec.kind == "choice" else range_text(spec)  # choices are listed by argparse
    if spec.kind == "size" and allowed:
        allowed = f"each side {allowed}" + (f", a multiple of {spec.multiple_of}" if spec.multiple_of else "")
    text = spec.help + (f" ({allowed})" if allowed and allowed not in spec.help else "")
    if spec.kind == "image":
        text += "; an image file"
    return (text + "; default: the preset's").replace("%", "%%")


def _argparse_options(spec: SettingSpec) -> dict[str, Any]:
    if spec.kind == "int":
        return {"type": int, "metavar": METAVARS["int"]}
    if spec.kind == "float":
        return {"type": float, "metavar": METAVARS["float"]}
    if spec.kind == "bool":
        return {"action": argparse.BooleanOptionalAction, "default": None}
    if spec.kind == "choice":  # text choices are checked by argparse; others (auto or a number) by validation
        if all(isinstance(c, str) for c in spec.choices):
            return {"choices": list(spec.choices)}
        return {"metavar": "{" + ",".join(str(c) for c in spec.choices) + "}"}
    if spec.kind == "list":
        return {"nargs": "+", "metavar": "NAME"}
    return {"metavar": METAVARS.get(spec.kind, "VALUE")}
