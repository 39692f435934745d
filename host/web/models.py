"""What the web UI says about a model type, without loading it: the picker's groups, which files are on
disk (and which are missing, from where, to where), the prompt's token count, whether the negative prompt
acts, the LoRA folder and each LoRA's load report, and the memory planner's advice. No Gradio here.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from common.errors import MissingFilesError, UserInputError
from common.settings_schema import SettingSpec, is_active
from host.files import resolve_files, specs_from_model_def
from host.presets import Preset
from host.session import Session
from host.settings import MAX_TEXT_CHARS

log = logging.getLogger(__name__)

# -- the model picker ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelChoice:
    model_type: str
    label: str
    family: str  # family label, e.g. "Z-Image"


def model_choices(session: Session) -> list[ModelChoice]:
    """Visible presets grouped by family (family order), by id within it (self-tests last); finetunes marked."""
    registry, finetunes = session.registry, session.config.finetunes_dir
    families = sorted(registry.families.values(), key=lambda f: (f.order, f.label))
    out: list[ModelChoice] = []
    for family in families:
        presets = [
            p
            for p in session.catalog.presets.values()
            if p.visible and registry.family_of.get(p.architecture) == family.name
        ]
        for preset in sorted(presets, key=lambda p: (bool(p.model_def.get("selftest")), p.model_type)):
            from_finetune = finetunes is not None and any(Path(s).parent == Path(finetunes) for s in preset.sources)
            label = f"{preset.name} (finetune)" if from_finetune else preset.name
            out.append(ModelChoice(preset.model_type, label, family.label))
    return out


def family_choices(choices: list[ModelChoice]) -> list[str]:
    return list(dict.fromkeys(c.family for c in choices))


def models_of_family(choices: list[ModelChoice], family: str) -> list[tuple[str, str]]:
    """(label, model_type) pairs of one family, for the model dropdown."""
    return [(c.label, c.model_type) for c in choices if c.family == family]


def family_of(choices: list[ModelChoice], model_type: str) -> str | None:
    return next((c.family for c in choices if c.model_type == model_type), None)


# -- files ---------------------------------------------------------------------------------------


@dataclass
class FilesReport:
    ready: bool  # every file is on disk (or the family writes them itself)
    text: str  # markdown for the page


def files_report(session: Session, preset: Preset, quantization: str) -> FilesReport:
    """Which files the model needs and whether they are here; never downloads.

    Missing files: a one-line summary naming them, then (in a <details> block, open when downloads are
    off) each file's URL and the path to put it at.
    """
    if preset.model_def.get("selftest"):
        return FilesReport(True, "Self-test model: tiny random weights, written on first use (its images are noise).")
    try:
        found = local_files(session, preset, quantization)
    except MissingFilesError as exc:
        names = re.findall(r"^  - [\w]+: (.+)$", str(exc), flags=re.MULTILINE)
        listed = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        if session.config.allow_download:
            lead, opened = (
                f"**{len(names)} file(s) not on disk yet** ({listed}): downloaded on the first generation.",
                "",
            )
        else:
            lead, opened = f"**{len(names)} model file(s) missing** ({listed}); downloads are off.", " open"
        summary = "<summary>which files, where from, where to put them</summary>"
        details = f"<details{opened}>{summary}\n\n```\n{exc}\n```\n</details>"
        return FilesReport(False, f"{lead}\n\n{details}")
    except UserInputError as exc:
        return FilesReport(False, f"**Cannot use this model:** {exc}")
    names = ", ".join(sorted(p.name for p in found.values()))
    return FilesReport(True, f"All {len(found)} model files are on disk ({names}).")


def local_files(session: Session, preset: Preset, quantization: str) -> dict[str, Path]:
    """role -> local path of every file the model needs; MissingFilesError (no download) otherwise."""
    handler = session.handler(preset)
    family_files = handler.query_model_files(preset.architecture, preset.model_def, quantization)
    specs = specs_from_model_def(preset.model_def, family_files)
    return resolve_files(specs, quantization, session.folders, None, preset.model_type)


# -- tokens --------------------------------------------------------------------------------------


@dataclass
class TokenCount:
    tokens: int
    exact: bool
    limit: int
    too_long_chars: int = 0  # > 0: the prompt's length in characters, over MAX_TEXT_CHARS (not tokenized)

    @property
    def truncated(self) -> bool:
        return self.tokens > self.limit

    def markdown(self) -> str:
        if self.too_long_chars:
            return (
                f"**too long: {self.too_long_chars:,} characters**; at most {MAX_TEXT_CHARS:,} are accepted "
                f"(only the first {self.limit} tokens are read): shorten the prompt"
            )
        approx = "" if self.exact else "≈ "
        text = f"{approx}{self.tokens} / {self.limit} tokens"
        if not self.exact:
            text += " (estimate: the tokenizer is not on disk yet)"
        if self.truncated:
            text += f" — **too long: everything after token {self.limit} is cut off** (raise max tokens, up to 1024)"
        return text


def tokenizer_folder(session: Session, preset: Preset, quantization: str) -> Path | None:
    """The local tokenizer folder of a model type, if its files are on disk (never downloads)."""
    try:
        files = local_files(session, preset, quantization)
    except UserInputError:
        files = {}
    if "tokenizer" in files:
        path = files["tokenizer"]
        return path if path.is_dir() else path.parent
    if preset.model_def.get("selftest"):  # written on first use under the checkpoint folder
        urls = preset.model_def.get("text_encoder_URLs") or []
        folder = session.folders.primary / Path(str(urls[0])).parent if urls else None
        return folder if folder is not None and (folder / "tokenizer.json").is_file() else None
    transformer = files.get("transformer")
    if transformer is not None and (transformer / "tokenizer").is_dir():  # a diffusers folder
        return transformer / "tokenizer"
    return None


@functools.lru_cache(maxsize=4)
def _load_tokenizer(folder: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def count_tokens(prompt: str, folder: Path | None, limit: int) -> TokenCount:
    """Tokens the text encoder sees (chat template included when the tokenizer has one), else an estimate.

    A prompt over MAX_TEXT_CHARS is not tokenized (tasks refuse it anyway): a 10 MB paste took the server
    from 0.8 to 3.3 GB when it was.
    """
    if len(prompt) > MAX_TEXT_CHARS:
        return TokenCount(round(len(prompt) / 4) + 6, False, limit, too_long_chars=len(prompt))
    if folder is not None:
        try:
            tokenizer = _load_tokenizer(str(folder))
            text = prompt
            if getattr(tokenizer, "chat_template", None):
                # Chat-model text encoders see the prompt as a user turn plus the assistant header; templates
                # that know `enable_thinking` (Qwen3) are fed as the engines feed them, others ignore it.
                messages = [{"role": "user", "content": prompt}]
                text = tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True, enable_thinking=True
                )
            return TokenCount(len(tokenizer(text).input_ids), True, limit)
        except (OSError, ValueError) as exc:
            log.info("tokenizer in %s unusable for counting: %s", folder, exc)
    # About 4 characters per token for English BPE, plus the chat template's few tokens.
    return TokenCount(max(0, round(len(prompt) / 4)) + 6, False, limit)


# -- negative prompt -----------------------------------------------------------------------------


def activity_note(spec: SettingSpec, values: Mapping[str, Any]) -> tuple[bool, str]:
    """(active, label) of a setting that acts only through others, by the rule its family declares (the spec's
    `active_when`): Z-Image's negative prompt acts through guidance (CFG) or NAG. `values` by setting name."""
    if not spec.active_when:
        return True, spec.title
    if is_active(spec, values):
        held = next(f"{n} > {v:g}" for n, v in spec.active_when if is_active(replace(spec, active_when=((n, v),)), values))
        return True, f"{spec.title} (active: {held})"
    raise_text = " or ".join(f"{n} above {v:g}" for n, v in spec.active_when)
    return False, f"{spec.title} — no effect with these settings: raise {raise_text} to use it"


