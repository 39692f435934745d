"""The embedded runner: every task in this process, one session, its model kept loaded between tasks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from host.batch.execute import TaskOutcome, execute, worker_name
from host.batch.plan import BatchItem
from host.session import Session


def run_embedded(session: Session, items: Sequence[BatchItem], commit: Callable[[BatchItem, TaskOutcome], Any]) -> None:
    """Run `items` in order (already grouped by model and LoRAs) and hand each outcome to `commit`."""
    worker = worker_name()
    for item in items:
        commit(item, execute(session, item.spec, item.task, worker))
