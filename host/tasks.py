"""Task files for `--process`: settings in every container this program or Wan2GP writes, and images.

- a JSON settings object, or a JSON list of them;
- Wan2GP's queue manifests, a list of `{"id", "params", "plugin_data"}` (the task is `params`), and its
  `.zip` queues (`queue.json` plus the input images it names, extracted next to nothing the user owns:
  a folder under the system's temporary folder, one per queue file);
- Wan2GP's UI settings files `settings/<model_type>_settings.json` (the model type is the file's name);
- a preset file (a `model` block and settings): its settings run on the installed model type of its name;
- an image: ours, Wan2GP's (PNG `comment`, JPEG/WebP EXIF UserComment), ComfyUI's or A1111's
  (host/image_settings.py).

Every task is validated before anything loads; a bad task is reported and skipped, the others run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from common.errors import SettingsError, UserInputError
from host import wan2gp
from host.image_settings import read_image_settings
from host.outputs import EXTENSIONS
from host.session import Session, Task
from host.settings import overlay, parse_json_text, read_json_file

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {*EXTENSIONS.values(), ".jpeg"}
QUEUE_MANIFEST = "queue.json"  # Wan2GP's queue .zip (shared/utils/settings_bundle.py)
UI_SETTINGS_SUFFIX = "_settings.json"  # Wan2GP's settings/<model_type>_settings.json
MAX_MANIFEST_BYTES = 64 << 20  # a queue of thousands of tasks is a few MB
MAX_ATTACHMENT_BYTES = 256 << 20  # an input image; more is not an image a task needs


@dataclass
class RawTask:
    """One settings dict as read, with where it came from (`tasks.json[2]`)."""

    settings: Any
    where: str
    source: str | None = None  # the tool that wrote it ("Wan2GP"): Session.prepare adapts its settings
    notes: list[str] = field(default_factory=list)  # what reading converted or left out, one line each


@dataclass
class PreparedTask:
    """A task that validated, or the error that says why it did not."""

    where: str
    task: Task | None = None
    error: str | None = None


def read_task_file(path: Path) -> list[RawTask]:
    """The tasks in one file (an image holds exactly one)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return [image_task(path)]
    if suffix == ".zip":
        return read_queue_zip(path)
    return tasks_from_json(read_json_file(path, SettingsError, "task file"), path)


def image_task(path: Path) -> RawTask:
    """The task an image carries, with the reader's notes (another tool's settings converted)."""
    found = read_image_settings(path)
    notes = list(found.notes)
    if "model_type" not in found.settings:
        notes.append(f"no model type in this image ({found.source}): give one with --model")
    return RawTask(found.settings, str(path), found.tool, notes)


def tasks_from_json(data: Any, path: Path, source: str | None = None) -> list[RawTask]:
    """The tasks of a parsed JSON file: an object, a list, Wan2GP's manifest entries, a preset."""
    if isinstance(data, dict):
        if isinstance(data.get("model"), dict):
            return [_preset_task(data, path)]
        return [_entry(data, str(path), path, source)]
    if isinstance(data, list):
        return [_entry(item, f"{path}[{i}]", path, source) for i, item in enumerate(data)]
    raise SettingsError(f"{path}: a task file holds a settings object or a list of them, not {type(data).__name__}")


def _entry(item: Any, where: str, path: Path, source: str | None) -> RawTask:
    """A settings object; a Wan2GP queue entry `{id, params, plugin_data}` is its `params`; a Wan2GP UI
    settings file without a model type is for the model type its name says."""
    if isinstance(item, Mapping) and isinstance(item.get("params"), Mapping) and "model_type" not in item:
        return RawTask(dict(item["params"]), where, source or wan2gp.SOURCE)
    if isinstance(item, Mapping) and "model_type" not in item and path.name.endswith(UI_SETTINGS_SUFFIX):
        model_type = path.name[: -len(UI_SETTINGS_SUFFIX)]
        note = f"model_type {model_type!r} from the file name (Wan2GP's settings/<model_type>{UI_SETTINGS_SUFFIX})"
        return RawTask({"model_type": model_type, **item}, where, source or wan2gp.SOURCE, [note])
    return RawTask(item, where, source)


def _preset_task(data: Mapping[str, Any], path: Path) -> RawTask:
    """A preset given as a task: its settings, on the installed model type named like the file."""
    settings = {k: v for k, v in data.items() if k != "model"}
    note = (
        f"a preset: its settings run on the installed model type {path.stem!r}; its model block is not "
        "installed by --process (copy the file into finetunes/ for that)"
    )
    return RawTask({"model_type": path.stem, **settings}, f"{path} (preset settings)", notes=[note])


