"""Control images made from a user's picture (`control_preprocess`), drawn at the generation's size.

- raw: the picture as it is (a pose, depth or edge map the user made);
- gray: grayscale (PIL's ITU-R 601-2 luma), as three equal channels;
- canny: Canny edges (Canny 1986): Gaussian blur (sigma 1), Sobel gradients, thinning to the local maxima
  along the gradient, hysteresis between two thresholds on the Sobel magnitude (100 and 200 by default, the
  values ControlNet's canny annotator passes to OpenCV); white 1-pixel lines on black;
- soft_edge: the blurred Sobel magnitude (sigma 2), scaled so its strongest edge is white (flat pictures stay
  black: SOFT_EDGE_FLOOR); a classical stand-in for HED/PiDiNet soft edges, no network is downloaded;
- scribble: Canny edges at lower thresholds (50, 100), thickened to 5-pixel strokes, as a hand scribble.
Everything runs in torch on the CPU on 8-bit values; the result is an RGB PIL image of the requested size.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common.errors import SettingsError

SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))
# The blurred Sobel magnitude (sigma 2) of a full black-to-white step peaks at 392 (measured on a straight
# step); an edge needs a sixth of that (a step of ~42 grey levels) to be drawn white.
SOFT_EDGE_FLOOR = 64.0


def make_control_image(image: Image.Image, mode: str, width: int, height: int) -> Image.Image:
    """The picture stretched to width x height (LANCZOS), then turned into the control image `mode`."""
    if mode not in PREPROCESSORS:
        raise SettingsError(f"control_preprocess {mode!r} is not one of {', '.join(PREPROCESSORS)}")
    picture = image.convert("RGB")
    if picture.size != (width, height):
        picture = picture.resize((width, height), Image.Resampling.LANCZOS)
    return PREPROCESSORS[mode](picture)


def raw(picture: Image.Image) -> Image.Image:
    return picture


def gray(picture: Image.Image) -> Image.Image:
    return picture.convert("L").convert("RGB")


def canny(picture: Image.Image, low: float = 100.0, high: float = 200.0) -> Image.Image:
    return _to_rgb(canny_edges(_luma(picture), low, high))


def soft_edge(picture: Image.Image) -> Image.Image:
    magnitude, _ = sobel(gaussian_blur(_luma(picture), 2.0))
    # Scaled by the strongest edge, but never by less than SOFT_EDGE_FLOOR: a flat or faint picture stays dark
    # instead of its rounding noise being stretched to white.
    return _to_rgb(magnitude / max(float(magnitude.max()), SOFT_EDGE_FLOOR))


def scribble(picture: Image.Image) -> Image.Image:
    edges = canny_edges(_luma(picture), 50.0, 100.0)
    return _to_rgb(F.max_pool2d(edges[None, None], 5, stride=1, padding=2)[0, 0])


PREPROCESSORS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "raw": raw,
    "canny": canny,
    "soft_edge": soft_edge,
    "scribble": scribble,
    "gray": gray,
}


# -- the steps -----------------------------------------------------------------------------------


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """(H, W) -> (H, W), separable Gaussian of radius ceil(2 sigma), borders replicated."""
    radius = max(1, math.ceil(2 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    y = F.pad(x[None, None], (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, kernel.view(1, 1, 1, -1))
    return F.conv2d(y, kernel.view(1, 1, -1, 1))[0, 0]


def sobel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, W) -> (magnitude, angle in degrees [0, 180)), 3x3 Sobel, borders replicated. y points down."""
    kx = torch.tensor(SOBEL_X)
    y = F.pad(x[None, None], (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(y, kx.view(1, 1, 3, 3))[0, 0]  # conv2d is a correlation: + to the right
    gy = F.conv2d(y, kx.t().contiguous().view(1, 1, 3, 3))[0, 0]  # + downwards
    return torch.hypot(gx, gy), torch.rad2deg(torch.atan2(gy, gx)) % 180.0


def thin(magnitude: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Non-maximum suppression: a pixel stays where it is a maximum along its gradient direction (strictly
    above the neighbour behind, at least the one ahead: a step between two pixels keeps one line)."""
    padded = F.pad(magnitude[None, None], (1, 1, 1, 1))[0, 0]
    H, W = magnitude.shape

    def shifted(dy: int, dx: int) -> torch.Tensor:
        return padded[1 + dy : 1 + dy + H, 1 + dx : 1 + dx + W]

    # direction bins (y down): 0 = horizontal gradient, 45 = down-right, 90 = vertical, 135 = down-left
    bins = (((angle + 22.5) % 180.0) // 45.0).long()
    keep = torch.zeros_like(magnitude, dtype=torch.bool)
    for index, (dy, dx) in enumerate(((0, 1), (1, 1), (1, 0), (1, -1))):
        local = (magnitude > shifted(-dy, -dx)) & (magnitude >= shifted(dy, dx))
        keep |= (bins == index) & local
    return torch.where(keep, magnitude, torch.zeros_like(magnitude))


def hysteresis(thinned: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Edges: pixels >= high, and pixels >= low connected to them through such pixels (8-neighbours)."""
    weak = (thinned >= low).float()
    edges = (thinned >= high).float()
    while True:
        grown = F.max_pool2d(edges[None, None], 3, stride=1, padding=1)[0, 0] * weak
        if torch.equal(grown, edges):
            return edges
        edges = grown


def canny_edges(luma: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """(H, W) 8-bit luma values -> (H, W) of 0/1 edges."""
    if not 0 <= low <= high:
        raise SettingsError(f"Canny thresholds must satisfy 0 <= low <= high (got {low}, {high})")
    magnitude, angle = sobel(gaussian_blur(luma, 1.0))
    return hysteresis(thin(magnitude, angle), low, high)


def _luma(picture: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(picture.convert("L"), dtype=np.float32))


def _to_rgb(values: torch.Tensor) -> Image.Image:
    """(H, W) in [0, 1] -> an RGB image with three equal channels."""
    array = (values.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(array, mode="L").convert("RGB")
