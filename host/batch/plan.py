"""From rows to the tasks to run: every row validated before any model loads, each task's seed and id
fixed, what a re-run skips decided, and the rest ordered so the model and its LoRAs change rarely.

A task's id is its row number plus a hash of its final settings (seed included): the same row with
the same settings is the same task in every run, and any change makes it a new one. A row without a
seed (or -1) gets one derived from its row number and settings, so a re-run makes the same image.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import settings_schema as schema
from common.errors import SettingsError, UserInputError
from host import settings as host_settings
from host.batch.execute import TaskSpec
from host.batch.inputs import Row
from host.batch.manifest import DONE, FAILED
from host.outputs import EXTENSIONS, slugify
from host.session import Session, Task

log = logging.getLogger(__name__)

SEED_RANGE = 2**32


@dataclass
class BatchItem:
    """A valid task of the batch: what workers get (`spec`), the validated task, and its file names."""

    spec: TaskSpec
    task: Task
    stem: str  # "00007-3fa2c91b_seed123_studio_photo_of_a_mug"
    ext: str  # ".png"
    count: int  # images the task makes (its batch_size)

    def names(self, count: int | None = None) -> list[str]:
        """The task's file names: `<stem>.png`, or `<stem>_1.png`, `<stem>_2.png`, ... for several images."""
        count = self.count if count is None else count
        return [f"{self.stem}{self.ext}"] if count == 1 else [f"{self.stem}_{i}{self.ext}" for i in range(1, count + 1)]


def prepare_rows(session: Session, rows: Iterable[Row], template_fields: Sequence[str] = ()) -> tuple[list[BatchItem], list[Row]]:
    """Validate every row (nothing loads); returns the valid tasks in row order and the bad rows (with `error`)."""
    items, invalid = [], []
    for row in rows:
        if row.error is None:
            try:
                items.append(_item(session, row, template_fields))
                continue
            except UserInputError as exc:
                row.error = str(exc) if str(exc).startswith(row.where) else f"{row.where}: {exc}"
            except Exception as exc:  # noqa: BLE001 - a value no check foresaw fails its own row, never the batch
                log.debug("%s failed validation", row.where, exc_info=True)
                row.error = f"{row.where}: invalid task ({type(exc).__name__}: {exc})"
        invalid.append(row)
    return items, invalid


def _item(session: Session, row: Row, template_fields: Sequence[str]) -> BatchItem:
    task = session.prepare(typed_settings(session, row, template_fields), row.where)
    settings = dict(task.settings)
    if int(settings.get("seed", -1)) < 0:
        settings["seed"] = derived_seed(row.number, settings)
    task.settings = settings
    digest = settings_digest(settings)
    spec = TaskSpec(f"{row.number}-{digest[:12]}", row.number, row.where, settings)
    stem = f"{row.number:05d}-{digest[:8]}_seed{settings['seed']}_{slugify(str(settings.get('prompt', '')))}"
    count = max(1, int(settings.get("batch_size", 1) or 1))
    return BatchItem(spec, task, stem, EXTENSIONS[settings["output_format"]], count)


def typed_settings(session: Session, row: Row, template_fields: Sequence[str] = ()) -> dict[str, Any]:
    """The row's settings with text values (CSV cells, --set) typed by the model's schema ("8" -> 8,
    "true" -> True, `a.safetensors, b.safetensors` -> a list), and template-only columns dropped."""
    settings = dict(row.settings)
    model_type = settings.get("model_type")
    if not isinstance(model_type, str):
        return settings  # prepare() says that model_type is required, and which ones exist
    preset = session.catalog.get(model_type)
    specs = {s.name: s for s in (*host_settings.HOST_SPECS, *host_settings.family_specs(session.handler(preset), preset.architecture))}
    for name in template_fields:
        if name not in specs:
            settings.pop(name, None)  # a column the template used, not a setting
    for key in row.text_keys & settings.keys():
        if key in specs and isinstance(settings[key], str):
            settings[key] = _typed(specs[key], settings[key])
    return settings


def _typed(spec: schema.SettingSpec, text: str) -> Any:
    if spec.kind in ("int", "float", "bool", "choice"):
        return schema.convert(spec, text.strip())
    if spec.kind in ("list", "mapping") and text.lstrip().startswith(("[", "{")):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise SettingsError(f"'{spec.name}' is not valid JSON ({exc.msg}): {text!r}") from None
    if spec.kind == "list":
        return [part.strip() for part in text.split(",") if part.strip()]
    return text


def settings_digest(settings: Mapping[str, Any]) -> str:
    """sha256 of the settings as canonical JSON (sorted keys)."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def derived_seed(row_number: int, settings: Mapping[str, Any]) -> int:
    """A seed fixed by the row number and the other settings (two equal rows still differ)."""
    rest = {k: v for k, v in settings.items() if k != "seed"}
    return int(settings_digest({"row": row_number, "settings": rest})[:16], 16) % SEED_RANGE


def order_items(items: Sequence[BatchItem]) -> list[BatchItem]:
    """Group tasks by what loading depends on (model, weights variant, memory profile), then by LoRAs,
    each group in order of first appearance and rows in file order inside it: one load per model, one
    LoRA swap per LoRA set."""
    groups: dict[tuple[Any, ...], list[BatchItem]] = {}
    for item in items:
        s, loras = item.task.settings, item.task.loras
        lora_key = (tuple(map(str, loras.paths)), repr(loras.multipliers))
        key = (item.task.model_type, str(s.get("quantization")), str(s.get("profile")), *lora_key)
        groups.setdefault(key, []).append(item)
    by_model: dict[tuple[Any, ...], list[BatchItem]] = {}
    for key, members in groups.items():
        by_model.setdefault(key[:3], []).extend(members)
    return [item for members in by_model.values() for item in members]


@dataclass
class ResumePlan:
    """What a run does with each valid task, given the manifest of earlier runs."""

    to_run: list[BatchItem] = field(default_factory=list)
    done: list[BatchItem] = field(default_factory=list)  # recorded done, files present: skipped
    failed_before: list[BatchItem] = field(default_factory=list)  # recorded failed: skipped unless --retry-failed
    recovered: list[BatchItem] = field(default_factory=list)  # files of a killed run, not yet recorded: recorded, not remade


def plan_resume(items: Sequence[BatchItem], records: Mapping[str, Mapping[str, Any]], manifest_dir: Path, output_dir: Path,
                retry_failed: bool = False) -> ResumePlan:
    """Sort each task into run / skip (done) / skip (failed earlier) / recover (its files exist unrecorded)."""
    plan = ResumePlan()
    for item in items:
        record = records.get(item.spec.id)
        status = record.get("status") if record else None
        if status == DONE and _files_present(record, manifest_dir):
            plan.done.append(item)
        elif status == FAILED and not retry_failed:
            plan.failed_before.append(item)
        elif status is None and all((output_dir / name).is_file() for name in item.names()):
            plan.recovered.append(item)
        else:
            if status == DONE:
                log.warning("%s: recorded as done but its files are gone; making it again", item.spec.where)
            plan.to_run.append(item)
    return plan


def _files_present(record: Mapping[str, Any], manifest_dir: Path) -> bool:
    files = record.get("files") or []
    return bool(files) and all(isinstance(f, dict) and (manifest_dir / str(f.get("path", ""))).is_file() for f in files)