# -- LoRAs ---------------------------------------------------------------------------------------


def lora_folder(session: Session, preset: Preset) -> Path:
    """The family's LoRA folder (where the list comes from and `.lset` files are saved)."""
    return session.lora_folders(preset)[0]


def lora_files(session: Session, preset: Preset) -> list[str]:
    """LoRA names as tasks write them: the family folder's files, then the root folder's own (rescanned)."""
    from host.lora import LoraLibrary

    folders = session.lora_folders(preset)
    names = LoraLibrary(folders[0]).rescan()
    for root in folders[1:]:
        inside = [Path(f.resolve()) for f in folders[:1]]
        for name in LoraLibrary(root).rescan():
            if not any((root / name).resolve().is_relative_to(f) for f in inside) and name not in names:
                names.append(name)
    return names


def lora_reports(session: Session, preset: Preset, names: list[str], multipliers: str) -> str:
    """Markdown: one load report per chosen LoRA (format, modules matched, rank, alpha) or its error."""
    if not names:
        return ""
    from host.lora import load_lora, parse_multipliers, resolve_lora

    handler = session.handler(preset)
    if not hasattr(handler, "normalize_lora"):
        return f"- the {preset.architecture} family cannot read LoRAs"
    lines = []
    try:
        schedules = parse_multipliers(multipliers or "", len(names))
    except UserInputError as exc:
        lines.append(f"- **multipliers:** {exc}")
        schedules = [[1.0]] * len(names)
    for name, values in zip(names, schedules, strict=True):
        try:
            loaded = load_lora(resolve_lora(name, session.lora_folders(preset)), handler)
        except UserInputError as exc:
            lines.append(f"- **{name}: {exc}**")
            continue
        loaded.report.multiplier = ",".join(f"{v:g}" for v in values)
        lines.append(f"- {loaded.report.summary()}")
    return "\n".join(lines)


