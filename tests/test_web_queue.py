"""The web UI's queue worker and its page handlers, with the toy family (no browser, no torch model)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from host.session import Session
from host.web_queue import ABORTED, DONE, FAILED, GenerationWorker, wait_until_idle
from host.web_render import progress_html, queue_html
from tests.fixtures.host_env import toy_env

pytest.importorskip("gradio", reason="the web UI needs gradio")


class SlowSession(Session):
    """A toy session whose steps wait for the test: `release` lets one step run."""

    def __init__(self, config: Any):
        super().__init__(config)
        self.steps = threading.Semaphore(0)

    def run(self, task: Any, on_step: Any = None) -> Any:
        def slow(event: Any) -> None:
            self.steps.acquire(timeout=10)
            if on_step is not None:
                on_step(event)

        return super().run(task, slow)


def _submit(worker: GenerationWorker, session: Session, **settings: Any) -> Any:
    return worker.submit(session.prepare({"model_type": "toy", **settings}, "test"))


def test_jobs_run_in_order_each_with_its_own_settings_and_are_saved_like_the_cli(tmp_path: Path) -> None:
    session = Session(toy_env(tmp_path))
    worker = GenerationWorker(session)
    first = _submit(worker, session, prompt="first", seed=1)
    second = _submit(worker, session, prompt="second", seed=2, batch_size=2)
    assert wait_until_idle(worker, 20)
    snap = worker.snapshot()
    assert [j.id for j in snap.finished] == [first.id, second.id] and all(j.state == DONE for j in snap.finished)
    assert [r.settings["prompt"] for r in snap.results] == ["first", "second", "second"]
    saved = json.loads(Image.open(snap.results[0].path).info["wgp_settings"])
    assert saved["prompt"] == "first" and saved["seed"] == 1 and saved["generation_info"]["model_name"] == "Toy"
    assert snap.results[0].path.parent == session.config.output_dir
    assert snap.event is not None and snap.event.level == "success" and "seed 2" in snap.event.text
    assert "#1 seed 1 · toy · 32x32" == snap.results[0].caption


def test_a_failing_job_is_reported_and_the_worker_goes_on(tmp_path: Path) -> None:
    session = Session(toy_env(tmp_path))
    worker = GenerationWorker(session, format_error=lambda task, exc: f"formatted {exc}")
    bad = _submit(worker, session, prompt="CRASH")
    good = _submit(worker, session, prompt="fine")
    assert wait_until_idle(worker, 20)
    states = {j.id: j for j in worker.snapshot().finished}
    assert states[bad.id].state == FAILED and "formatted simulated out of memory" in states[bad.id].message
    assert states[good.id].state == DONE


def test_missing_files_fail_the_job_with_the_list(tmp_path: Path) -> None:
    session = Session(toy_env(tmp_path, files=False))
    worker = GenerationWorker(session)
    _submit(worker, session, prompt="x")
    assert wait_until_idle(worker, 20)
    [job] = worker.snapshot().finished
    assert job.state == FAILED and "put it at" in job.message and worker.snapshot().event.level == "error"


def test_abort_stops_within_one_step_and_the_next_job_runs(tmp_path: Path) -> None:
    session = SlowSession(toy_env(tmp_path))
    worker = GenerationWorker(session)
    long = _submit(worker, session, prompt="long", num_inference_steps=50)
    queued = _submit(worker, session, prompt="after", num_inference_steps=2)
    session.steps.release(3)
    deadline = time.monotonic() + 10
    while (worker.snapshot().current is None or worker.snapshot().current.step < 3) and time.monotonic() < deadline:
        time.sleep(0.01)
    running = worker.snapshot()
    assert running.current.id == long.id and "step 3/50" in running.current.progress_text()
    assert "s/it" in progress_html(running) and 'data-step="3"' in progress_html(running)
    assert "after" in queue_html(running) and "queued" in queue_html(running)
    assert worker.abort().startswith("aborting job")
    session.steps.release(100)  # one more step runs, then the callback raises
    assert wait_until_idle(worker, 20)
    finished = {j.id: j for j in worker.snapshot().finished}
    assert finished[long.id].state == ABORTED and finished[long.id].step == 4
    assert finished[queued.id].state == DONE
    assert worker.abort() == "nothing is running"


def test_clear_removes_waiting_jobs_only(tmp_path: Path) -> None:
    session = SlowSession(toy_env(tmp_path))
    worker = GenerationWorker(session)
    _submit(worker, session, prompt="running", num_inference_steps=2)
    _submit(worker, session, prompt="waiting")
    deadline = time.monotonic() + 10
    while worker.snapshot().current is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.clear() == 1
    session.steps.release(10)
    assert wait_until_idle(worker, 20)
    assert [j.state for j in worker.snapshot().finished] == [ABORTED, DONE]


# -- the page's handlers (components replaced by their names) -------------------------------------


@pytest.fixture
def app(tmp_path: Path) -> Any:
    from host.web_events import WebApp
    from host.web_form import FIELD_IDS

    web = WebApp(Session(toy_env(tmp_path)), tmp_path / "settings")
    web.c = {name: name for name in [*FIELD_IDS, "status", "family", "resolution", "page", "size_note"]}
    web.c |= {name: name for name in ("progress", "preview", "gallery", "queue", "settings_drop")}
    return web


def _values(**overrides: Any) -> list[Any]:
    from host.web_form import FIELD_IDS

    form = {"model": "toy", "prompt": "a toy", "width": 32, "height": 32, "steps": 2, "guidance": 0, "seed": 3}
    form |= {"batch_size": 1, "quantization": "bf16", "profile": "auto", "attention": "auto", "output_format": "png"}
    form |= {"loras": [], "loras_multipliers": ""}
    form |= overrides
    return [form.get(f) for f in FIELD_IDS]


def test_generate_validates_first_then_queues_and_the_page_polls_the_result(app: Any) -> None:
    bad = app.on_generate(*_values(steps=0))
    assert (
        "Not queued" in bad["status"]
        and "num_inference_steps must be" in bad["status"]
        and "wgp-error" in bad["status"]
    )
    assert "Choose a model" in app.on_generate(*_values(model=None))["status"]
    page = app.on_tick({})["page"]  # the page opens: nothing old is shown
    snapped = app.on_generate(*_values(width=40))
    assert "Queued job #1" in snapped["status"] and snapped["width"] == 48 and "40 -> 48" in snapped["size_note"]
    assert wait_until_idle(app.worker, 20)
    updates = app.on_tick(page)
    assert len(updates["gallery"]) == 1 and "seed 3" in updates["gallery"][0][1]
    assert "done" in updates["status"] and "idle" in updates["page"]["progress"] and "done" in updates["queue"]
    again = app.on_tick(updates["page"])
    assert set(again) == {"page"}  # nothing changed: nothing re-sent
    fresh = app.on_tick({})  # another page opened later sees none of the earlier images
    assert fresh["gallery"] == [] and fresh["page"]["start"] == 1 and "status" not in fresh


def test_use_settings_of_a_saved_image_and_save_as_defaults(app: Any) -> None:
    app.on_generate(*_values(prompt="remember me", seed=77))
    assert wait_until_idle(app.worker, 20)
    path = app.worker.snapshot().results[0].path
    updates = app._apply_image(path, "toy")
    assert updates["prompt"] == "remember me" and updates["seed"] == 77 and updates["resolution"] == "32x32"
    assert "embedded settings" in updates["status"]
    assert app.on_reuse_seed(str(path))[0] == 77
    saved = app.on_save_defaults(*_values(steps=7))
    assert "Saved as your defaults" in saved
    defaults = app.on_model_input("toy")
    assert defaults["steps"] == 7 and defaults["family"] == "Toy family"
    assert "no effect" in defaults["negative_prompt"]["label"]


def test_out_of_memory_gets_advice_other_errors_their_type(app: Any) -> None:
    task = app.session.prepare({"model_type": "toy"}, "test")
    assert app.format_error(task, RuntimeError("CUDA out of memory (2 GiB)")).startswith("Out of memory")
    assert app.format_error(task, KeyError("x")).startswith("KeyError")