def read_queue_zip(path: Path) -> list[RawTask]:
    """A Wan2GP queue: `queue.json` (a list of `{id, params}`) and the input images its tasks name, which
    are extracted (each at most MAX_ATTACHMENT_BYTES) and given to the tasks as paths."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise SettingsError(f"{path}: not a readable .zip queue ({exc})") from None
    with archive:
        names = set(archive.namelist())
        if QUEUE_MANIFEST not in names:
            raise SettingsError(f"{path}: no {QUEUE_MANIFEST} in this .zip (a Wan2GP queue holds one)")
        text = _read_member(archive, QUEUE_MANIFEST, MAX_MANIFEST_BYTES, path).decode("utf-8", "replace")
        data = parse_json_text(text, SettingsError, f"{path}:{QUEUE_MANIFEST}")
        if not isinstance(data, list):
            raise SettingsError(f"{path}:{QUEUE_MANIFEST} holds a list of tasks, not {type(data).__name__}")
        folder = _extraction_folder(path)
        tasks = []
        for i, item in enumerate(data):
            task = _entry(item, f"{path}:{QUEUE_MANIFEST}[{i}]", path, wan2gp.SOURCE)
            if isinstance(task.settings, dict):
                task.settings = {k: _attachment(archive, names, v, folder, path) for k, v in task.settings.items()}
            tasks.append(task)
    return tasks


def _attachment(archive: zipfile.ZipFile, names: set[str], value: Any, folder: Path, path: Path) -> Any:
    """A value naming a file of the queue (an input image) -> the extracted file's path; lists item by item."""
    if isinstance(value, list):
        return [_attachment(archive, names, v, folder, path) for v in value]
    if not isinstance(value, str) or value not in names or value == QUEUE_MANIFEST or not _safe_member(value):
        return value
    target = folder / re.sub(r"[^A-Za-z0-9._-]+", "_", value)
    if not target.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_bytes(_read_member(archive, value, MAX_ATTACHMENT_BYTES, path))
        os.replace(tmp, target)  # complete or absent, also with two runs at once
    return str(target)


def _read_member(archive: zipfile.ZipFile, name: str, limit: int, path: Path) -> bytes:
    """A member's bytes, refused past `limit` (counted while inflating: the header's size can lie)."""
    try:
        with archive.open(name) as member:
            data = member.read(limit + 1)
    except (zipfile.BadZipFile, OSError, RuntimeError, EOFError, zlib.error) as exc:  # RuntimeError: encrypted
        raise SettingsError(f"{path}: cannot read {name} from the .zip ({exc})") from None
    if len(data) > limit:
        raise SettingsError(f"{path}: {name} is larger than {limit >> 20} MB; refused")
    return data


def _safe_member(name: str) -> bool:
    parts = PurePosixPath(name.replace("\\", "/"))
    return bool(name) and not parts.is_absolute() and ".." not in parts.parts and ":" not in name


def _extraction_folder(path: Path) -> Path:
    """One folder per queue file (and version of it) under the system's temporary folder."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"wgp_queue_{path.stem[:40]}_{key}"


def read_task_files(paths: Iterable[Path]) -> tuple[list[RawTask], list[PreparedTask]]:
    """All tasks of several files; unreadable files become failed entries."""
    tasks: list[RawTask] = []
    failed: list[PreparedTask] = []
    for path in paths:
        try:
            tasks.extend(read_task_file(path))
        except UserInputError as exc:
            failed.append(PreparedTask(str(path), error=str(exc)))
        except Exception as exc:  # noqa: BLE001 - whatever else a hostile file causes fails this file only
            log.debug("task file %s unreadable", path, exc_info=True)
            failed.append(PreparedTask(str(path), error=f"{path}: cannot read this task file ({type(exc).__name__}: {exc})"))
    return tasks, failed


def override_tasks(tasks: Iterable[RawTask], overrides: Mapping[str, Any]) -> list[RawTask]:
    """The tasks with `overrides` (settings given on the command line, `--model` as model_type) over their
    own settings; a changed model type is noted."""
    out = []
    for raw in tasks:
        if not overrides or not isinstance(raw.settings, Mapping):
            out.append(raw)
            continue
        notes = list(raw.notes)
        given, wanted = raw.settings.get("model_type"), overrides.get("model_type")
        if wanted is not None and given not in (None, wanted):
            notes.append(f"model_type {given!r} replaced by {wanted!r} (--model)")
        notes = [n for n in notes if not (wanted is not None and n.startswith("no model type in this image"))]
        out.append(RawTask(overlay(raw.settings, overrides), raw.where, raw.source, notes))
    return out


def prepare_tasks(session: Session, raw_tasks: Iterable[RawTask]) -> list[PreparedTask]:
    """Validate every task up front (merge over the preset, check keys, types and values); each valid task's
    notes are the reader's, then the session's."""
    prepared = []
    for raw in raw_tasks:
        try:
            task = session.prepare(raw.settings, raw.where, source=raw.source)
            task.notes[:0] = raw.notes
            prepared.append(PreparedTask(raw.where, task=task))
        except UserInputError as exc:
            hint = next((n for n in raw.notes if n.startswith("no model type")), None)
            prepared.append(PreparedTask(raw.where, error=f"{exc} ({hint})" if hint else str(exc)))
        except Exception as exc:  # noqa: BLE001 - a value no check foresaw fails its own task, never the batch
            log.debug("task %s failed validation", raw.where, exc_info=True)
            prepared.append(PreparedTask(raw.where, error=f"{raw.where}: invalid task ({type(exc).__name__}: {exc})"))
    return prepared
