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
from host.web.queue import ABORTED, DONE, FAILED, GenerationWorker, wait_until_idle
from host.web.render import progress_html, queue_html
from tests.fixtures.host_env import TOY_FAMILY, toy_env

pytest.importorskip("gradio", reason="the web UI needs gradio")


class SlowSession(Session):
    """A toy session whose steps wait for the test: `release` lets one step run."""

    def __init__(self, config: Any):
        super().__init__(config)
        self.steps = threading.Semaphore(0)

    def run(self, task: Any, on_step: Any = None, **kwargs: Any) -> Any:
        def slow(event: Any) -> None:
            self.steps.acquire(timeout=10)
            if on_step is not None:
                on_step(event)

        return super().run(task, slow, **kwargs)


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
    return _web_app(Session(toy_env(tmp_path)), tmp_path)


def _web_app(session: Session, tmp_path: Path) -> Any:
    from host.web.events import WebApp

    web = WebApp(session, tmp_path / "settings")
    web.c = {name: name for name in [*web.field_ids, "status", "family", "resolution", "page", "size_note"]}
    web.c |= {name: name for name in ("progress", "preview", "gallery", "queue", "settings_drop")}
    return web


def _values(**overrides: Any) -> list[Any]:
    """The form's values in field order (the toy family's form, from its schema and the host's)."""
    from host.registry import discover
    from host.web.form import form_fields

    form = {"model": "toy", "prompt": "a toy", "width": 32, "height": 32, "steps": 2, "guidance": 0, "seed": 3}
    form |= {"batch_size": 1, "quantization": "bf16", "profile": "auto", "attention": "auto", "output_format": "png"}
    form |= {"loras": [], "loras_multipliers": ""}
    form |= overrides
    return [form.get(f.id) for f in form_fields(discover(TOY_FAMILY.parent))]


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
    assert snapped["width"] == 48 and "40 -> 48" in snapped["size_note"]
    assert "status" not in snapped  # a queued job's status line comes from the poll only
    assert wait_until_idle(app.worker, 20)
    updates = app.on_tick(page)
    assert len(updates["gallery"]) == 1 and "seed 3" in updates["gallery"][0][1]
    assert "done" in updates["status"] and "idle" in updates["page"]["progress"] and "done" in updates["queue"]
    again = app.on_tick(updates["page"])
    assert set(again) == {"page"}  # nothing changed: nothing re-sent
    fresh = app.on_tick({})  # another page opened later sees none of the earlier images
    assert fresh["gallery"] == [] and fresh["page"]["start"] == 1 and "status" not in fresh


def test_the_queued_line_is_the_jobs_first_event_and_never_hides_a_quick_failure(tmp_path: Path) -> None:
    """A job that fails at once (its files are missing) used to lose its failure in the page: the poll showed it,
    then Generate's reply, "Queued job #1", arrived and overwrote it, and the poll had nothing newer to show."""
    session = SlowSession(toy_env(tmp_path))
    worker = GenerationWorker(session)
    worker.submit(session.prepare({"model_type": "toy", "num_inference_steps": 2}, "test"), "tab-a")
    deadline = time.monotonic() + 10
    while worker.snapshot().current is None and time.monotonic() < deadline:
        time.sleep(0.01)
    worker.submit(session.prepare({"model_type": "toy"}, "test"), "tab-a", ["size rounded"])
    queued = worker.snapshot().event_of("tab-a")
    assert queued.text == "Queued job #2 (toy, 32x32), 1 ahead of it. size rounded" and queued.level == "info"
    session.steps.release(10)
    assert wait_until_idle(worker, 20)
    assert worker.snapshot().event_of("tab-a").version > queued.version

    app = _web_app(Session(toy_env(tmp_path / "missing", files=False)), tmp_path)
    page = app.on_tick({})["page"]
    first = app.on_tick(page)  # the poll may run before Generate's reply has reached the page...
    reply = app.on_generate(*_values())
    assert wait_until_idle(app.worker, 20)
    shown = app.on_tick(first["page"])
    assert "status" not in reply  # ...so the reply carries no status line that could land after the failure
    assert "failed" in shown["status"] and "put it at" in shown["status"] and "wgp-error" in shown["status"]


