"""The web UI's generation queue: one worker thread owns the session and runs queued tasks one by one.

A session holds one loaded model and is not thread-safe, so only the worker calls `run` (once per job:
files, model, generation, saving; the page's handlers only validate with `prepare`, which reads presets).
The page polls `snapshot()`; nothing a task does (bad files, out of memory, abort) stops the worker.
Every job belongs to the page (browser tab) that queued it, its `owner`: a page's status line, gallery,
preview, Abort and Clear concern its own jobs, while the queue table lists everyone's.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from common.errors import GenerationCancelled, UserInputError
from common.sampling import get_sigmas
from host.progress import format_duration
from host.session import Destination, Phase, Session, Task
from host.web.preview import LatentPreviewer, preview_interval

log = logging.getLogger(__name__)

QUEUED, FILES, LOADING, RUNNING, SAVING, DONE, FAILED, ABORTED = (
    "queued",
    "checking files",
    "loading model",
    "generating",
    "saving",
    "done",
    "failed",
    "aborted",
)
FINISHED = (DONE, FAILED, ABORTED)


@dataclass
class Job:
    """One queued task with its own settings (a snapshot taken when Generate was pressed)."""

    id: int
    task: Task
    state: str = QUEUED
    message: str = ""
    step: int = 0
    total: int = 0
    elapsed_s: float = 0.0
    paths: list[Path] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)  # as used (seed resolved), once done
    lora_reports: list[str] = field(default_factory=list)
    owner: str = ""  # the page (browser tab) that queued it; "" for callers that have no pages

    @property
    def s_per_it(self) -> float | None:
        return self.elapsed_s / self.step if self.step else None

    @property
    def eta_s(self) -> float | None:
        per_it = self.s_per_it
        return None if per_it is None else per_it * (self.total - self.step)

    def progress_text(self) -> str:
        """'step 3/8 · 0.52 s/it · ETA 0:03' (or the phase while there are no steps yet)."""
        if self.state != RUNNING or not self.step:
            return self.state
        per_it, eta = self.s_per_it or 0.0, format_duration(self.eta_s or 0.0)
        return f"step {self.step}/{self.total} · {per_it:.2f} s/it · ETA {eta}"


@dataclass
class GalleryItem:
    """One saved image with the settings that made it."""

    path: Path
    settings: dict[str, Any]
    job_id: int
    owner: str = ""

    @property
    def caption(self) -> str:
        s = self.settings
        return f"#{self.job_id} seed {s.get('seed')} · {s.get('model_type')} · {s.get('resolution')}"


@dataclass
class Event:
    """A line for the page's status area: what happened to which job."""

    version: int
    text: str
    level: str = "info"  # info, success, error


@dataclass
class Snapshot:
    """What the page shows; copied under the lock so the page never sees a half-updated job."""

    current: Job | None
    pending: list[Job]
    finished: list[Job]
    results: list[GalleryItem]
    event: Event | None  # the latest event of any page
    preview: Image.Image | None
    preview_version: int
    events: dict[str, Event] = field(default_factory=dict)  # owner -> the latest event of that page's jobs
    preview_owner: str = ""

    def event_of(self, owner: str) -> Event | None:
        return self.events.get(owner)


ErrorFormatter = Callable[[Task, BaseException], str]


