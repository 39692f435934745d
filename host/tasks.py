"""Task files for `--process`: a JSON settings object, a JSON list of them, or a saved image.

Every task is validated before anything loads; a bad task is reported and skipped, the others run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import SettingsError, UserInputError
from host.outputs import EXTENSIONS, read_settings
from host.session import Session, Task
from host.settings import read_json_file

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {*EXTENSIONS.values(), ".jpeg"}


@dataclass
class RawTask:
    """One settings dict as read, with where it came from (`tasks.json[2]`)."""

    settings: Any
    where: str


@dataclass
class PreparedTask:
    """A task that validated, or the error that says why it did not."""

    where: str
    task: Task | None = None
    error: str | None = None


def read_task_file(path: Path) -> list[RawTask]:
    """The tasks in one file (an image holds exactly one)."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return [RawTask(read_settings(path), str(path))]
    data = read_json_file(path, SettingsError, "task file")
    if isinstance(data, dict):
        return [RawTask(data, str(path))]
    if isinstance(data, list):
        return [RawTask(item, f"{path}[{i}]") for i, item in enumerate(data)]
    raise SettingsError(f"{path}: a task file holds a settings object or a list of them, not {type(data).__name__}")


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


def prepare_tasks(session: Session, raw_tasks: Iterable[RawTask]) -> list[PreparedTask]:
    """Validate every task up front (merge over the preset, check keys, types and values)."""
    prepared = []
    for raw in raw_tasks:
        try:
            prepared.append(PreparedTask(raw.where, task=session.prepare(raw.settings, raw.where)))
        except UserInputError as exc:
            prepared.append(PreparedTask(raw.where, error=str(exc)))
        except Exception as exc:  # noqa: BLE001 - a value no check foresaw fails its own task, never the batch
            log.debug("task %s failed validation", raw.where, exc_info=True)
            prepared.append(PreparedTask(raw.where, error=f"{raw.where}: invalid task ({type(exc).__name__}: {exc})"))
    return prepared
