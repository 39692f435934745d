"""Z-Image image-to-image and inpainting: the text-to-image steps (pipeline_z_image.py) around a start image.

Semantics of diffusers 0.42.1 `ZImageImg2ImgPipeline` / `ZImageInpaintPipeline` (read, not copied):
- `denoising_strength` is diffusers' `strength`: of the N-step schedule, the run starts at index
  t_start = int(N - N * strength) and keeps the N - t_start steps after it (1.0: all of them, from pure noise).
- One CPU generator seeded with the seed: the VAE *samples* the start image's latent distribution first,
  then the noise is drawn. Start latents = sigma * noise + (1 - sigma) * image latents at the first kept sigma.
- Inpainting (`image_mask`, white = repaint): the mask is binarised at half grey and taken at the latent
  size (nearest); after every step the known region is put back as the image latents noised to the next
  sigma with the same noise (at the last step, sigma 0: the image latents themselves).
Input images are stretched to the chosen resolution (LANCZOS, as diffusers' image processor resizes).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from PIL import Image

from common.errors import SettingsError
from common.settings_schema import load_image
from models.z_image.pipeline_z_image import (
    BeforeStepCallback,
    GenerationResult,
    StepCallback,
    ZImagePipeline,
    draw_noise,
    resolve_seed,
)
from models.z_image.settings_z_image import GenerationSettings


def generate_from_image(
    pipe: ZImagePipeline, s: GenerationSettings, on_step: StepCallback | None, before_step: BeforeStepCallback | None
) -> GenerationResult:
    """Image-to-image (`image_start`), or inpainting (`image_start` + `image_mask`), for one settings object."""
    if s.image_start is None:
        raise SettingsError("'image_mask' needs 'image_start': the picture whose white region is repainted")
    sigmas = pipe.schedule(s)  # the sampler's own times (TwinFlow's grid with sample_solver twinflow)
    sigmas = sigmas[first_step(s.num_inference_steps, s.denoising_strength) :]  # (kept steps + 1,)
    seed = resolve_seed(s.seed)
    timings: dict[str, float] = {}
    prompts = pipe.encode_prompts(s, timings)

    start = time.perf_counter()
    generator = torch.Generator("cpu").manual_seed(seed)
    image_latents = encode_image(pipe, image_pixels(s.image_start, s.width, s.height), generator)  # (1, 16, h, w)
    noise = draw_noise(generator, s.batch_size, s.width, s.height, pipe.vae_scale_factor).to(pipe.device)
    image_latents = image_latents.expand_as(noise)  # the one encoded image for every image of the batch
    timings["vae_encode_s"] = time.perf_counter() - start

    sigmas = sigmas.to(pipe.device)
    latents = scale_noise(image_latents, sigmas[0], noise)
    after_step = None
    if s.image_mask is not None:
        mask = latent_mask(s.image_mask, s.width, s.height, pipe.vae_scale_factor).to(pipe.device)
        after_step = KnownRegion(image_latents, noise, mask, sigmas)
    latents = pipe.denoise_latents(latents, sigmas, s, prompts, timings, on_step, before_step, after_step, seed=seed)
    return pipe.finish(latents, seed, s, prompts, timings)


def first_step(steps: int, strength: float) -> int:
    """Index of the first schedule step run at this strength (diffusers' `get_timesteps`); refuses a
    strength that leaves no step, as diffusers does."""
    t_start = int(max(steps - min(steps * strength, steps), 0))
    if t_start >= steps:
        raise SettingsError(
            f"denoising_strength {strength:g} leaves none of the {steps} steps to run (the image would come back "
            f"unchanged): give a strength above 0 (each 1/{steps} = {1 / steps:.3g} runs one more step)"
        )
    return t_start


def scale_noise(image_latents: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The clean latents noised to `sigma` on the flow's straight path: sigma * noise + (1 - sigma) * x0."""
    return sigma * noise + (1.0 - sigma) * image_latents


class KnownRegion:
    """`after_step` of inpainting: where the mask is 0, the latents become the start image's, noised to the
    sigma the step reached (0 after the last step: the image latents themselves)."""

    def __init__(self, image_latents: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor, sigmas: torch.Tensor):
        self.image_latents = image_latents  # (B, 16, h, w)
        self.noise = noise  # (B, 16, h, w), the noise the start latents were made with
        self.mask = mask  # (1, 1, h, w): 1 = repaint, 0 = keep
        self.sigmas = sigmas  # (steps + 1,), the run's schedule

    def __call__(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        known = scale_noise(self.image_latents, self.sigmas[step + 1], self.noise)
        return (1 - self.mask) * known + self.mask * latents


# -- inputs -----------------------------------------------------------------------------------------


def image_pixels(image: Any, width: int, height: int) -> torch.Tensor:
    """A PIL image (or an image file) -> (1, 3, height, width) fp32 in [-1, 1], stretched to the size."""
    picture = _as_pil(image, "image_start").convert("RGB")
    picture = picture.resize((width, height), Image.Resampling.LANCZOS)  # a copy when the size is already right
    array = np.asarray(picture).astype(np.float32) / 255.0  # (H, W, 3)
    return 2.0 * torch.from_numpy(array).permute(2, 0, 1)[None] - 1.0


def latent_mask(image: Any, width: int, height: int, vae_factor: int) -> torch.Tensor:
    """A mask image -> (1, 1, h, w) of 0/1 at the latent size: stretched to the image size (LANCZOS), to grey
    levels, 1 where >= half grey, then every vae_factor-th pixel (nearest), in diffusers' order."""
    picture = _as_pil(image, "image_mask")
    if picture.mode not in ("L", "RGB"):  # palette, 1-bit, alpha: plain levels first (PIL resizes "P" nearest)
        picture = picture.convert("RGB")
    grey = picture.resize((width, height), Image.Resampling.LANCZOS).convert("L")
    mask = torch.from_numpy(np.asarray(grey).astype(np.float32) / 255.0)[None, None]  # (1, 1, H, W)
    mask = (mask >= 0.5).float()
    size = (height // vae_factor, width // vae_factor)
    return torch.nn.functional.interpolate(mask, size=size, mode="nearest")


def _as_pil(image: Any, name: str) -> Image.Image:
    """Images reach the engine as PIL images from the host; a path (the engine called directly) is read."""
    return image if isinstance(image, Image.Image) else load_image(str(image), name)


@torch.no_grad()
def encode_image(pipe: ZImagePipeline, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(1, 3, H, W) pixels -> (1, 16, H/f, W/f) fp32 latents in the transformer's space: a *sample* of the
    VAE's latent distribution (drawn from `generator`), through the `encode_image` hooks (e.g. tiling)."""
    cfg = pipe.vae.config
    x = pixels.to(device=pipe.device, dtype=pipe.vae.dtype)
    distribution = pipe.hooks.encode_image.call(lambda t: pipe.vae.encode(t).latent_dist, x)
    sample = distribution.sample(generator)
    return ((sample - cfg.shift_factor) * cfg.scaling_factor).float()