def test_use_settings_of_a_saved_image_and_save_as_defaults(app: Any) -> None:
    app.on_generate(*_values(prompt="remember me", seed=77))
    assert wait_until_idle(app.worker, 20)
    path = app.worker.snapshot().results[0].path
    updates = app._apply_image(path, "toy")
    shown = {name: update["value"] for name, update in updates.items() if isinstance(update, dict) and "value" in update}
    assert shown["prompt"] == "remember me" and shown["seed"] == 77 and shown["resolution"] == "32x32"
    assert "embedded settings" in updates["status"]
    assert app.on_reuse_seed(str(path))[0] == 77
    saved = app.on_save_defaults(*_values(steps=7))
    assert "Saved as your defaults" in saved
    defaults = app.on_model_input("toy")
    assert defaults["steps"]["value"] == 7 and defaults["family"] == "Toy family"
    # the negative prompt follows the rule the toy family declares (active_when guidance_scale > 0)
    assert "no effect" in app.on_activity("negative_prompt", {"guidance_scale": 0.0})["label"]
    assert "active" in app.on_activity("negative_prompt", {"guidance_scale": 2.0})["label"]


def test_out_of_memory_gets_advice_other_errors_their_type(app: Any) -> None:
    task = app.session.prepare({"model_type": "toy"}, "test")
    assert app.format_error(task, RuntimeError("CUDA out of memory (2 GiB)")).startswith("Out of memory")
    assert app.format_error(task, KeyError("x")).startswith("KeyError")


# -- issue 9 item 8: tabs, dropped files, LoRA sets, the model picker ----------------------------


class Tab:
    """What Gradio passes as gr.Request: its session hash names the browser tab."""

    def __init__(self, session_hash: str):
        self.session_hash = session_hash


def test_each_tab_sees_its_own_jobs_and_the_queue_table_shows_all(app: Any) -> None:
    a, b = Tab("tab-a"), Tab("tab-b")
    page_a, page_b = app.on_tick({}, a)["page"], app.on_tick({}, b)["page"]
    app.on_generate_in_tab(b, *_values(prompt="from b", seed=5))
    assert wait_until_idle(app.worker, 20)
    seen_a, seen_b = app.on_tick(page_a, a), app.on_tick(page_b, b)
    assert "gallery" not in seen_a and "status" not in seen_a  # tab b's job is not shown as tab a's
    assert "#1 (other tab)" in seen_a["queue"] and "#1 (this tab)" in seen_b["queue"]
    assert len(seen_b["gallery"]) == 1 and "seed 5" in seen_b["gallery"][0][1] and "done" in seen_b["status"]
    app.on_generate_in_tab(a, *_values(prompt="from a", seed=6))
    assert wait_until_idle(app.worker, 20)
    seen_a, seen_b = app.on_tick(seen_a["page"], a), app.on_tick(seen_b["page"], b)
    assert [caption for _, caption in seen_a["gallery"]] == ["#2 seed 6 · toy · 32x32"] and "seed 6" in seen_a["status"]
    assert "gallery" not in seen_b and "status" not in seen_b
    assert app.on_reuse_seed(None, a)[0] == 6 and app.on_reuse_seed(None, b)[0] == 5


def test_a_tab_cannot_abort_or_clear_another_tabs_jobs(tmp_path: Path) -> None:
    session = SlowSession(toy_env(tmp_path))
    worker = GenerationWorker(session)
    running = worker.submit(session.prepare({"model_type": "toy", "num_inference_steps": 3}, "t"), owner="b")
    worker.submit(session.prepare({"model_type": "toy"}, "t"), owner="b")
    worker.submit(session.prepare({"model_type": "toy"}, "t"), owner="a")
    deadline = time.monotonic() + 10
    while worker.snapshot().current is None and time.monotonic() < deadline:
        time.sleep(0.01)
    snap = worker.snapshot()
    assert "busy with job #1 from another tab; 1 of your job(s) waiting" in progress_html(snap, 0, "a")
    assert "job #1:" in progress_html(snap, 0, "b")
    assert "another tab" in worker.abort("a") and worker.clear("a") == 1
    session.steps.release(100)
    assert wait_until_idle(worker, 20)
    states = {j.id: j.state for j in worker.snapshot().finished}
    assert states == {1: DONE, 2: DONE, 3: ABORTED} and running.owner == "b"


