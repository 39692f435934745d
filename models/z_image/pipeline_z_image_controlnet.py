"""Z-Image with a ControlNet Union: the text-to-image steps (pipeline_z_image.py) with the control context.

Semantics of diffusers 0.42.1 `ZImageControlNetPipeline` / `ZImageControlNetInpaintPipeline` (read, not copied):
- the guide image (`image_guide`, stretched to the size, LANCZOS) is VAE-encoded with the distribution's
  *mode* (no random draw, so the seed's noise is text-to-image's), normalised like image latents;
- v1: the control context is those 16 channels; v2 / v2.1: [guide (16), keep mask (1), masked picture (16)],
  the last 17 zeros without a mask. Inpainting (`image_mask`, white = repaint): the picture to repaint
  (`image_start`, else the guide picture) with the repainted region set to 0 (mid grey) in [-1, 1] pixels,
  encoded the same way; keep mask = 1 - mask binarised at half grey, taken at the latent size (nearest).
  Every step runs (no strength) and nothing is blended back: the ControlNet alone keeps the known region;
- at every evaluation the ControlNet's residuals, times `control_net_weight`, are added after the main
  layers it controls (`predict`); both guidance branches get the same control context.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common.errors import SettingsError
from common.sampling import get_sigmas
from common.settings_schema import load_image
from models.z_image.control_images import make_control_image
from models.z_image.controlnet_z_image import ZImageControlNet
from models.z_image.pipeline_z_image import (
    BeforeStepCallback,
    GenerationResult,
    LoadOptions,
    StepCallback,
    ZImageComponents,
    ZImagePipeline,
    resolve_seed,
)
from models.z_image.settings_z_image import GenerationSettings
from models.z_image.settings_z_image_control import ControlSettings, split_control_settings


@dataclass
class ControlInput:
    """What every step's ControlNet call reads: the control context (1, Cc, h, w) and its strength."""

    context: torch.Tensor
    scale: float


