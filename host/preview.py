"""Live preview of the latents during denoising: a fixed linear map from the Flux VAE's 16 latent channels
to RGB, applied to the sampler's estimate of the clean image (no VAE decode, about a millisecond).

Works for every family whose latents are Flux-VAE latents in the sampler's space (scaled and shifted the
way the VAE's `scaling_factor`/`shift_factor` prescribe, i.e. what the denoise loop holds); other channel
counts get no preview rather than a wrong one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

# Rows: the 16 latent channels; columns: R, G, B. These are the published Flux.1 latent-to-RGB factors
# and bias (ComfyUI comfy/latent_formats.py, class Flux, latent_rgb_factors / latent_rgb_factors_bias;
# the same numbers are used by stable-diffusion.cpp and other previewers). They were fitted by least
# squares between real Flux VAE latents (sampler space) and their decoded images; Z-Image uses the same
# VAE (16 channels, scaling 0.3611, shift 0.1159), so they hold unchanged. The result is in [-1, 1].
FLUX_LATENT_RGB = (
    (-0.0346, 0.0244, 0.0681),
    (0.0034, 0.0210, 0.0687),
    (0.0275, -0.0668, -0.0433),
    (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329),
    (0.0004, 0.0383, 0.0115),
    (0.0405, 0.0861, 0.0915),
    (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180),
    (0.1008, 0.0755, -0.0421),
    (-0.0515, 0.0201, 0.0011),
    (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749),
    (-0.1264, -0.0522, -0.1103),
    (-0.0280, -0.0881, -0.0499),
    (-0.1262, -0.0982, -0.0778),
)
FLUX_LATENT_RGB_BIAS = (-0.0329, -0.0718, -0.0851)
LATENT_CHANNELS = len(FLUX_LATENT_RGB)
VAE_FACTOR = 8  # one latent pixel covers 8x8 image pixels
MAX_PREVIEW_SIDE = 512
PREVIEWS_PER_RUN = 10  # "every few steps": about this many previews per generation, plus the last step


def latents_to_rgb(latents: torch.Tensor) -> Image.Image | None:
    """(B, 16, h, w) or (16, h, w) sampler-space latents -> RGB image of the first item, upscaled for display.

    Returns None for latents that are not 16-channel (no fixed map is known for them).
    """
    x = latents[0] if latents.ndim == 4 else latents  # (16, h, w)
    if x.ndim != 3 or x.shape[0] != LATENT_CHANNELS:
        return None
    factors = torch.tensor(FLUX_LATENT_RGB, dtype=torch.float32, device="cpu")  # (16, 3)
    bias = torch.tensor(FLUX_LATENT_RGB_BIAS, dtype=torch.float32, device="cpu")
    rgb = torch.einsum("chw,cd->hwd", x.detach().float().cpu(), factors) + bias  # (h, w, 3) in ~[-1, 1]
    array = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    image = Image.fromarray(np.ascontiguousarray(array))
    h, w = array.shape[:2]
    scale = min(VAE_FACTOR, MAX_PREVIEW_SIDE / max(h, w))
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
    (N + 1,) from 1 down to 0; without it (or at the first step) the raw latents are shown.
    """

    def __init__(self, sigmas: Sequence[float] | None = None):
        self.sigmas = list(sigmas) if sigmas is not None else None
        self.previous: torch.Tensor | None = None  # latents after the previous step, (B, 16, h, w)
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
        return latents_to_rgb(estimate)
