"""Control images made for the user (models/z_image/control_images.py), checked against values worked out by
hand on small pictures, and their preview (the family's `preview_input`, the web form's preview button)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from common.errors import SettingsError
from models.z_image.control_images import hysteresis, make_control_image, sobel, thin
from models.z_image.z_image_handler import family_handler

W, H = 64, 48


def square() -> Image.Image:
    """Black, with a white rectangle over columns 20..43 and rows 12..31."""
    picture = Image.new("RGB", (W, H))
    ImageDraw.Draw(picture).rectangle((20, 12, 43, 31), fill=(255, 255, 255))
    return picture


def channel(image: Image.Image) -> np.ndarray:
    array = np.asarray(image)
    assert array.shape == (H, W, 3) and (array == array[..., :1]).all()  # three equal channels
    return array[..., 0]


def test_raw_and_gray() -> None:
    picture = Image.new("RGB", (W, H), (255, 0, 0))
    assert np.asarray(make_control_image(picture, "raw", W, H)).tolist() == np.asarray(picture).tolist()
    # ITU-R 601-2 luma: 299/1000 * 255 = 76.2 -> 76 (PIL's integer rounding)
    assert (channel(make_control_image(picture, "gray", W, H)) == 76).all()
    assert make_control_image(picture, "raw", 32, 16).size == (32, 16)  # stretched to the size asked


def test_sobel_and_thinning_by_hand() -> None:
    step = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 3)  # a vertical edge between columns 1 and 2
    magnitude, angle = sobel(step)
    # gx at columns 1 and 2: (10 - 0) * (1 + 2 + 1) = 40; gy = 0 (borders replicated); angle 0 (horizontal)
    assert magnitude[1].tolist() == [0.0, 40.0, 40.0, 0.0] and (angle == 0).all()
    # equal magnitudes across the edge: one line stays (above the one behind, at least the one ahead)
    assert thin(magnitude, angle)[1].tolist() == [0.0, 40.0, 0.0, 0.0]


def test_hysteresis_keeps_weak_pixels_connected_to_strong_ones() -> None:
    thinned = torch.tensor(
        [
            [250.0, 150.0, 0.0, 0.0, 150.0],
            [0.0, 0.0, 150.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0, 50.0],
        ]
    )
    edges = hysteresis(thinned, 100.0, 200.0)
    # strong (0,0); weak (0,1) touches it, (1,2) touches (0,1) diagonally; (0,4) is weak and alone; 50 < low
    assert edges.tolist() == [[1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]]


def test_canny_outlines_the_rectangle_with_thin_lines() -> None:
    edges = channel(make_control_image(square(), "canny", W, H)) > 0
    ys, xs = np.nonzero(edges)
    outside = (xs < 18) | (xs > 45) | (ys < 10) | (ys > 33)
    inside = (xs > 22) & (xs < 41) & (ys > 14) & (ys < 29)
    assert len(xs) > 0 and not outside.any() and not inside.any()  # every edge within 2 px of the outline
    for row in range(16, 28):  # left and right sides: one pixel per row on each side
        assert edges[row, :32].sum() == 1 and edges[row, 32:].sum() == 1
    for col in range(24, 40):  # top and bottom sides: one pixel per column on each side
        assert edges[:22, col].sum() == 1 and edges[22:, col].sum() == 1
    low_contrast = Image.new("RGB", (W, H), (100, 100, 100))
    ImageDraw.Draw(low_contrast).rectangle((20, 12, 43, 31), fill=(110, 110, 110))  # Sobel peak ~40 < 100
    assert not channel(make_control_image(low_contrast, "canny", W, H)).any()


def test_soft_edge_and_scribble() -> None:
    soft = channel(make_control_image(square(), "soft_edge", W, H))
    assert soft.max() == 255 and soft[22, 32] == 0 and soft[2, 2] == 0  # strongest edge white, flat areas black
    assert soft[22, 19] > 100 and soft[22, 20] > 100  # bright on both sides of the left edge
    assert not channel(make_control_image(Image.new("RGB", (W, H), (90, 90, 90)), "soft_edge", W, H)).any()
    scribble = channel(make_control_image(square(), "scribble", W, H)) > 0
    assert scribble[22].sum() == 10  # two vertical strokes, each 5 pixels wide (1-pixel edge, dilated by 2)
    assert not scribble[22, 25:38].any()


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(SettingsError, match="control_preprocess 'depth' is not one of raw, canny"):
        make_control_image(square(), "depth", W, H)


def test_the_handler_previews_the_control_image_at_the_chosen_size() -> None:
    settings = {"image_guide": square(), "control_preprocess": "canny", "resolution": "32x24"}
    preview = family_handler.preview_input("z_image_control2_1", "image_guide", settings)
    assert preview.size == (32, 24)
    assert np.asarray(preview).tolist() == np.asarray(make_control_image(square(), "canny", 32, 24)).tolist()
    with pytest.raises(SettingsError, match="upload one as image_guide"):
        family_handler.preview_input("z_image_control", "image_guide", {**settings, "image_guide": None})
    with pytest.raises(SettingsError, match="no preview for z_image"):
        family_handler.preview_input("z_image", "image_start", settings)


def test_the_web_form_preview_button_shows_what_the_model_reads(tmp_path: Path) -> None:
    """The web form's handler (host/web/input_preview.py): the form's values -> the family's preview."""
    from host.session import HostConfig, Session
    from host.web.events import WebApp
    from tests.fixtures.controlnets import control_preset, write_json

    finetunes = tmp_path / "finetunes"
    write_json(finetunes / "tiny_control.json", control_preset("v2.1", "tiny/controlnet.safetensors", prompt="a cat"))
    session = Session(HostConfig(finetunes_dir=finetunes, ckpts=tmp_path / "ckpts", allow_download=False, device="cpu"))
    app = WebApp(session, None)
    app.c = {"status": "status", "image_guide_preview": "preview"}  # component stand-ins: the updates' keys
    square().save(tmp_path / "guide.png")
    form = dict.fromkeys(app.field_ids)
    form |= {"model": "tiny_control", "width": 64, "height": 48, "image_guide": str(tmp_path / "guide.png")}
    form["control_preprocess"] = "scribble"
    out = app.on_input_preview("image_guide", "image_guide", *[form[f] for f in app.field_ids])
    assert "Preview of image_guide: 64x48" in out["status"]
    assert np.asarray(out["preview"]).tolist() == np.asarray(make_control_image(square(), "scribble", W, H)).tolist()
    form["image_guide"] = None
    out = app.on_input_preview("image_guide", "image_guide", *[form[f] for f in app.field_ids])
    assert out["preview"] is None and "No preview: no control image" in out["status"]
