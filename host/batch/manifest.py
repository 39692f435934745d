"""The output manifest of a batch: one JSON line per finished task, appended atomically.

A record: `id` (row number + hash of the final settings), `row`, `where`, `status` (done or failed),
`files` (path relative to the manifest's folder, sha256), `seed`, `timings`, `error`, `worker`, `finished`.
The last record of an id is its state. Each line goes out in one `write` on an O_APPEND descriptor and
is fsynced: a killed process leaves whole lines, and a torn last line (power loss mid-write) is cut off
when the manifest is next opened. One run at a time holds the manifest (an advisory lock the kernel
drops with the process, also on kill -9).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common.errors import SettingsError

log = logging.getLogger(__name__)

DONE, FAILED = "done", "failed"


class Manifest:
    """An open, locked manifest file. Use as a context manager, or call `close`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise SettingsError(
                f"{self.path}: another run of this batch is using this manifest; wait for it to finish, or give --manifest another file"
            ) from None
        self._cut_torn_line()
        self.records = self._read()  # id -> its last record

    def __enter__(self) -> Manifest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # also releases the lock
            self._fd = -1

    def append(self, record: Mapping[str, Any]) -> None:
        """Write one record as one line (one write call) and make it durable before returning."""
        record = {**record, "finished": record.get("finished") or _now()}
        data = (json.dumps(record, ensure_ascii=True, separators=(",", ":")) + "\n").encode()
        written = os.write(self._fd, data)
        while written < len(data):  # regular files take it all at once; a short write is finished, never interleaved
            written += os.write(self._fd, data[written:])
        os.fsync(self._fd)
        self.records[record["id"]] = dict(record)

    def _cut_torn_line(self) -> None:
        """A last line without its newline is a record whose write never finished: remove it."""
        size = os.fstat(self._fd).st_size
        if size == 0:
            return
        with open(self.path, "rb") as fh:
            fh.seek(max(0, size - 1))
            if fh.read(1) == b"\n":
                return
            fh.seek(0)
            keep = fh.read().rfind(b"\n") + 1
        log.warning("%s: removed an unfinished last line (%d bytes) left by an interrupted run", self.path, size - keep)
        os.ftruncate(self._fd, keep)

    def _read(self) -> dict[str, dict[str, Any]]:
        records: dict[str, dict[str, Any]] = {}
        with open(self.path, encoding="utf-8", errors="replace") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    log.warning("%s line %d: not a manifest record, ignored", self.path, number)
                    continue
                if isinstance(record, dict) and isinstance(record.get("id"), str):
                    records[record["id"]] = record
        return records


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