def _png(chunks: list[tuple[bytes, bytes]], width: int = 8, height: int = 8, bad_crc: bytes = b"") -> bytes:
    """A PNG built chunk by chunk (IHDR of the given size, the given chunks, IEND); `bad_crc` names a
    chunk whose checksum is wrong."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) ^ (0xFFFFFFFF if kind == bad_crc else 0)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1)
    body = [chunk(b"IHDR", ihdr), *(chunk(k, d) for k, d in chunks), chunk(b"IDAT", idat), chunk(b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(body)


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("notes.txt", b"just some text\n", "not a readable image"),
        ("fake.png", b"not a png at all", "not a readable image"),
        ("bomb.png", _png([], width=100_000, height=100_000), "too many pixels"),
        ("broken.png", _png([(b"tEXt", b"parameters\0hello")], bad_crc=b"tEXt"), "not a readable image"),
        ("inflating.png", _png([(b"zTXt", b"parameters\0\0" + __import__("zlib").compress(b"a" * 50_000_000))]), ""),
    ],
    ids=["text", "fake-png", "bomb", "bad-crc", "inflating-text"],
)
def test_a_dropped_file_that_is_not_our_image_gets_one_line_and_the_drop_area_resets(
    app: Any, tmp_path: Path, name: str, content: bytes, reason: str
) -> None:
    path = tmp_path / "gradio-temp-folder" / name
    path.parent.mkdir()
    path.write_bytes(content)
    updates = app.on_drop(str(path), "toy")
    assert updates["settings_drop"] is None  # emptied, ready for the next file
    text = updates["status"]
    assert "wgp-error" in text and "No settings taken" in text and name in text and reason in text
    assert "\n" not in text and "Traceback" not in text and str(path.parent) not in text and len(text) < 500
    assert "prompt" not in updates  # the form is untouched


def test_load_set_reads_only_sets_in_the_lora_folders(tmp_path: Path) -> None:
    import argparse

    from host.web.events import WebApp

    config = toy_env(tmp_path)
    config.lora_args = argparse.Namespace(lora_dir_toy=tmp_path / "loras" / "toy", loras=tmp_path / "loras")
    (tmp_path / "loras" / "toy").mkdir(parents=True)
    (tmp_path / "loras" / "toy" / "mine.lset").write_text(json.dumps({"loras": [], "prompt": "from my set"}))
    outside = tmp_path / "elsewhere" / "secret.lset"
    outside.parent.mkdir()
    outside.write_text(json.dumps({"loras": [], "prompt": "a secret"}))
    web = WebApp(Session(config), tmp_path / "settings")
    web.c = {}
    assert web.on_lset_load("toy", "mine")[2] == "from my set"
    for name in (str(outside), "~/secret.lset", "../../elsewhere/secret", str(outside.with_suffix(""))):
        loras, mult, prompt, status = web.on_lset_load("toy", name)
        assert "wgp-error" in status and "a secret" not in str(prompt), name
    assert "only sets in the LoRA folders" in web.on_lset_load("toy", str(outside))[3]


def test_the_model_picker_takes_only_models(tmp_path: Path) -> None:
    import gradio as gr

    from host.web import build_app

    demo = build_app(Session(toy_env(tmp_path)), tmp_path / "settings")
    [picker] = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "model"]
    assert picker.preprocess("toy") == "toy"
    with pytest.raises(gr.Error, match="not in the list of choices"):
        picker.preprocess("not a model")