class ZImageControlNetPipeline(ZImagePipeline):
    """The Z-Image pipeline plus `controlnet`; `generate` takes the control settings too."""

    def __init__(
        self,
        transformer: Any,
        text_encoder: Any,
        tokenizer: Any,
        vae: Any,
        device: str = "cpu",
        controlnet: ZImageControlNet | None = None,
    ):
        super().__init__(transformer, text_encoder, tokenizer, vae, device)
        self.controlnet = controlnet
        self.control: ControlInput | None = None  # set for the length of one generation

    @classmethod
    def from_components(  # type: ignore[override]  # the ControlNet's file comes with the four parts
        cls, components: ZImageComponents, options: LoadOptions, controlnet: Path | None = None
    ) -> ZImageControlNetPipeline:
        """The four parts (pipeline_z_image.py), then the ControlNet for that transformer (any layout:
        models/z_image/loading_controlnet_z_image.py)."""
        from models.z_image.loading_controlnet_z_image import load_controlnet

        if controlnet is None:
            raise SettingsError("a ControlNet model needs its ControlNet file: list it in the preset's \"modules\"")
        pipe = super().from_components(components, options)
        pipe.controlnet = load_controlnet(controlnet, pipe.transformer.config, options.dtype, options.device)
        return pipe

    def components(self) -> dict[str, torch.nn.Module | None]:
        """In run order: each step runs the ControlNet, then the transformer."""
        parts = super().components()
        return {"text_encoder": parts["text_encoder"], "controlnet": self.controlnet} | {
            name: parts[name] for name in ("transformer", "vae")
        }

    def release(self) -> None:
        super().release()
        self.controlnet = None

    # -- the seam: every transformer evaluation gets the ControlNet's residuals -----------------------

    def predict(self, x: torch.Tensor, t: torch.Tensor, captions: list[torch.Tensor], **inputs: Any) -> torch.Tensor:
        assert self.control is not None, "the control context is prepared by generate"
        context = self.control.context.expand(x.shape[0], -1, -1, -1)  # one guide for the batch and both branches
        residuals = self.controlnet(self.transformer, x, t, captions, context, self.control.scale)
        return self.transformer(x, t, captions, residuals=residuals, **inputs)

    # -- generate ----------------------------------------------------------------------------------

    def _generate(
        self,
        settings: Any,
        on_step: StepCallback | None,
        before_step: BeforeStepCallback | None,
    ) -> GenerationResult:
        control, rest = split_control_settings(dict(settings))
        s = GenerationSettings.from_dict(rest)
        self.check_size(s.width, s.height)
        if getattr(s, "sample_solver", "default") != "default":  # the ControlNet reads no TwinFlow target time
            raise SettingsError(
                f"sample_solver {s.sample_solver} is for the TwinFlow weights; a ControlNet model samples with 'default'"
            )
        seed = resolve_seed(s.seed)
        timings: dict[str, float] = {}
        prompts = self.encode_prompts(s, timings)
        self.control = self.prepare_control(control, s, timings)
        try:
            latents = self.prepare_latents(s.batch_size, s.width, s.height, seed, self.vae_scale_factor).to(self.device)
            sigmas = get_sigmas(s.num_inference_steps, s.flow_shift)
            latents = self.denoise_latents(latents, sigmas, s, prompts, timings, on_step, before_step, seed=seed)
        finally:
            self.control = None
        return self.finish(latents, seed, s, prompts, timings)

    @torch.no_grad()
    def prepare_control(self, control: ControlSettings, s: GenerationSettings, timings: dict[str, float]) -> ControlInput:
        """The control context (1, control_in_dim, h, w): the guide's latents, then for v2 / v2.1 the keep
        mask and the masked picture's latents (zeros without a mask)."""
        if control.image_guide is None:
            raise SettingsError(
                "'image_guide' is required by a ControlNet model: give the control image (a pose, depth or edge map, "
                "or a picture with control_preprocess canny / soft_edge / scribble / gray)"
            )
        start = time.perf_counter()
        guide_picture = _as_pil(control.image_guide, "image_guide")
        guide = make_control_image(guide_picture, control.control_preprocess, s.width, s.height)
        guide_latents = self.encode_mode(pixels_of(guide, s.width, s.height))  # (1, 16, h, w)
        extra = self.controlnet.config.control_in_dim - guide_latents.shape[1]
        if extra == 0:  # v1: the guide alone
            if s.image_mask is not None or s.image_start is not None:
                raise SettingsError(
                    "ControlNet inpainting (image_mask, image_start) needs a v2 / v2.1 ControlNet; this model is v1 "
                    "(z_image_control): use z_image_control2 or z_image_control2_1"
                )
            context = guide_latents
        elif s.image_mask is None:
            if s.image_start is not None:
                raise SettingsError("'image_start' is the picture to repaint: give 'image_mask' too (white = repaint)")
            context = torch.cat([guide_latents, guide_latents.new_zeros(1, extra, *guide_latents.shape[2:])], dim=1)
        else:
            picture = _as_pil(s.image_start, "image_start") if s.image_start is not None else guide_picture
            context = torch.cat([guide_latents, *self.inpaint_context(picture, s)], dim=1)
        timings["vae_encode_s"] = time.perf_counter() - start  # the guide (and masked picture) encodes
        return ControlInput(context, control.control_net_weight)

    def inpaint_context(self, picture: Image.Image, s: GenerationSettings) -> tuple[torch.Tensor, torch.Tensor]:
        """(keep mask (1, 1, h, w), masked picture latents (1, 16, h, w)) for ControlNet inpainting."""
        mask = pixel_mask(_as_pil(s.image_mask, "image_mask"), s.width, s.height)  # (1, 1, H, W), 1 = repaint
        masked = pixels_of(picture, s.width, s.height) * (mask < 0.5)  # repainted region -> 0 (mid grey)
        latents = self.encode_mode(masked)
        keep = F.interpolate(1 - mask, size=latents.shape[2:], mode="nearest").to(self.device)
        return keep, latents

    def encode_mode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) pixels in [-1, 1] -> (1, 16, H/f, W/f) fp32 latents in the transformer's space: the
        mode of the VAE's latent distribution, through the `encode_image` hooks (e.g. tiling)."""
        cfg = self.vae.config
        x = pixels.to(device=self.device, dtype=self.vae.dtype)
        distribution = self.hooks.encode_image.call(lambda t: self.vae.encode(t).latent_dist, x)
        return ((distribution.mode() - cfg.shift_factor) * cfg.scaling_factor).float()


# -- inputs -----------------------------------------------------------------------------------------


def pixels_of(picture: Image.Image, width: int, height: int) -> torch.Tensor:
    """An image -> (1, 3, height, width) fp32 in [-1, 1], stretched to the size (LANCZOS), as diffusers'
    image processor does."""
    picture = picture.convert("RGB")
    if picture.size != (width, height):
        picture = picture.resize((width, height), Image.Resampling.LANCZOS)
    array = np.asarray(picture).astype(np.float32) / 255.0  # (H, W, 3)
    return 2.0 * torch.from_numpy(array).permute(2, 0, 1)[None] - 1.0


def pixel_mask(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """A mask image -> (1, 1, height, width) of 0/1: stretched (LANCZOS), to grey levels, 1 where >= half grey."""
    if image.mode not in ("L", "RGB"):  # palette, 1-bit, alpha: plain levels first
        image = image.convert("RGB")
    grey = image.resize((width, height), Image.Resampling.LANCZOS).convert("L")
    mask = torch.from_numpy(np.asarray(grey).astype(np.float32) / 255.0)[None, None]
    return (mask >= 0.5).float()


def _as_pil(image: Any, name: str) -> Image.Image:
    """Images reach the engine as PIL images from the host; a path (the engine called directly) is read."""
    return image if isinstance(image, Image.Image) else load_image(str(image), name)
