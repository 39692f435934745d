"""Guards against silent black images (the compute dtype itself is chosen in host/device.py).

- `BlackImageGuard`: decoded pixels with NaN/inf, or an all-black decode, raise
  `NonFiniteOutputError` with what to change instead of being saved.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from common.errors import NonFiniteOutputError
from host.transforms import hooks_of

log = logging.getLogger(__name__)

BLACK_LEVEL = 1 / 255  # an image whose every pixel is below this (in [0, 1]) is "all black"
ADVICE = (
    "Try: --attention sdpa (another attention backend), the VAE in fp32 (the default), bf16/fp32 weights "
    "instead of int8 (--quantization bf16), and never fp16."
)


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
