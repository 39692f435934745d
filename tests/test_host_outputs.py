"""Saved images: names, atomic writes that never overwrite, embedded settings in PNG/JPEG/WebP."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest
from PIL import Image

import host.outputs as outputs
from common.errors import SettingsError

SETTINGS = {
    "model_type": "z_image",
    "prompt": "A fox, in snow! 狐狸",
    "negative_prompt": "blurry",
    "seed": 42,
    "num_inference_steps": 8,
    "guidance_scale": 0.0,
    "resolution": "64x32",
    "flow_shift": 3.0,
}
INFO = {"program": "wgp-zimage 0.1.0", "model_hash": "0123456789abcdef", "loras": {"style.safetensors": "0.8"}}


def _image() -> Image.Image:
    return Image.linear_gradient("L").resize((64, 32)).convert("RGB")


def test_name_has_date_seed_and_slug() -> None:
    name = outputs.output_name(42, SETTINGS["prompt"], "png", datetime(2025, 1, 2, 3, 4, 5))
    assert name == "2025-01-02_03-04-05_seed42_a_fox_in_snow.png"
    assert outputs.output_name(1, "", "jpeg", datetime(2025, 1, 2)).endswith("_seed1_image.jpg")
    assert len(outputs.slugify("word " * 50)) <= outputs.MAX_SLUG


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_settings_round_trip_in_every_format(tmp_path: Path, fmt: str) -> None:
    path = outputs.save_image(_image(), tmp_path, f"x{outputs.EXTENSIONS[fmt]}", SETTINGS, INFO, fmt)
    data = outputs.read_settings(path)
    assert {k: data[k] for k in SETTINGS} == SETTINGS
    assert data["generation_info"] == INFO


def test_png_carries_a1111_parameters(tmp_path: Path) -> None:
    path = outputs.save_image(_image(), tmp_path, "x.png", SETTINGS, INFO)
    with Image.open(path) as image:
        text = image.info["parameters"]
    prompt, negative, fields = text.split("\n")
    assert prompt == SETTINGS["prompt"] and negative == "Negative prompt: blurry"
    for part in (
        "Steps: 8",
        "CFG scale: 0.0",
        "Seed: 42",
        "Size: 64x32",
        "Model: z_image",
        "Model hash: 0123456789",
        "Lora: style.safetensors:0.8",
        "Version: wgp-zimage 0.1.0",
    ):
        assert part in fields


def test_never_overwrites(tmp_path: Path) -> None:
    first = outputs.save_image(_image(), tmp_path, "same.png", SETTINGS, INFO)
    second = outputs.save_image(_image(), tmp_path, "same.png", {**SETTINGS, "seed": 43}, INFO)
    assert (first.name, second.name) == ("same.png", "same_2.png")
    assert outputs.read_settings(first)["seed"] == 42


def test_failed_write_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def half_write(image: Image.Image, path: Path, *args: object) -> None:
        path.write_bytes(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(outputs, "_write", half_write)
    with pytest.raises(OSError, match="disk full"):
        outputs.save_image(_image(), tmp_path, "x.png", SETTINGS, INFO)
    assert list(tmp_path.iterdir()) == []


def test_reading_an_image_without_settings_says_so(tmp_path: Path) -> None:
    _image().save(tmp_path / "plain.png")
    with pytest.raises(SettingsError, match="carries no generation settings"):
        outputs.read_settings(tmp_path / "plain.png")
    (tmp_path / "not_image.png").write_text("hello")
    with pytest.raises(SettingsError, match="not a readable image"):
        outputs.read_settings(tmp_path / "not_image.png")
