"""A batch job from start to end: read, validate, resume, run (here or on Ray), record, summarise."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from host.batch.commit import Committer
from host.batch.embedded import run_embedded
from host.batch.inputs import Row, Template, read_rows
from host.batch.manifest import Manifest
from host.batch.plan import order_items, plan_resume, prepare_rows
from host.batch.progress import BatchCounts, BatchProgress
from host.session import Session

log = logging.getLogger(__name__)


@dataclass
class BatchOptions:
    """How to run a batch file (the command line's --set, --template, --manifest, --retry-failed, --ray, --workers)."""

    defaults: dict[str, Any] = field(default_factory=dict)  # under every row
    text_defaults: frozenset[str] = frozenset()  # the defaults given as text (--set), typed per model
    template: str | None = None
    manifest: Path | None = None  # default: <output folder>/<batch file stem>.manifest.jsonl
    retry_failed: bool = False
    ray: str | None = None  # None: this process; else auto, local, host:port or ray://...
    workers: int | None = None
    chunk_size: int = 2


def run_batch(session: Session, source: Path, options: BatchOptions, output_dir: Path | None = None,
              out: TextIO | None = None, err: TextIO | None = None) -> BatchCounts:
    """Run the batch file `source`. Raises SettingsError (nothing run) when the file, the template or the
    output folder is unusable; a bad row is reported and the others run."""
    out, err = out or sys.stdout, err or sys.stderr
    folder = session.check_destination(output_dir)  # also removes a killed run's temporary files
    template = Template.parse(options.template) if options.template else None
    rows = read_rows(source, options.defaults, template, options.text_defaults)
    items, invalid = prepare_rows(session, rows, template.fields if template else ())
    report_invalid(invalid, err)
    counts = BatchCounts(total_rows=len(rows), invalid=len(invalid))
    with Manifest(options.manifest or folder / f"{Path(source).stem}.manifest.jsonl") as manifest:
        plan = plan_resume(items, manifest.records, manifest.path.parent, folder, options.retry_failed)
        counts.skipped_done, counts.skipped_failed, counts.recovered = len(plan.done), len(plan.failed_before), len(plan.recovered)
        committer = Committer(manifest, folder)
        for item in plan.recovered:
            committer.recover(item)
        to_run = order_items(plan.to_run)
        where = f"on Ray ({options.ray})" if options.ray else "in this process"
        print(f"batch {source}: {len(rows)} row(s), {len(to_run)} task(s) to run {where}; manifest {manifest.path}", file=out)
        progress = BatchProgress(len(to_run), counts, err)
        committer.on_record = progress
        start = time.perf_counter()
        try:
            if options.ray:
                from host.batch.ray_runner import run_on_ray  # Ray is optional: imported only when asked for

                run_on_ray(session.config, to_run, committer.commit, options.ray, options.workers, options.chunk_size)
            else:
                run_embedded(session, to_run, committer.commit)
        finally:
            progress.close()
            counts.elapsed_s = time.perf_counter() - start
    print(counts.summary(), file=out)
    return counts


def report_invalid(rows: Sequence[Row], stream: TextIO) -> None:
    """Every bad row, once: rows with the same problem share a line (`rows.csv lines 3, 7-9: ...`)."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        message = str(row.error)
        groups.setdefault(message.removeprefix(f"{row.where}: "), []).append(row)
    for message, members in groups.items():
        if len(members) == 1:
            print(f"INVALID {members[0].error}", file=stream)
            continue
        source = members[0].where.rsplit(" ", 2)[0]  # "rows.csv" of "rows.csv line 7"
        unit = members[0].where.rsplit(" ", 2)[1]  # line / item
        print(f"INVALID {source} {unit}s {_ranges([r.number for r in members])}: {message}", file=stream)


def _ranges(numbers: Sequence[int]) -> str:
    """[3, 7, 8, 9] -> '3, 7-9'."""
    spans: list[list[int]] = []
    for n in sorted(numbers):
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
