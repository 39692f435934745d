"""Image-to-image and inpainting equal diffusers 0.42.1's ZImageImg2ImgPipeline / ZImageInpaintPipeline on one
tiny random model (saved with diffusers' own save_pretrained), same inputs and seed, fp32 on CPU, through
`wgp.load_model(...).generate(...)` with Turbo and Base finetune presets on that folder."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImageImg2ImgPipeline, ZImageInpaintPipeline
from PIL import Image

import wgp
from common.errors import SettingsError
from host.session import HostConfig
from tests.fixtures.reference import reference_images

PRESETS = {  # finetunes of each architecture on the tiny diffusers folder; fp32 so the comparisons are exact
    "tiny_turbo": {"architecture": "z_image", "flow_shift": 3.0},
    "tiny_base": {"architecture": "z_image_base", "flow_shift": 6.0},
}
NEGATIVE = "blurry, low quality"


def start_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth colour gradient with some noise: structure the VAE can keep."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin((x + y) / 7)], axis=-1) * 200
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


def mask_image(width: int, height: int, mode: str = "L") -> Image.Image:
    """White (repaint) in a lower-right block with a grey ramp across its edge, black elsewhere."""
    y, x = np.mgrid[0:height, 0:width]
    ramp = np.clip((x - 0.4 * width) / (0.2 * width), 0, 1) * (y > 0.3 * height)
    return Image.fromarray((ramp * 255).astype(np.uint8), "L").convert(mode)


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory, tiny_diffusers_folder: Path) -> HostConfig:
    root = tmp_path_factory.mktemp("img2img")
    finetunes = root / "finetunes"
    finetunes.mkdir()
    for name, preset in PRESETS.items():
        model = {"name": name, "architecture": preset["architecture"], "URLs": [str(tiny_diffusers_folder)]}
        data = {"model": model, "prompt": "a fox", "quantization": "fp32", "flow_shift": preset["flow_shift"]}
        (finetunes / f"{name}.json").write_text(json.dumps(data))
    return HostConfig(finetunes_dir=finetunes, ckpts=root / "ckpts", output_dir=root / "out", allow_download=False, device="cpu")


@pytest.fixture(scope="module")
def references(tiny_diffusers_folder: Path) -> Iterator[dict[str, object]]:
    pipes = {
        "img2img": ZImageImg2ImgPipeline.from_pretrained(tiny_diffusers_folder, dtype=torch.float32),
        "inpaint": ZImageInpaintPipeline.from_pretrained(tiny_diffusers_folder, dtype=torch.float32),
    }
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    yield pipes
    wgp.release_model()


def reference(pipes: dict[str, object], model_type: str, s: dict) -> np.ndarray:
    """diffusers' images (0..255 floats) for our settings `s` (image_start already at the target size:
    diffusers' img2img keeps the input's own size, so it gets the image its own image processor resized)."""
    inpaint = s.get("image_mask") is not None
    pipe = pipes["inpaint" if inpaint else "img2img"]
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=PRESETS[model_type]["flow_shift"])
    image = pipe.image_processor.resize(s["image_start"], s["height"], s["width"])
    extra = {"mask_image": s["image_mask"]} if inpaint else {}
    return reference_images(pipe, s, image=image, strength=s["denoising_strength"], **extra)


def ours(config: HostConfig, model_type: str, s: dict) -> np.ndarray:
    model = wgp.load_model(model_type, config=config)
    images = model.generate(**s)
    return np.stack([np.asarray(im) for im in images]).astype(np.float32)


TURBO = dict(prompt="a red fox in the snow", guidance_scale=0.0, negative_prompt="")
BASE = dict(prompt="a red fox in the snow", guidance_scale=4.0, negative_prompt=NEGATIVE, cfg_normalization=True)
CASES = {
    # model type, settings (images made in the test from the sizes given)
    "i2i_turbo_nonsquare_0.6": ("tiny_turbo", dict(TURBO, width=64, height=48, num_inference_steps=4, denoising_strength=0.6, seed=42)),
    "i2i_turbo_full_strength_batch2_other_size": (
        "tiny_turbo", dict(TURBO, width=48, height=64, num_inference_steps=3, denoising_strength=1.0, seed=7, batch_size=2,
                           image_size=(40, 56)),
    ),
    "i2i_base_cfg_0.3": ("tiny_base", dict(BASE, width=48, height=48, num_inference_steps=5, denoising_strength=0.3, seed=3)),
    "i2i_turbo_one_step_left": ("tiny_turbo", dict(TURBO, width=32, height=48, num_inference_steps=4, denoising_strength=0.05, seed=5)),
    "inpaint_turbo_full_strength": (
        "tiny_turbo", dict(TURBO, width=64, height=48, num_inference_steps=4, denoising_strength=1.0, seed=11, mask_size=(64, 48)),
    ),
    "inpaint_base_0.75_mask_of_another_size_batch2": (
        "tiny_base", dict(BASE, width=48, height=64, num_inference_steps=4, denoising_strength=0.75, seed=13, batch_size=2,
                          mask_size=(30, 20), mask_mode="RGB"),
    ),
}


def settings_of(case: dict) -> dict:
    s = dict(case)
    image_size = s.pop("image_size", (s["width"], s["height"]))
    s["image_start"] = start_image(*image_size)
    if "mask_size" in s:
        s["image_mask"] = mask_image(*s.pop("mask_size"), s.pop("mask_mode", "L"))
    return s


@pytest.mark.parametrize("name", list(CASES))
def test_same_image_as_diffusers(config: HostConfig, references: dict[str, object], name: str) -> None:
    model_type, case = CASES[name]
    s = settings_of(case)
    got = ours(config, model_type, s)
    expected = reference(references, model_type, s)
    assert got.shape == expected.shape == (s.get("batch_size", 1), s["height"], s["width"], 3)
    assert np.abs(got - expected).max() <= 1.0  # within 1/255 per pixel


def test_the_kept_region_of_an_inpainting_is_the_start_image(tiny_diffusers_folder: Path) -> None:
    """After the last step the latents outside the mask are exactly the start image's latents (those of a run
    with nothing to repaint), and inside it they are not; the progress counts the steps run."""
    from models.z_image.pipeline_z_image import LoadOptions, ZImageComponents, ZImagePipeline
    from models.z_image.pipeline_z_image_img2img import latent_mask

    pipe = ZImagePipeline.from_components(
        ZImageComponents.from_diffusers_folder(tiny_diffusers_folder), LoadOptions(dtype=torch.float32)
    )
    s = settings_of(dict(TURBO, width=64, height=48, num_inference_steps=4, denoising_strength=0.5, seed=11, mask_size=(64, 48)))
    events, untouched = [], []
    pipe.generate(s, on_step=events.append)
    pipe.generate({**s, "image_mask": Image.new("L", (64, 48), 0)}, on_step=untouched.append)
    assert [(e.step, e.total) for e in events] == [(1, 2), (2, 2)]  # strength 0.5 of 4 steps: the last 2
    keep = latent_mask(s["image_mask"], 64, 48, pipe.vae_scale_factor).expand_as(events[-1].latents) == 0
    got, image_latents = events[-1].latents, untouched[-1].latents
    assert keep.any() and (~keep).any()
    assert torch.equal(got[keep], image_latents[keep])
    assert (got[~keep] - image_latents[~keep]).abs().mean() > 0.1


def test_saved_settings_record_the_input_images_and_the_strength(config: HostConfig) -> None:
    s = settings_of(CASES["inpaint_turbo_full_strength"][1])
    model = wgp.load_model("tiny_turbo", config=config)
    model.generate(**{**s, "num_inference_steps": 1}, output_dir=config.output_dir)
    saved = json.loads(Image.open(model.last_result.paths[0]).info["wgp_settings"])
    assert saved["denoising_strength"] == 1.0
    inputs = saved["generation_info"]["inputs"]
    assert set(inputs) == {"image_start", "image_mask"} and all(len(v["pixels_sha256"]) == 64 for v in inputs.values())


def test_a_strength_that_leaves_no_step_is_refused_like_diffusers(config: HostConfig, references: dict[str, object]) -> None:
    s = settings_of(dict(TURBO, width=32, height=32, num_inference_steps=4, denoising_strength=0.0, seed=1))
    with pytest.raises(SettingsError, match=r"denoising_strength 0 leaves none of the 4 steps.*above 0"):
        ours(config, "tiny_turbo", s)
    with pytest.raises(ValueError, match="number of pipeline steps is 0"):
        reference(references, "tiny_turbo", s)


def test_bad_image_inputs_are_named(config: HostConfig, tmp_path: Path) -> None:
    model = wgp.load_model("tiny_turbo", config=config)
    with pytest.raises(SettingsError, match="'image_mask' needs 'image_start'"):
        model.generate(width=32, height=32, num_inference_steps=2, image_mask=mask_image(32, 32))
    with pytest.raises(SettingsError, match="denoising_strength must be between 0 and 1"):
        model.generate(width=32, height=32, image_start=start_image(32, 32), denoising_strength=1.5)
    with pytest.raises(SettingsError, match="image_start.*not found"):
        model.generate(width=32, height=32, image_start=str(tmp_path / "missing.png"))


def test_the_start_image_is_encoded_through_the_encode_image_hooks(tiny_diffusers_folder: Path) -> None:
    """VAE tiling (a host transform on `hooks.encode_image`) applies to the start image: the encoder sees tiles."""
    from host.lowvram.vae_tiling import TilingOptions, VaeTilingTransform
    from models.z_image.pipeline_z_image import LoadOptions, ZImageComponents, ZImagePipeline

    pipe = ZImagePipeline.from_components(
        ZImageComponents.from_diffusers_folder(tiny_diffusers_folder), LoadOptions(dtype=torch.float32)
    )
    VaeTilingTransform(TilingOptions(mode="always", tile=4, overlap=2)).apply(pipe)
    seen: list[tuple[int, ...]] = []

    def spy(call_next, pixels: torch.Tensor):  # innermost: what reaches the VAE
        seen.append(tuple(pixels.shape[-2:]))
        return call_next(pixels)

    pipe.hooks.encode_image.add("spy", spy)
    s = settings_of(dict(TURBO, width=64, height=48, num_inference_steps=2, denoising_strength=0.5, seed=1))
    [image] = pipe.generate(s).images
    assert image.size == (64, 48) and len(seen) > 1 and all(shape == (32, 32) for shape in seen)
