"""One batch task on whatever runs it (this process or a Ray actor): settings in, encoded image files out.

The same function runs everywhere, so a task gives the same file content (pixels and embedded settings,
timings aside) alone, in a batch or on any worker. Nothing is written here: the driver places the files
and records them (host/batch/commit.py), which is what lets workers run without a shared disk.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from common.errors import GenerationCancelled, UserInputError
from host.outputs import encode_image
from host.session import Session, Task

log = logging.getLogger(__name__)


@dataclass
class TaskSpec:
    """What a worker needs for one task: its id, where it came from and its final settings (seed resolved)."""

    id: str
    row: int
    where: str
    settings: dict[str, Any]


@dataclass
class TaskOutcome:
    """The encoded files of a task (in image order), or the error that stopped it."""

    id: str
    images: list[bytes] = field(default_factory=list)
    seed: int | None = None
    timings: dict[str, float | None] = field(default_factory=dict)
    error: str | None = None
    worker: str = ""


def worker_name() -> str:
    """`host:pid`, recorded with each task so a manifest says where it ran."""
    return f"{socket.gethostname()}:{os.getpid()}"


def execute(session: Session, spec: TaskSpec, task: Task | None = None, worker: str | None = None) -> TaskOutcome:
    """Run one task on `session` (its model stays loaded for the next) and encode its images.

    `task` is the already validated task when the caller has it (this process); a worker validates
    `spec.settings` again with its own session (its own presets, files and LoRA folders). A failure of
    any kind becomes the outcome's error; only KeyboardInterrupt goes through.
    """
    start = time.perf_counter()
    outcome = TaskOutcome(spec.id, worker=worker or worker_name())
    try:
        task = task or session.prepare(spec.settings, spec.where)
        result = session.run(task)
        info = {**result.info, "batch": {"task_id": spec.id, "row": spec.row, "source": spec.where}}
        fmt = result.settings["output_format"]
        for index, image in enumerate(result.images):
            image_info = {**info, "batch_index": index} if len(result.images) > 1 else info
            outcome.images.append(encode_image(image, result.settings, image_info, fmt))
        outcome.seed = int(result.settings["seed"])
        outcome.timings = {**result.info.get("timings", {}), "load_s": None if result.load_s is None else round(result.load_s, 4)}
    except (UserInputError, GenerationCancelled) as exc:
        outcome.error = str(exc)
    except Exception as exc:  # noqa: BLE001 - out of memory, a broken file, a bug: this task fails, the batch goes on
        log.debug("task %s failed", spec.where, exc_info=True)
        outcome.error = f"{type(exc).__name__}: {exc}"
    if outcome.error is not None:
        outcome.images = []  # all of a task's files or none
    outcome.timings["total_s"] = round(time.perf_counter() - start, 4)
    return outcome
