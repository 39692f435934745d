"""Guards against silent black images and precisions that overflow.

- `compute_dtype`: the weights/compute dtype for a device, chosen once at the edge: bf16 on GPUs with
  native bf16 (compute capability >= 8.0), fp32 elsewhere. fp16 is refused: Z-Image's activations
  exceed fp16's range (65504) in the residual stream, which turns the image into NaN (black).
- `BlackImageGuard`: decoded pixels with NaN/inf, or an all-black decode, raise
  `NonFiniteOutputError` with what to change instead of being saved.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from common.errors import NonFiniteOutputError, SettingsError
from host.transforms import hooks_of

log = logging.getLogger(__name__)

BF16_MIN_CAPABILITY = 80  # Ampere: native bf16 matmuls
BLACK_LEVEL = 1 / 255  # an image whose every pixel is below this (in [0, 1]) is "all black"
ADVICE = (
    "Try: --attention sdpa (another attention backend), the VAE in fp32 (the default), bf16/fp32 weights "
    "instead of int8 (--quantization bf16), and never fp16."
)


def compute_dtype(device: str, capability: int | None, requested: str | None = None) -> torch.dtype:
    """bf16 on CUDA GPUs with compute capability >= 8.0, else fp32; `requested` "bf16"/"fp32" may force one.

    Raises SettingsError for fp16 (overflows) and for bf16 on a GPU without native bf16.
    """
    if requested == "fp16":
        raise SettingsError(
            "fp16 is not supported: Z-Image's activations overflow fp16's range (max 65504) and the image turns "
            "black. Use bf16 (GPUs with compute capability >= 8.0, e.g. RTX 30xx and newer) or fp32."
        )
    on_gpu = str(device).startswith("cuda")
    if requested == "fp32" or not on_gpu:
        return torch.float32
    if capability is not None and capability < BF16_MIN_CAPABILITY:
        if requested == "bf16":
            raise SettingsError(
                f"this GPU (compute capability {capability / 10:.1f}) has no native bf16; use fp32 (the default here)"
            )
        log.info(
            "GPU compute capability %.1f < 8.0: computing in fp32 (fp16 overflows, bf16 is emulated)", capability / 10
        )
        return torch.float32
    return torch.bfloat16


def check_pixels(pixels: torch.Tensor) -> None:
    """pixels: decoded (B, 3, H, W) in [-1, 1]. NaN/inf or all black -> NonFiniteOutputError."""
    if not torch.isfinite(pixels).all():
        raise NonFiniteOutputError(f"the VAE decode produced NaN/inf, so the image would be black. {ADVICE}")
    brightest = ((pixels.float() + 1) / 2).amax(dim=(1, 2, 3))  # per image, in [0, 1]
    if bool((brightest < BLACK_LEVEL).any()):
        raise NonFiniteOutputError(
            f"the decoded image is all black (brightest pixel {float(brightest.min()) * 255:.2f}/255). {ADVICE}"
        )


@dataclass
class BlackImageGuard:
    """`check_pixels` on every decode of the model, outermost on its `decode` hook (a transform)."""

    name: str = "black_image_guard"
    reversible: bool = True

    def apply(self, model: Any) -> None:
        def guarded(call_next: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor) -> torch.Tensor:
            pixels = call_next(z)
            check_pixels(pixels)
            return pixels

        hooks_of(model).decode.add(self.name, guarded, outermost=True)

    def remove(self, model: Any) -> None:
        hooks_of(model).decode.remove(self.name)
