"""ControlNet Union v1, v2.0, v2.1 and ControlNet inpainting equal diffusers 0.42.1's ZImageControlNetPipeline /
ZImageControlNetInpaintPipeline: one tiny random Z-Image and tiny random ControlNets built with diffusers' own
ZImageControlNetModel (every parameter random, the zero-initialised projections too), written in each file layout
(Wan2GP module file, VideoX-Fun single file, diffusers folder), same inputs and seed, fp32 on CPU, through
`wgp.load_model(...).generate(...)` with finetune presets naming the ControlNet in `"modules"`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from diffusers import FlowMatchEulerDiscreteScheduler, ZImageControlNetInpaintPipeline, ZImageControlNetPipeline
from PIL import Image

import wgp
from common.errors import SettingsError
from host.session import HostConfig
from models.z_image.controlnet_z_image import ZImageControlNet
from models.z_image.tiny_z_image import build_tiny_components
from tests.fixtures.controlnets import (
    CONTROL_TRANSFORMER,
    build_controlnet,
    control_preset,
    write_control_env,
    write_controlnet,
    write_json,
)
from tests.fixtures.reference import reference_images

WIDTH, HEIGHT = 64, 48
# preset id -> (version, layout of its ControlNet file): every version and every layout at least once.
PRESETS = {
    "tiny_control_v1": ("v1", "module"),
    "tiny_control_v2": ("v2.0", "diffusers"),
    "tiny_control_v2_file": ("v2.0", "single"),
    "tiny_control_v2_1": ("v2.1", "single"),
    "tiny_control_v2_1_module": ("v2.1", "module"),
}


def picture(seed: int) -> Image.Image:
    """Smooth shapes with noise: structure the VAE keeps."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    base = np.stack([x / WIDTH, y / HEIGHT, 0.5 + 0.5 * np.sin((x - y) / 5)], axis=-1) * 220
    return Image.fromarray(np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8))


def mask() -> Image.Image:
    """White (repaint) in the middle block, black elsewhere."""
    array = np.zeros((HEIGHT, WIDTH), np.uint8)
    array[12:36, 16:48] = 255
    return Image.fromarray(array, "L")


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostConfig]:
    root = tmp_path_factory.mktemp("controlnet")
    write_control_env(root)
    for name, (version, layout) in PRESETS.items():
        path = write_controlnet(root / "ckpts" / "tiny" / layout, version, layout)
        module = str(path.relative_to(root / "ckpts"))
        write_json(root / "finetunes" / f"{name}.json", control_preset(version, module, quantization="fp32"))
    (root / "defaults").mkdir()
    yield HostConfig(
        defaults_dir=root / "defaults", finetunes_dir=root / "finetunes", ckpts=root / "ckpts",
        output_dir=root / "out", allow_download=False, device="cpu",
    )
    wgp.release_model()


@pytest.fixture(scope="module")
def parts() -> Any:
    return build_tiny_components(0, CONTROL_TRANSFORMER)  # the weights write_control_env wrote


def reference(parts: Any, version: str, s: dict[str, Any]) -> np.ndarray:
    """diffusers' images (0..255) for our settings `s`."""
    inpaint = s.get("image_mask") is not None
    cls = ZImageControlNetInpaintPipeline if inpaint else ZImageControlNetPipeline
    pipe = cls(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=s["flow_shift"]), vae=parts.vae, text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer, transformer=parts.transformer, controlnet=build_controlnet(version),
    )
    pipe.set_progress_bar_config(disable=True)
    extra = {"image": s.get("image_start") or s["image_guide"], "mask_image": s["image_mask"]} if inpaint else {}
    return reference_images(pipe, s, control_image=s["image_guide"], controlnet_conditioning_scale=s["control_net_weight"],
                            max_sequence_length=64, **extra)


def settings(**changes: Any) -> dict[str, Any]:
    base = dict(
        prompt="a cat on a chair", image_guide=picture(1), control_net_weight=0.75, width=WIDTH, height=HEIGHT,
        num_inference_steps=3, guidance_scale=0.0, flow_shift=3.0, seed=5,
    )
    return base | changes


CASES = {
    "v1": ("tiny_control_v1", settings()),
    "v1_cfg_batch": ("tiny_control_v1", settings(guidance_scale=3.0, negative_prompt="blurry", batch_size=2, seed=9)),
    "v2_folder": ("tiny_control_v2", settings(control_net_weight=1.3)),
    "v2_file_inpaint": ("tiny_control_v2_file", settings(image_start=picture(2), image_mask=mask())),
    "v2_1_file_cfg": ("tiny_control_v2_1", settings(guidance_scale=2.5, negative_prompt="blurry", seed=11)),
    "v2_1_module_inpaint_guide_repainted": ("tiny_control_v2_1_module", settings(image_mask=mask(), seed=3)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_image_as_diffusers(config: HostConfig, parts: Any, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model_type, s = CASES[case]
    version = PRESETS[model_type][0]
    model = wgp.load_model(model_type, config=config)
    rows: list[int] = []
    refine = ZImageControlNet.refine

    def counted(self: ZImageControlNet, backbone: Any, img: Any, *args: Any) -> Any:
        rows.append(img.shape[0])
        return refine(self, backbone, img, *args)

    monkeypatch.setattr(ZImageControlNet, "refine", counted)
    got = np.stack([np.asarray(im) for im in model.generate(**s)]).astype(np.float32)
    # the ControlNet's refiner stage reads only image and control tokens: one row per image, guidance or not
    assert rows and set(rows) == {s.get("batch_size", 1)}
    expected = reference(parts, version, s)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1.0  # within 1/255 per pixel
    # The ControlNet matters: without it (weight 0) the image is far from the reference.
    plain = np.stack([np.asarray(im) for im in model.generate(**(s | {"control_net_weight": 0.0}))]).astype(np.float32)
    assert np.abs(plain - expected).mean() > 5.0


def test_v1_refuses_inpainting(config: HostConfig) -> None:
    model = wgp.load_model("tiny_control_v1", config=config)
    with pytest.raises(SettingsError, match="image_mask"):
        model.generate(**settings(image_mask=mask()))


def test_guide_image_is_required(config: HostConfig) -> None:
    model = wgp.load_model("tiny_control_v2_1", config=config)
    with pytest.raises(SettingsError, match="'image_guide' is required"):
        model.generate(**settings(image_guide=None))


def test_a_picture_turned_into_edges_is_what_the_controlnet_reads(config: HostConfig) -> None:
    """control_preprocess canny on a picture = the Canny image given as it is (raw), pixel for pixel."""
    from models.z_image.control_images import make_control_image

    model = wgp.load_model("tiny_control_v2_1", config=config)
    s = settings(image_guide=picture(4), control_preprocess="canny")
    made = model.generate(**s)[0]
    edges = make_control_image(picture(4), "canny", WIDTH, HEIGHT)
    given = model.generate(**(s | {"image_guide": edges, "control_preprocess": "raw"}))[0]
    plain = model.generate(**(s | {"control_preprocess": "raw"}))[0]
    assert made.tobytes() == given.tobytes() and made.tobytes() != plain.tobytes()
    assert model.last_result is not None and model.last_result.settings["control_preprocess"] == "raw"
