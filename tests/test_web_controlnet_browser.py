"""The ControlNet in the web UI, in a real browser (tests/test_web_browser.py's server and helpers): a tiny
random Z-Image with a tiny ControlNet v2.1 as a finetune preset; upload a control image, preview it as Canny
edges, generate, and find the image in the gallery and its settings in the saved file."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from host.registry import REPO_ROOT
from tests.fixtures.controlnets import control_preset, write_control_env, write_controlnet, write_json
from tests.test_web_browser import (  # noqa: F401  (browser: the module's Chromium fixture)
    RUN_TIMEOUT_MS,
    Server,
    _screenshot,
    _serve,
    _upload,
    browser,
    choose,
    expect,
    saved,
    set_field,
    wait_status,
)


@pytest.fixture(scope="module")
def control_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("controlweb")
    write_control_env(root)
    module = write_controlnet(root / "ckpts" / "tiny" / "module", "v2.1", "module")
    preset = control_preset(
        "v2.1", str(module.relative_to(root / "ckpts")), quantization="fp32", resolution="64x48",
        num_inference_steps=3, prompt="a red house under a blue sky",
    )
    preset["model"]["name"] = "Tiny ControlNet v2.1 (random weights)"
    write_json(root / "finetunes" / "tiny_control.json", preset)
    ckpts, outputs = root / "ckpts", root / "outputs"
    args = ["--ckpts", str(ckpts), "--output-dir", str(outputs), "--finetunes-dir", str(root / "finetunes")]
    yield from _serve(root, args, Server("", ckpts, outputs, root / "loras", root / "server.log", None))


def test_upload_a_guide_preview_it_and_generate(browser: object, control_server: Server, tmp_path: Path) -> None:  # noqa: F811
    context = browser.new_context(viewport={"width": 1400, "height": 1100})
    try:
        page = context.new_page()
        page.goto(control_server.url)
        page.wait_for_selector("#generate")
        choose(page, "model", "Tiny ControlNet")
        expect(page.locator("#image_guide")).to_be_visible()
        expect(page.locator("#image_guide_preview_button")).to_be_visible()
        expect(page.locator("#denoising_strength")).to_be_hidden()  # image-to-image's, not a ControlNet's
        expect(page.locator("#control_net_weight input")).to_have_value("0.75")
        guide = tmp_path / "guide.png"
        picture = Image.new("RGB", (80, 60), (20, 30, 40))  # another size than 64x48: stretched
        ImageDraw.Draw(picture).rectangle((20, 15, 60, 45), fill=(230, 220, 200))
        picture.save(guide)
        _upload(page, "image_guide", guide)
        choose(page, "control_preprocess", "canny")
        page.click("#image_guide_preview_button")
        wait_status(page, "Preview of image_guide: 64x48")
        expect(page.locator("#image_guide_preview img")).to_have_count(1)
        set_field(page, "seed", "3101")
        page.click("#generate")
        expect(page.locator("#gallery img")).to_have_count(1, timeout=RUN_TIMEOUT_MS)
        wait_status(page, "seed 3101")
        [path] = saved(control_server, 3101)
        settings = json.loads(Image.open(path).info["wgp_settings"])
        assert settings["model_type"] == "tiny_control" and settings["control_preprocess"] == "canny"
        assert settings["control_net_weight"] == 0.75
        assert settings["generation_info"]["inputs"]["image_guide"]["sha256"] == hashlib.sha256(guide.read_bytes()).hexdigest()
        assert "vae_encode_s" in settings["generation_info"]["timings"]  # the guide was encoded
        _screenshot(page, REPO_ROOT / "docs" / "controlnet.png")
    finally:
        context.close()
