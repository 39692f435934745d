"""Batch progress over the whole run (tasks, images/min, ETA) and the summary printed at the end."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from host.batch.manifest import FAILED
from host.progress import format_duration

BAR_WIDTH = 24


@dataclass
class BatchCounts:
    """What a run did: tasks done and failed now, skipped (done or failed earlier), recovered, invalid rows."""

    total_rows: int = 0
    done: int = 0
    failed: int = 0
    skipped_done: int = 0
    skipped_failed: int = 0
    recovered: int = 0
    invalid: int = 0
    images: int = 0
    elapsed_s: float = 0.0

    @property
    def images_per_min(self) -> float:
        return 60.0 * self.images / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def ok(self) -> bool:
        return not (self.failed or self.invalid or self.skipped_failed)

    def summary(self) -> str:
        """One line: `batch: 38 done, 1 failed, ...; 38 images in 0:53 (43.0 images/min)`."""
        parts = [f"{self.done} done", f"{self.failed} failed"]
        if self.skipped_done:
            parts.append(f"{self.skipped_done} skipped (done earlier)")
        if self.skipped_failed:
            parts.append(f"{self.skipped_failed} skipped (failed earlier; --retry-failed runs them)")
        if self.recovered:
            parts.append(f"{self.recovered} recovered (files of an interrupted run)")
        if self.invalid:
            parts.append(f"{self.invalid} invalid row(s)")
        rate = f"{self.images} image(s) in {format_duration(self.elapsed_s)} ({self.images_per_min:.1f} images/min)"
        return f"batch of {self.total_rows} row(s): {', '.join(parts)}; {rate}"


class BatchProgress:
    """`batch [#####.....] 12/40 | 1 failed | 45.2 images/min | ETA 0:31`, redrawn after each task."""

    def __init__(self, total: int, counts: BatchCounts, stream: TextIO | None = None, clock: Callable[[], float] = time.perf_counter):
        self.total = total
        self.counts = counts
        self.stream = stream or sys.stderr
        self.clock = clock
        self.start = clock()
        self.finished = 0
        self.drawn = False

    def __call__(self, record: Mapping[str, Any]) -> None:
        """Record listener: count the task and redraw."""
        self.finished += 1
        if record.get("status") == FAILED:
            self.counts.failed += 1
            error, where = str(record.get("error")), str(record.get("where"))
            self._write(f"FAILED {error}" if error.startswith(where) else f"FAILED {where}: {error}")
        else:
            self.counts.done += 1
            self.counts.images += len(record.get("files") or [])
        self.counts.elapsed_s = self.clock() - self.start
        self._draw()

    def line(self) -> str:
        finished, total = self.finished, max(self.total, 1)
        filled = int(BAR_WIDTH * finished / total)
        eta = format_duration(self.counts.elapsed_s / finished * (self.total - finished)) if finished else "?"
        failed = f" | {self.counts.failed} failed" if self.counts.failed else ""
        return (f"batch [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {finished}/{self.total}{failed} | "
                f"{self.counts.images_per_min:.1f} images/min | ETA {eta}")

    def close(self) -> None:
        """End a bar left half-drawn on a terminal."""
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False

    def _draw(self) -> None:
        if self.stream.isatty():
            self.stream.write("\r" + self.line())
            self.drawn = True
        else:
            self.stream.write(self.line() + "\n")  # logs and pipes: one line per task
        self.stream.flush()

    def _write(self, text: str) -> None:
        """A line of its own, below a bar drawn in place."""
        if self.drawn:
            self.stream.write("\n")
            self.drawn = False
        self.stream.write(text + "\n")
        self.stream.flush()
