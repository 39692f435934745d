"""Settings read back from any image: ours, Wan2GP's, ComfyUI's and A1111's, for `--process`, the Python
API and the web UI's image drop.

In order of trust: our `wgp_settings` chunk; a JSON `comment` chunk (Wan2GP's PNGs) or EXIF UserComment
(ours and Wan2GP's JPEG/WebP, ASCII or UNICODE); ComfyUI's `prompt`/`workflow` graphs (host/comfyui.py);
an A1111-style `parameters` text (PNG chunk, EXIF UserComment or ImageDescription). Only metadata is read,
never pixels. Settings of another tool come with notes on what was converted or left out; Wan2GP's are
marked (`tool`) so the session adapts them where Wan2GP behaves differently (host/wan2gp.py).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import SettingsError
from host import PROGRAM_NAME, wan2gp
from host.comfyui import settings_from_comfy
from host.outputs import (
    DESCRIPTION_KEY,
    PARAMETERS_KEY,
    SETTINGS_KEY,
    USER_COMMENT_KEY,
    WAN2GP_KEY,
    parse_settings_json,
    read_metadata,
)

log = logging.getLogger(__name__)

OURS, WAN2GP, COMFYUI, A1111 = "embedded settings", "Wan2GP settings", "ComfyUI workflow", "A1111 parameters"
A1111_KEYS = {  # A1111 "parameters" field -> (setting, type)
    "Steps": ("num_inference_steps", int),
    "CFG scale": ("guidance_scale", float),
    "Seed": ("seed", int),
    "Size": ("resolution", str),
    "Model": ("model_type", str),
    "Shift": ("flow_shift", float),
}
A1111_LORA = re.compile(r"<lora:([^:>]+)(?::([-+]?[\d.]+))?[^>]*>")
LORA_SUFFIX = ".safetensors"


@dataclass
class ImageSettings:
    """Settings found in an image, what kind of metadata held them, and notes on what was converted."""

    settings: dict[str, Any]
    source: str  # OURS, WAN2GP, COMFYUI or A1111
    notes: list[str] = field(default_factory=list)
    tool: str | None = None  # "Wan2GP": adapt as Wan2GP meant them (Session.prepare's source)


def read_image_settings(path: Path) -> ImageSettings:
    """The settings an image carries; SettingsError naming the file when it is no image or carries none."""
    meta = read_metadata(path)
    if SETTINGS_KEY in meta:
        return ImageSettings(parse_settings_json(meta[SETTINGS_KEY], f"{path}: embedded settings"), OURS)
    for key, label in ((WAN2GP_KEY, "comment"), (USER_COMMENT_KEY, "EXIF UserComment")):
        text = meta.get(key, "")
        if text.lstrip().startswith("{"):
            data = parse_settings_json(text, f"{path}: {label} settings")
            if _is_ours(data) or (key == USER_COMMENT_KEY and not wan2gp.is_wan2gp(data)):
                return ImageSettings(data, OURS)
            return ImageSettings(data, WAN2GP, tool=wan2gp.SOURCE)
    if "prompt" in meta or "workflow" in meta:
        return _comfy(path, meta)
    text = meta.get(PARAMETERS_KEY) or _text_comment(meta.get(USER_COMMENT_KEY)) or meta.get(DESCRIPTION_KEY)
    if text:
        return a1111_settings(text)
    raise SettingsError(f"{path}: no generation settings in this image (ours, Wan2GP's, ComfyUI's or A1111 'parameters')")


def _is_ours(data: dict[str, Any]) -> bool:
    info = data.get("generation_info")
    program = info.get("program") if isinstance(info, dict) else data.get("type")
    return str(program or "").startswith(PROGRAM_NAME)


def _text_comment(text: str | None) -> str | None:
    """An EXIF UserComment that is A1111 text (A1111 writes its parameters there in JPEG/WebP)."""
    return text if text and re.search(r"(^|\n|, )Steps: ", text) else None


def _comfy(path: Path, meta: dict[str, str]) -> ImageSettings:
    graphs = {}
    for key in ("prompt", "workflow"):
        if meta.get(key, "").lstrip().startswith("{"):
            graphs[key] = parse_settings_json(meta[key], f"{path}: ComfyUI {key}")
    found = settings_from_comfy(graphs.get("prompt"), graphs.get("workflow"))
    return ImageSettings(found.settings, COMFYUI, found.notes)


# -- A1111 -----------------------------------------------------------------------------------------


def split_a1111(text: str) -> tuple[str, str | None, dict[str, str]]:
    """A1111 'parameters' -> (prompt, negative prompt or None, {field: value as written})."""
    lines = text.strip().splitlines()
    if not lines:
        raise SettingsError("the image's parameters text is empty")
    fields_line = lines[-1] if re.search(r"(^|, )Steps: ", lines[-1]) else ""
    body = lines[:-1] if fields_line else lines
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    target: list[str] | None = None
    for line in body:
        if line.startswith("Negative prompt:"):
            target = negative_lines
            line = line[len("Negative prompt:") :].strip()
        (target if target is not None else prompt_lines).append(line)
    fields = {k.strip(): v.strip().strip('"') for k, v in re.findall(r'\s*([\w ]+): ("(?:[^"\\]|\\.)*"|[^,]*)(?:,|$)', fields_line)}
    negative = "\n".join(negative_lines).strip() if target is not None else None
    return "\n".join(prompt_lines).strip(), negative, fields


def parse_a1111(text: str) -> dict[str, Any]:
    """A1111-style 'parameters' text -> settings as written: prompt, negative prompt, steps, CFG, seed, size, model."""
    prompt, negative, fields = split_a1111(text)
    out: dict[str, Any] = {"prompt": prompt}
    if negative is not None:
        out["negative_prompt"] = negative
    for key, value in fields.items():
        if key in A1111_KEYS:
            name, kind = A1111_KEYS[key]
            try:
                out[name] = kind(value)
            except ValueError:
                log.warning("ignoring A1111 field %s=%r", key, value)
    return out


def a1111_settings(text: str) -> ImageSettings:
    """A1111 parameters as our settings. Another tool's (its Version is not ours): CFG scale c is guidance
    c - 1 here (A1111's cfg 1 = no guidance), `<lora:name:w>` prompt tags become LoRAs, its checkpoint name
    is not a model type; each conversion noted."""
    settings, notes = parse_a1111(text), []
    _, _, fields = split_a1111(text)
    if fields.get("Version", "").startswith(PROGRAM_NAME):
        return ImageSettings(settings, A1111)
    if "guidance_scale" in settings:
        cfg = settings["guidance_scale"]
        settings["guidance_scale"] = round(max(0.0, cfg - 1.0), 6)
        notes.append(f"A1111 CFG scale {cfg:g} is guidance_scale {settings['guidance_scale']:g} here (its CFG 1 = no guidance)")
    if "model_type" in settings:
        notes.append(f"A1111 model {settings.pop('model_type')!r}: the model type comes from the form or --model")
    if fields.get("Sampler") and not fields["Sampler"].lower().startswith("euler"):
        notes.append(f"A1111 sampler {fields['Sampler']!r} not carried over: this program samples with Euler")
    loras = A1111_LORA.findall(settings.get("prompt", ""))
    if loras:
        settings["prompt"] = A1111_LORA.sub("", settings["prompt"]).strip()
        settings["activated_loras"] = [name if name.endswith(LORA_SUFFIX) else name + LORA_SUFFIX for name, _ in loras]
        settings["loras_multipliers"] = " ".join(weight or "1" for _, weight in loras)
        notes.append(f"A1111 prompt LoRA tags became activated_loras: {', '.join(settings['activated_loras'])}")
    return ImageSettings(settings, A1111, notes)
