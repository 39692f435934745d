"""The driver's side of a finished task: place its files exactly once, then record it in the manifest.

Files are written whole under a hidden temporary name carrying this process id, then hard-linked to
their final name, which fails if the name exists: a task's file is never written twice. If a run was
killed after a file was placed but before its record, the next run finds the file, keeps it and
records it (a killed run's temporary files are removed by host.outputs.remove_stale_temp_files).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from host.batch.execute import TaskOutcome
from host.batch.manifest import DONE, FAILED, Manifest
from host.batch.plan import BatchItem

log = logging.getLogger(__name__)

RecordListener = Callable[[dict[str, Any]], None]


class Committer:
    """Writes each outcome's files into `output_dir` and its record into the manifest, once per task id."""

    def __init__(self, manifest: Manifest, output_dir: Path, on_record: RecordListener | None = None):
        self.manifest = manifest
        self.output_dir = Path(output_dir)
        self.on_record = on_record
        self.committed: set[str] = set()  # ids recorded by this run (a retried task's second result is dropped)

    def commit(self, item: BatchItem, outcome: TaskOutcome) -> dict[str, Any] | None:
        """Place the files and append the record; returns it (None for an id this run already recorded)."""
        if item.spec.id in self.committed:
            log.info("%s: a second result for the same task (a retried worker call) is dropped", item.spec.where)
            return None
        record = self._record(item, outcome.seed, outcome.timings, outcome.worker)
        if outcome.error is not None:
            record.update(status=FAILED, error=outcome.error)
        else:
            paths = [self.output_dir / name for name in item.names(len(outcome.images))]
            record["files"] = [self._file_entry(write_once(path, data)) for path, data in zip(paths, outcome.images, strict=True)]
        return self._append(record)

    def recover(self, item: BatchItem) -> dict[str, Any] | None:
        """Record a task whose files a killed run placed but never recorded (nothing is generated again)."""
        record = self._record(item, item.spec.settings.get("seed"), {}, None)
        record["files"] = [self._file_entry((self.output_dir / name, file_sha256(self.output_dir / name))) for name in item.names()]
        record["recovered"] = True
        return self._append(record)

    def _record(self, item: BatchItem, seed: Any, timings: dict[str, Any], worker: str | None) -> dict[str, Any]:
        return {"id": item.spec.id, "row": item.spec.row, "where": item.spec.where, "status": DONE, "files": [],
                "seed": seed, "timings": timings, "error": None, "worker": worker}

    def _file_entry(self, written: tuple[Path, str]) -> dict[str, str]:
        path, sha = written
        return {"path": os.path.relpath(path, self.manifest.path.parent), "sha256": sha}

    def _append(self, record: dict[str, Any]) -> dict[str, Any]:
        self.manifest.append(record)
        self.committed.add(record["id"])
        if self.on_record is not None:
            self.on_record(record)
        return record


def write_once(path: Path, data: bytes) -> tuple[Path, str]:
    """Place `data` at `path` atomically unless a file is already there (then that file is kept).
    Returns the path and the sha256 of the file that is there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # the pid lets the next run remove it if this one is killed
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())  # the record that follows must never name a file the disk does not hold
        try:
            os.link(tmp, path)  # refuses an existing name: no race, no overwrite
        except FileExistsError:
            log.info("%s exists (placed by an interrupted run): kept", path)
            return path, file_sha256(path)
        except OSError:  # file systems without hard links
            if path.exists():
                return path, file_sha256(path)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path, hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
