"""Live preview of the latents during denoising: the family's fixed linear map from latent channels to
RGB (`LatentFormat.rgb_factors`, from its handler's `query_model_facts`), applied to the sampler's
estimate of the clean image (no VAE decode, about a millisecond).

The map is for latents in the sampler's space (what the denoise loop holds); a family that declares no
map, or latents of another channel count, get no preview rather than a wrong one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from common.model_facts import LatentFormat

MAX_PREVIEW_SIDE = 512
PREVIEWS_PER_RUN = 10  # "every few steps": about this many previews per generation, plus the last step


def latents_to_rgb(latents: torch.Tensor, latent: LatentFormat | None) -> Image.Image | None:
    """(B, C, h, w) or (C, h, w) sampler-space latents -> RGB image of the first item, upscaled for display
    (up to `latent.pixels_per_latent` times, at most MAX_PREVIEW_SIDE per side).

    Returns None without a map (`latent` None or without rgb_factors) or for latents of another channel count.
    """
    if latent is None or latent.rgb_factors is None:
        return None
    x = latents[0] if latents.ndim == 4 else latents  # (C, h, w)
    if x.ndim != 3 or x.shape[0] != latent.channels:
        return None
    factors = torch.tensor(latent.rgb_factors, dtype=torch.float32, device="cpu")  # (C, 3)
    bias = torch.tensor(latent.rgb_bias, dtype=torch.float32, device="cpu")
    rgb = torch.einsum("chw,cd->hwd", x.detach().float().cpu(), factors) + bias  # (h, w, 3) in ~[-1, 1]
    array = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    image = Image.fromarray(np.ascontiguousarray(array))
    h, w = array.shape[:2]
    scale = min(latent.pixels_per_latent, MAX_PREVIEW_SIDE / max(h, w))
    if scale > 1:
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
    return image


def preview_interval(total_steps: int) -> int:
    """Preview every this many steps (about PREVIEWS_PER_RUN per generation)."""
    return max(1, math.ceil(total_steps / PREVIEWS_PER_RUN))


class LatentPreviewer:
    """Turns step latents into preview images of the predicted clean image.

    The denoise loop (common/sampling.py) moves x <- x + (sigma_next - sigma) * v, so two consecutive
    latents give v, and the clean-image estimate is x0 = x - sigma * v. That estimate shows the picture
    from the first steps on; the raw latents would show mostly noise. `sigmas` is the run's schedule,
    (N + 1,) from 1 down to 0; without it (or at the first step) the raw latents are shown. `latent`: the
    model's latent format (`preset.facts.latent`); None shows nothing.
    """

    def __init__(self, sigmas: Sequence[float] | None = None, latent: LatentFormat | None = None):
        self.sigmas = list(sigmas) if sigmas is not None else None
        self.latent = latent
        self.previous: torch.Tensor | None = None  # latents after the previous step, (1, C, h, w)
        self.previous_step = 0

    def observe(self, step: int, latents: torch.Tensor) -> None:
        """Remember the latents after every step (cheap: one small copy), needed for the next estimate."""
        self.previous = latents[:1].detach().float().cpu().clone()
        self.previous_step = step

    def image(self, step: int, latents: torch.Tensor) -> Image.Image | None:
        """Preview for the latents after `step` (1-based); call before `observe(step, latents)`."""
        current = latents[:1].detach().float().cpu()
        estimate = current
        known = self.sigmas is not None and self.previous is not None and self.previous_step == step - 1
        if known and step < len(self.sigmas):
            sigma_prev, sigma_now = self.sigmas[step - 1], self.sigmas[step]
            if sigma_prev != sigma_now:
                velocity = (current - self.previous) / (sigma_now - sigma_prev)
                estimate = current - sigma_now * velocity
        return latents_to_rgb(estimate, self.latent)
