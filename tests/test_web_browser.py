"""The web UI in a real browser: `python wgp.py` launched on a free localhost port with the self-test model
(tiny random weights written under a temporary checkpoint folder), driven by Playwright in Debian's Chromium.

Skipped, with the reason, only when Chromium is not installed (`make test` installs it as root).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from host.registry import REPO_ROOT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    WHY = "chromium is not installed (apt-get install chromium; `make test` does it as root or with sudo)"
    if os.environ.get("WGP_REQUIRE_BROWSER") == "1":  # CI (.ci/run): the browser tests must run, not skip
        pytest.fail(WHY, pytrace=False)
    pytest.skip(WHY, allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
expect = sync_api.expect
expect.set_options(timeout=45_000)  # 2 CPU cores shared with other test runs: be patient, not flaky

BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-gpu",
    "--disable-component-update",
    "--no-first-run",
]
STABLE_IDS = (
    "model prompt negative_prompt resolution width height steps guidance seed batch_size loras loras_multipliers "
    "generate abort progress preview gallery status"
).split()
SCREENSHOT = REPO_ROOT / "docs" / "screenshot.png"
START_TIMEOUT_S = 90
RUN_TIMEOUT_MS = 150_000  # a full run on a 2-core machine 3-4x slower than usual (measured 2026-12-02) still fits


@dataclass
class Server:
    url: str
    ckpts: Path
    outputs: Path
    loras: Path
    log: Path
    process: subprocess.Popen | None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the web UI exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"the web UI did not start in {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def _write_tiny_lora(folder: Path) -> None:
    """A rank-4 LoRA (ai-toolkit keys) for the self-test transformer, in the family's LoRA folder."""
    from lora_fixtures import DIALECTS, random_lora, tiny_model
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(DIALECTS["ai-toolkit"](random_lora(tiny_model())), str(folder / "tiny_style.safetensors"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`python wgp.py` as a user starts it, pointed at temporary folders, offline, on the CPU."""
    root = tmp_path_factory.mktemp("web")
    ckpts, outputs, loras, finetunes = root / "ckpts", root / "outputs", root / "loras", root / "finetunes"
    finetunes.mkdir()
    _write_tiny_lora(loras / "z_image")
    args = ["--ckpts", str(ckpts), "--output-dir", str(outputs), "--loras", str(loras), "--finetunes-dir", str(finetunes)]
    yield from _serve(root, args, Server("", ckpts, outputs, loras, root / "server.log", None))


def _serve(root: Path, args: list[str], server: Server) -> Iterator[Server]:
    """Run `python wgp.py <args>` (offline, CPU, its own settings folder) on a free port until the module ends."""
    port = _free_port()
    args = [sys.executable, "wgp.py", "--server-port", str(port), *args, "--settings-dir", str(root / "settings")]
    args += ["--offline", "--device", "cpu"]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "NO_PROXY": "127.0.0.1,localhost"}
    with open(server.log, "w") as log_file:
        process = subprocess.Popen(args, cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_for_port(port, process, server.log)
        server.url, server.process = f"http://127.0.0.1:{port}/", process
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        yield instance
        instance.close()


@pytest.fixture
def page(browser: object, server: Server) -> Iterator[object]:
    """A fresh page (a fresh gallery: it shows the images made since the page opened)."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    tab = context.new_page()
    tab.goto(server.url)
    tab.wait_for_selector("#generate")
    expect(tab.locator("#prompt textarea")).not_to_have_value("")  # the preset's defaults are in
    yield tab
    context.close()


def choose(page: object, elem_id: str, label_part: str) -> None:
    """Pick a dropdown option by (part of) its label, as a user does."""
    page.click(f"#{elem_id} input")
    page.click(f"#{elem_id} li[role=option][aria-label*='{label_part}']")


def use_selftest(page: object) -> None:
    choose(page, "model", "self-test")
    expect(page.locator("#width input")).to_have_value("64")
    expect(page.locator("#model_info")).to_contain_text("Self-test model")


def set_field(page: object, elem_id: str, value: str) -> None:
    selector = f"#{elem_id} :is(textarea, input)"
    page.fill(selector, value)
    page.press(selector, "Tab")


def gallery_count(page: object) -> int:
    return page.locator("#gallery img").count()


# Gradio lays an elapsed-time line ("0.1s") over an output while an event that updates it runs (the page's
# polling timer updates the status every half second, so on a busy machine the line is often there).
GRADIO_TIMER = re.compile(r"^\s*\d+(\.\d+)?s\s*$", re.M)


def wait_status(page: object, text: str, timeout_ms: int = RUN_TIMEOUT_MS) -> str:
    """The status line's text once it shows `text`, without Gradio's elapsed-time line."""
    expect(page.locator("#status")).to_contain_text(text, timeout=timeout_ms)
    return GRADIO_TIMER.sub("", page.inner_text("#status")).strip()


def saved(server: Server, seed: int) -> list[Path]:
    return sorted(server.outputs.glob(f"*_seed{seed}_*.png"))


# -- the tests (module order: the first one checks that nothing has loaded yet) --------------------


def test_page_is_up_before_any_model_loads_with_stable_ids(page: object, server: Server) -> None:
    for elem_id in STABLE_IDS:
        assert page.locator(f"#{elem_id}").count() == 1, f"#{elem_id} is missing"
    assert not (server.ckpts / "z_image_selftest").exists(), "nothing may load before the first generation"
    expect(page.locator("#progress")).to_contain_text("idle")


def test_negative_prompt_is_marked_inactive_on_turbo(page: object) -> None:
    choose(page, "model", "Base")
    expect(page.locator("#steps input")).to_have_value("30")
    choose(page, "model", "Turbo")
    expect(page.locator("#steps input")).to_have_value("8")  # Turbo's defaults have arrived
    negative = page.locator("#negative_prompt")
    expect(negative).to_contain_text("no effect")
    expect(negative).to_have_class(_contains("wgp-inactive"))
    set_field(page, "guidance", "3")  # guidance on: now the negative prompt acts
    expect(negative).to_contain_text("active")
    expect(negative).not_to_have_class(_contains("wgp-inactive"))
    set_field(page, "guidance", "0")  # off again, then NAG on: the negative prompt acts through NAG
    expect(negative).to_have_class(_contains("wgp-inactive"))
    set_field(page, "nag_scale", "3")
    expect(negative).to_contain_text("active: NAG_scale > 1")
    expect(negative).not_to_have_class(_contains("wgp-inactive"))
    set_field(page, "nag_scale", "1")
    expect(negative).to_have_class(_contains("wgp-inactive"))
    choose(page, "model", "Base")
    expect(page.locator("#guidance input")).to_have_value("4")
    expect(negative).not_to_have_class(_contains("wgp-inactive"))


def test_missing_model_files_are_named_with_where_to_put_them(page: object, server: Server) -> None:
    choose(page, "model", "Turbo")
    info = page.locator("#model_info")
    expect(info).to_contain_text("missing")
    text = info.text_content()
    assert "ZImageTurbo_quanto_bf16_int8.safetensors" in text and "huggingface.co/DeepBeepMeep" in text
    assert f"put it at: {server.ckpts}" in text
    page.click("#generate")  # generating anyway fails with the same list, in the page, and the app lives on
    status = wait_status(page, "failed")
    assert "missing" in status and "put it at" in status
    assert page.locator("#status .wgp-error").count() == 1


def test_generate_shows_the_image_and_the_file_carries_the_settings(page: object, server: Server) -> None:
    use_selftest(page)
    set_field(page, "prompt", "a tiny red fox in the snow")
    expect(page.locator("#token_count")).to_contain_text("/ 128 tokens")
    set_field(page, "seed", "1234")
    page.click("#generate")
    expect(page.locator("#gallery img")).to_have_count(1, timeout=RUN_TIMEOUT_MS)
    assert "seed 1234" in wait_status(page, "done")
    [path] = saved(server, 1234)
    settings = json.loads(Image.open(path).info["wgp_settings"])
    assert settings["prompt"] == "a tiny red fox in the snow" and settings["seed"] == 1234
    assert settings["model_type"] == "z_image_selftest" and settings["resolution"] == "64x64"
    assert settings["generation_info"]["files"]["transformer"]["name"] == "ZImageTurbo_bf16.safetensors"
    assert "Steps: 4" in Image.open(path).info["parameters"]
    _screenshot(page)
    # the tokenizer is on disk now: the count is exact
    set_field(page, "prompt", "a tiny red fox in the snow.")
    expect(page.locator("#token_count")).not_to_contain_text("estimate")
    # the gallery image's settings, then "use these settings"
    page.locator("#gallery img").first.click()
    expect(page.locator("#image_settings")).to_contain_text('"seed": 1234')
    set_field(page, "prompt", "something else")
    set_field(page, "seed", "-1")
    page.click("#use_settings")
    expect(page.locator("#prompt textarea")).to_have_value("a tiny red fox in the snow")
    expect(page.locator("#seed input")).to_have_value("1234")


def test_a_dropped_png_fills_the_form_from_its_settings(page: object, server: Server, tmp_path: Path) -> None:
    [path] = saved(server, 1234)
    page.set_input_files("#settings_drop input[type=file]", str(path))
    expect(page.locator("#prompt textarea")).to_have_value("a tiny red fox in the snow")
    expect(page.locator("#model input")).to_have_value(_contains("self-test"))
    expect(page.locator("#seed input")).to_have_value("1234")
    foreign = tmp_path / "a1111.png"  # only an A1111 "parameters" text, as other tools write it
    meta = PngImagePlugin.PngInfo()
    meta.add_text(
        "parameters",
        "a lighthouse at dusk\nNegative prompt: fog\nSteps: 7, Sampler: Euler, CFG scale: 2.5, Seed: 77, Size: 96x80",
    )
    Image.new("RGB", (8, 8)).save(foreign, pnginfo=meta)
    page.set_input_files("#settings_drop input[type=file]", str(foreign))
    expect(page.locator("#prompt textarea")).to_have_value("a lighthouse at dusk")
    expect(page.locator("#steps input")).to_have_value("7")
    expect(page.locator("#width input")).to_have_value("96")
    assert "A1111" in page.inner_text("#status")


def test_two_queued_tasks_give_two_images_each_with_its_own_settings(page: object, server: Server) -> None:
    use_selftest(page)
    set_field(page, "prompt", "first task")
    set_field(page, "seed", "11")
    set_field(page, "steps", "60")  # long enough that the second task waits in the queue
    page.click("#generate")
    set_field(page, "prompt", "second task")
    set_field(page, "seed", "22")
    set_field(page, "steps", "3")
    page.click("#generate")
    expect(page.locator("#gallery img")).to_have_count(2, timeout=RUN_TIMEOUT_MS)
    [first], [second] = saved(server, 11), saved(server, 22)
    one, two = (json.loads(Image.open(p).info["wgp_settings"]) for p in (first, second))
    assert (one["prompt"], one["num_inference_steps"]) == ("first task", 60)
    assert (two["prompt"], two["num_inference_steps"]) == ("second task", 3)
    assert first.stat().st_mtime <= second.stat().st_mtime  # one after the other, in order


def test_abort_stops_a_long_run_and_the_app_stays_usable(page: object, server: Server) -> None:
    use_selftest(page)
    set_field(page, "prompt", "a long run")
    set_field(page, "steps", "1000")
    set_field(page, "width", "256")
    set_field(page, "height", "256")
    set_field(page, "seed", "33")
    page.click("#generate")
    page.wait_for_function(
        "() => Number(document.querySelector('#progress .wgp-progress')?.dataset.step || 0) >= 2",
        timeout=RUN_TIMEOUT_MS,
    )
    expect(page.locator("#preview img")).to_have_count(1)  # the live preview of the latents
    page.click("#abort")
    status = wait_status(page, "aborted", timeout_ms=45_000)
    step = int(status.split("aborted at step ")[1].split("/")[0])
    assert step < 1000 and not saved(server, 33)
    set_field(page, "steps", "2")
    set_field(page, "width", "64")
    set_field(page, "height", "64")
    set_field(page, "seed", "44")
    page.click("#generate")
    expect(page.locator("#gallery img")).to_have_count(1, timeout=RUN_TIMEOUT_MS)
    assert len(saved(server, 44)) == 1


def test_a_bad_size_shows_a_message_and_odd_sizes_are_snapped(page: object, server: Server) -> None:
    use_selftest(page)
    set_field(page, "width", "5000")
    page.click("#generate")
    status = wait_status(page, "Not queued")
    assert "width must be between 16 and 4096" in status
    assert page.locator("#status .wgp-error").count() == 1
    set_field(page, "width", "100")
    expect(page.locator("#size_note")).to_contain_text("100 -> 96")
    set_field(page, "seed", "55")
    page.click("#generate")
    expect(page.locator("#gallery img")).to_have_count(1, timeout=RUN_TIMEOUT_MS)
    [path] = saved(server, 55)
    assert Image.open(path).size == (96, 64)


def test_lora_panel_lists_the_family_folder_and_reports_each_lora(page: object, server: Server) -> None:
    use_selftest(page)
    choose(page, "loras", "tiny_style")
    expect(page.locator("#lora_report")).to_contain_text("tiny_style.safetensors", timeout=20_000)
    expect(page.locator("#lora_report")).to_contain_text("rank 4")
    set_field(page, "loras_multipliers", "1,0.5")
    set_field(page, "seed", "66")
    page.click("#generate")
    assert "LoRA tiny_style.safetensors" in wait_status(page, "seed 66")  # the load report, in the page
    [path] = saved(server, 66)
    settings = json.loads(Image.open(path).info["wgp_settings"])
    assert settings["activated_loras"] == ["tiny_style.safetensors"] and settings["loras_multipliers"] == "1,0.5"
    set_field(page, "loras_multipliers", "lots")
    page.click("#generate")
    assert "not a number" in wait_status(page, "Not queued")


def test_a_dropped_file_that_is_not_an_image_gets_one_line_and_the_area_takes_the_next(
    page: object, server: Server, tmp_path: Path
) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    page.set_input_files("#settings_drop input[type=file]", str(notes))
    status = wait_status(page, "No settings taken")
    assert "notes.txt" in status and "\n" not in status.strip() and "Traceback" not in status
    expect(page.locator("#settings_drop")).not_to_contain_text("notes.txt")  # emptied, not stuck on "Error"
    expect(page.locator("#settings_drop")).not_to_contain_text("Error")
    [path] = saved(server, 1234)  # the next drop works
    page.set_input_files("#settings_drop input[type=file]", str(path))
    expect(page.locator("#prompt textarea")).to_have_value("a tiny red fox in the snow")


def test_the_model_picker_does_not_take_free_text(page: object) -> None:
    use_selftest(page)
    page.fill("#model input", "not a model")
    page.press("#model input", "Tab")
    expect(page.locator("#model input")).to_have_value(_contains("self-test"))
    expect(page.locator("#model_info")).to_contain_text("Self-test model")


def test_two_tabs_each_see_their_own_jobs(browser: object, server: Server) -> None:
    """Two tabs of one browser: a tab's status, gallery and progress are its own jobs'; the queue shows all."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        one, two = context.new_page(), context.new_page()
        for tab in (one, two):
            tab.goto(server.url)
            tab.wait_for_selector("#generate")
            expect(tab.locator("#prompt textarea")).not_to_have_value("")
            use_selftest(tab)
        set_field(two, "prompt", "tab two's job")
        set_field(two, "seed", "77")
        two.click("#generate")
        expect(two.locator("#gallery img")).to_have_count(1, timeout=RUN_TIMEOUT_MS)
        wait_status(two, "seed 77")
        expect(one.locator("#queue")).to_contain_text("other tab")
        assert gallery_count(one) == 0 and "seed 77" not in one.inner_text("#status")
        set_field(one, "prompt", "tab one's job")
        set_field(one, "seed", "78")
        one.click("#generate")
        expect(one.locator("#gallery img")).to_have_count(1, timeout=RUN_TIMEOUT_MS)
        wait_status(one, "seed 78")
        expect(two.locator("#queue")).to_contain_text("#")
        assert gallery_count(two) == 1 and "seed 78" not in two.inner_text("#status")
        one.locator("#gallery img").first.click()
        expect(one.locator("#image_settings")).to_contain_text('"seed": 78')
    finally:
        context.close()


# -- issue 11 item 1: image-to-image and inpainting on the self-test model ------------------------------


def _upload(page: object, elem_id: str, path: Path) -> None:
    page.set_input_files(f"#{elem_id} input[type=file]", str(path))
    expect(page.locator(f"#{elem_id} img")).to_have_count(1)  # the upload shows


def _generate_from_images(page: object, server: Server, seed: int, strength: str, **images: Path) -> dict:
    """Upload `images` (setting -> file), generate with `strength`; the saved file's settings."""
    use_selftest(page)
    expect(page.locator("#image_start")).to_be_visible()
    expect(page.locator("#denoising_strength input")).to_have_value("0.6")  # the default with an image
    for elem_id, path in images.items():
        _upload(page, elem_id, path)
    set_field(page, "denoising_strength", strength)
    set_field(page, "seed", str(seed))
    page.click("#generate")
    expect(page.locator("#gallery img")).to_have_count(1, timeout=RUN_TIMEOUT_MS)
    wait_status(page, f"seed {seed}")
    [path] = saved(server, seed)
    settings = json.loads(Image.open(path).info["wgp_settings"])
    assert settings["denoising_strength"] == float(strength)
    assert "vae_encode_s" in settings["generation_info"]["timings"]  # the start image was encoded
    for elem_id, source in images.items():
        assert settings["generation_info"]["inputs"][elem_id]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    _screenshot(page, REPO_ROOT / "docs" / ("inpainting.png" if "image_mask" in images else "image_to_image.png"))
    return settings


def test_image_to_image_uploads_a_start_image_and_shows_the_result(page: object, server: Server, tmp_path: Path) -> None:
    start = tmp_path / "start.png"
    Image.new("RGB", (48, 80), (30, 140, 220)).save(start)  # another size than the 64x64 output: stretched
    settings = _generate_from_images(page, server, 2101, "0.5", image_start=start)
    assert "image_mask" not in settings["generation_info"]["inputs"]


def test_inpainting_uploads_an_image_and_a_mask_and_shows_the_result(page: object, server: Server, tmp_path: Path) -> None:
    from PIL import ImageDraw

    start, mask = tmp_path / "start.png", tmp_path / "mask.png"
    picture = Image.new("RGB", (64, 64), (40, 90, 160))
    ImageDraw.Draw(picture).ellipse((8, 8, 40, 40), fill=(240, 200, 40))
    picture.save(start)
    pixels = Image.new("L", (32, 32), 0)  # another size than the image: stretched
    ImageDraw.Draw(pixels).ellipse((4, 4, 20, 20), fill=255)  # repaint the yellow disc
    pixels.save(mask)
    _generate_from_images(page, server, 2102, "1", image_start=start, image_mask=mask)


def _contains(text: str) -> object:
    import re

    return re.compile(re.escape(text))


def _screenshot(page: object, path: Path = SCREENSHOT) -> None:
    """A README picture of the page: written when missing (or with WGP_UPDATE_SCREENSHOT=1)."""
    image = page.screenshot(full_page=True)
    assert len(image) > 10_000
    if not path.exists() or os.environ.get("WGP_UPDATE_SCREENSHOT") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image)


# -- issue 10 item 1: a family's own settings, an image input among them, with no host change ------------


@pytest.fixture(scope="module")
def toy_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The web UI on the test-only toy family (tests/fixtures/families/toy): its schema declares toy_image
    (an image input), toy_mix and toy_invert; "toy_plus" takes no image."""
    from tests.fixtures.host_env import cli_args, toy_env

    root = tmp_path_factory.mktemp("toyweb")
    plus = {"model": {"name": "Toy plus", "architecture": "toy_plus", "URLs": ["toy/toy_bf16.safetensors"]}}
    config = toy_env(root, presets={"toy_plus": plus})
    args = [a for a in cli_args(config) if a not in ("--offline", "--device", "cpu")]
    yield from _serve(root, args, Server("", config.ckpts, config.output_dir, root / "loras", root / "server.log", None))


def test_a_family_image_input_is_an_upload_that_reaches_the_saved_image(
    browser: object, toy_server: Server, tmp_path: Path
) -> None:
    import hashlib

    import numpy as np

    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        tab = context.new_page()
        tab.goto(toy_server.url)
        tab.wait_for_selector("#generate")
        expect(tab.locator("#prompt textarea")).to_have_value("a toy")  # the toy preset's defaults are in
        expect(tab.locator("#toy_image")).to_be_visible()
        expect(tab.locator("#toy_mix input")).to_have_value("0.5")
        start = tmp_path / "start.png"
        Image.new("RGB", (32, 32), (200, 10, 60)).save(start)
        tab.set_input_files("#toy_image input[type=file]", str(start))
        expect(tab.locator("#toy_image img")).to_have_count(1)  # the upload shows
        set_field(tab, "toy_mix", "1")
        set_field(tab, "seed", "88")
        tab.click("#generate")
        expect(tab.locator("#gallery img")).to_have_count(1, timeout=RUN_TIMEOUT_MS)
        [path] = sorted(toy_server.outputs.glob("*_seed88_*.png"))
        assert (np.asarray(Image.open(path)) == (200, 10, 60)).all()  # mix 1: the uploaded picture itself
        settings = json.loads(Image.open(path).info["wgp_settings"])
        assert settings["toy_mix"] == 1.0 and settings["toy_invert"] is False
        digest = hashlib.sha256(start.read_bytes()).hexdigest()
        assert settings["generation_info"]["inputs"]["toy_image"]["sha256"] == digest
        tab.click("#model input")
        tab.click("#model li[role=option][aria-label='Toy plus']")
        expect(tab.locator("#toy_image")).to_be_hidden()  # toy_plus takes no image: its fields are hidden
        expect(tab.locator("#toy_mix")).to_be_hidden()
        expect(tab.locator("#image_inputs")).to_be_hidden()
        tab.get_by_text("Advanced options").click()
        expect(tab.locator("#toy_invert")).to_be_visible()  # toy_plus does take this one
    finally:
        context.close()