# -- memory --------------------------------------------------------------------------------------


def memory_plan(preset: Preset, settings: Mapping[str, Any], vram_gb: float | None = None) -> str:
    """The planner's table for this model type and size (empty when the planner has no sizes for it)."""
    from host.lowvram.planner import format_table, plan_table, sizes_from_facts

    sizes = sizes_from_facts(preset.facts)
    if sizes is None or preset.model_def.get("selftest"):
        return ""
    try:
        width, height = (int(v) for v in str(settings.get("resolution", "1024x1024")).lower().split("x"))
    except ValueError:
        return ""
    cfg = float(settings.get("guidance_scale") or 0) > 0
    title = f"{preset.model_type} {width}x{height}, CFG {'on' if cfg else 'off'}"
    return format_table(plan_table(sizes, width, height, cfg, vram_gb), title)


def detected_vram_gb() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / 2**30


def out_of_memory_advice(preset: Preset, settings: Mapping[str, Any]) -> str:
    """What to change after an out-of-memory error: the planner's options that fit this GPU, if known."""
    from host.lowvram.planner import plan_table, sizes_from_facts

    sizes, vram = sizes_from_facts(preset.facts), detected_vram_gb()
    generic = "lower the resolution or batch size, use int8 weights, or a lower-VRAM offload profile (advanced options)"
    if sizes is None or vram is None:
        return f"Out of memory: {generic}."
    try:
        width, height = (int(v) for v in str(settings.get("resolution", "1024x1024")).lower().split("x"))
    except ValueError:
        return f"Out of memory: {generic}."
    cfg = float(settings.get("guidance_scale") or 0) > 0
    fitting = [p for p in plan_table(sizes, width, height, cfg, vram) if p.fits]
    if not fitting:
        return f"Out of memory: no offload profile fits {vram:.1f} GB at {width}x{height}; {generic}."
    options = ", ".join(f"profile {p.profile} with {p.quantization} (~{p.vram_gb:.1f} GB)" for p in fitting[:4])
    return f"Out of memory. The memory planner expects these to fit your {vram:.1f} GB GPU: {options}."


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