class GenerationWorker:
    """FIFO of jobs run by one daemon thread; `abort()` stops the current job within one step."""

    def __init__(self, session: Session, format_error: ErrorFormatter | None = None, output_dir: Path | None = None):
        self.session = session
        self.output_dir = output_dir
        self.format_error = format_error or (lambda task, exc: f"{type(exc).__name__}: {exc}")
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: deque[Job] = deque()
        self._finished: list[Job] = []
        self._results: list[GalleryItem] = []
        self._current: Job | None = None
        self._cancel = threading.Event()
        self._ids = itertools.count(1)
        self._event: Event | None = None
        self._events: dict[str, Event] = {}
        self._preview_owner = ""
        self._event_versions = itertools.count(1)
        self._preview: Image.Image | None = None
        self._preview_version = 0
        self._thread = threading.Thread(target=self._loop, name="wgp-generation", daemon=True)
        self._thread.start()

    # -- called by the page ---------------------------------------------------------------------

    def submit(self, task: Task, owner: str = "", notes: Sequence[str] = ()) -> Job:
        """Queue a validated task for the page `owner`; returns its job.

        "Queued job #N ..." (then `notes`) is the job's first event, so the page's status shows it through the
        same poll as what follows, in order: a job that fails at once (missing files) cannot have its failure
        overwritten by the queued line arriving late."""
        with self._wake:
            job = Job(next(self._ids), task, owner=owner)
            ahead = len(self._pending) + (self._current is not None)
            self._pending.append(job)
            text = f"Queued job #{job.id} ({task.model_type}, {task.settings.get('resolution', '')})"
            text += f", {ahead} ahead of it." if ahead else "."
            self._event = self._events[owner] = Event(next(self._event_versions), " ".join([text, *notes]))
            self._wake.notify()
        return job

    def abort(self, owner: str | None = None) -> str:
        """Stop the running job at its next step (queued jobs stay queued); with `owner`, only its own job."""
        with self._lock:
            if self._current is None:
                return "nothing is running"
            if owner is not None and self._current.owner != owner:
                return f"job #{self._current.id} was queued in another tab: only that tab can abort it"
            self._cancel.set()
            return f"aborting job #{self._current.id}…"

    def clear(self, owner: str | None = None) -> int:
        """Drop the jobs that have not started (with `owner`, only its own); returns how many."""
        with self._lock:
            removed = [job for job in self._pending if owner is None or job.owner == owner]
            for job in removed:
                job.state, job.message = ABORTED, "removed from the queue"
                self._pending.remove(job)
                self._finished.append(job)
            return len(removed)

    def snapshot(self) -> Snapshot:
        with self._lock:
            return Snapshot(
                current=_copy_job(self._current) if self._current else None,
                pending=[_copy_job(j) for j in self._pending],
                finished=[_copy_job(j) for j in self._finished[-50:]],
                results=list(self._results),
                event=self._event,
                preview=self._preview,
                preview_version=self._preview_version,
                events=dict(self._events),
                preview_owner=self._preview_owner,
            )

    def idle(self) -> bool:
        with self._lock:
            return self._current is None and not self._pending

    # -- the worker thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._pending:
                    self._wake.wait()
                job = self._pending.popleft()
                self._current = job
                self._cancel.clear()
            try:
                self._run(job)
            except GenerationCancelled:
                self._finish(job, ABORTED, f"job #{job.id} aborted at step {job.step}/{job.total or '?'}", "info")
            except UserInputError as exc:
                self._finish(job, FAILED, f"job #{job.id} failed: {exc}", "error")
            except Exception as exc:  # noqa: BLE001 - out of memory, a bug: this job fails, the worker goes on
                log.warning("job #%s failed", job.id, exc_info=True)
                self._finish(job, FAILED, f"job #{job.id} failed: {self.format_error(job.task, exc)}", "error")

    def _run(self, job: Job) -> None:
        """One `Session.run` (files, model, LoRAs, generation, saving); its phases set the job's state."""
        result = self.session.run(
            job.task, on_step=self._step_callback(job), on_phase=self._phase_callback(job), save_to=Destination(self.output_dir)
        )
        paths = result.paths
        with self._lock:
            job.paths, job.settings = list(paths), dict(result.settings)
            self._results.extend(GalleryItem(p, dict(result.settings), job.id, job.owner) for p in paths)
        took = result.info.get("timings", {}).get("denoise_s")
        timing = f" in {took:.2f} s" if took is not None else ""
        loras = "".join(f"\n{line}" for line in job.lora_reports)
        done = f"job #{job.id} done{timing}: {len(paths)} image(s), seed {result.settings['seed']}{loras}"
        self._finish(job, DONE, done, "success")

    def _phase_callback(self, job: Job) -> Callable[[Phase], None]:
        """The job's state and status line from the session's phases; Abort takes effect between them too."""

        def on_phase(phase: Phase) -> None:
            self._check_cancel()
            if phase.name == "files":
                self._set(job, FILES, f"job #{job.id}: checking model files (downloading what is missing)…")
            elif phase.name == "load":
                self._set(job, LOADING, f"job #{job.id}: loading {job.task.preset.name}…")
            elif phase.name == "loaded":
                job.lora_reports = [report.summary() for report in phase.detail["lora_reports"]]
                loras = "".join(f"\n{line}" for line in job.lora_reports)
                load_s = phase.detail["load_s"]
                loaded = f"model loaded in {load_s:.1f} s; " if load_s is not None else ""
                self._set(job, RUNNING, f"job #{job.id}: {loaded}generating…{loras}")
            elif phase.name == "decode":
                self._set(job, RUNNING, f"job #{job.id}: decoding…")
            elif phase.name == "save":
                self._set(job, SAVING, f"job #{job.id}: saving…")

        return on_phase

    def _step_callback(self, job: Job) -> Callable[[Any], None]:
        """Progress + preview every few steps; raises GenerationCancelled when Abort was pressed."""
        settings = job.task.settings
        total = int(settings.get("num_inference_steps", 0)) or None
        shift = settings.get("flow_shift")
        sigmas = get_sigmas(total, float(shift)).tolist() if total and shift else None
        previewer = LatentPreviewer(sigmas, job.task.preset.facts.latent)  # the family's latent format

        def on_step(event: Any) -> None:
            with self._lock:
                job.step, job.total, job.elapsed_s = event.step, event.total, event.elapsed_s
            latents = getattr(event, "latents", None)
            if latents is not None:
                if event.step % preview_interval(event.total) == 0 or event.step == event.total:
                    self._set_preview(previewer.image(event.step, latents), job.owner)
                previewer.observe(event.step, latents)
            self._check_cancel()

        return on_step

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise GenerationCancelled("aborted by the user")

    def _set(self, job: Job, state: str, text: str) -> None:
        with self._lock:
            job.state = state
            self._event = self._events[job.owner] = Event(next(self._event_versions), text)

    def _set_preview(self, image: Image.Image | None, owner: str = "") -> None:
        if image is None:
            return
        with self._lock:
            self._preview, self._preview_version = image, self._preview_version + 1
            self._preview_owner = owner

    def _finish(self, job: Job, state: str, text: str, level: str) -> None:
        with self._lock:
            job.state, job.message = state, text
            self._finished.append(job)
            self._current = None
            self._cancel.clear()
            self._event = self._events[job.owner] = Event(next(self._event_versions), text, level)


def _copy_job(job: Job) -> Job:
    return Job(
        job.id,
        job.task,
        job.state,
        job.message,
        job.step,
        job.total,
        job.elapsed_s,
        list(job.paths),
        dict(job.settings),
        list(job.lora_reports),
        job.owner,
    )


def wait_until_idle(worker: GenerationWorker, timeout_s: float) -> bool:
    """For tests and scripts: wait until the queue is empty and nothing runs."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if worker.idle():
            return True
        time.sleep(0.05)
    return worker.idle()
