"""Tiled VAE decode and encode: bounded memory for large images, seams blended away.

The latent is cut into overlapping tiles; each is decoded alone and the pixel tiles are blended with
weights that ramp linearly across the overlap (1 in a tile's interior, falling towards its inner edges;
image borders keep weight 1), then normalised by the summed weights. The decoder's receptive field is
finite, so with enough overlap each output pixel sees almost the context it would see untiled.

`VaeTilingTransform` installs it on a model's decode / encode-image hooks: above `min_latent` latent
pixels per side (or always / never), the model's decodes and encodes go through the tiles.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from host.transforms import hooks_of

log = logging.getLogger(__name__)

VAE_SCALE = 8  # pixels per latent pixel
# Decode peak memory grows with the pixel count: ~4.2 kB of activations per output pixel in fp32 for the
# Flux VAE (measured by bench/bench_lowvram.py --vae: 1.06-1.10 GB at 512x512, so ~4.4 GB at 1024x1024).
# Above 1024 px per side (128 latent pixels) tiles of 512 px keep the decode near 1.1 GB.
DEFAULT_MIN_LATENT = 128
DEFAULT_TILE = 64  # latent pixels per tile side (512 px)
DEFAULT_OVERLAP = 16  # latent pixels (128 px)


@dataclass(frozen=True)
class TilingOptions:
    """mode: "auto" (tile above min_latent per side), "always" or "never"."""

    mode: str = "auto"
    tile: int = DEFAULT_TILE
    overlap: int = DEFAULT_OVERLAP
    min_latent: int = DEFAULT_MIN_LATENT

    def wants(self, height: int, width: int) -> bool:
        if self.mode == "always":
            return height > self.tile or width > self.tile
        return self.mode == "auto" and max(height, width) > self.min_latent


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering [0, size) with tiles of `tile` overlapping by at least `overlap`."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    count = -(-(size - overlap) // stride)  # ceil
    last = size - tile
    return [round(i * last / (count - 1)) for i in range(count)]  # spread evenly, last one flush


def blend_ramp(length: int, overlap: int, at_start: bool, at_end: bool) -> torch.Tensor:
    """1-D weights (length,): linear ramp over `overlap` at inner edges, 1 at image borders."""
    w = torch.ones(length, device="cpu")
    if overlap <= 0:
        return w
    ramp = (torch.arange(overlap, dtype=torch.float32, device="cpu") + 0.5) / overlap
    if not at_start:
        w[:overlap] = torch.minimum(w[:overlap], ramp)
    if not at_end:
        w[-overlap:] = torch.minimum(w[-overlap:], ramp.flip(0))
    return w


def tiled_apply(
    x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], tile: int, overlap: int, scale: float
) -> torch.Tensor:
    """Apply `fn` to overlapping tiles of x (B, C, H, W) and blend; fn maps a tile (h, w) to (h*scale, w*scale)."""
    B, _, H, W = x.shape
    rows, cols = tile_starts(H, tile, overlap), tile_starts(W, tile, overlap)
    out = weight = None
    for r in rows:
        for c in cols:
            piece = fn(x[:, :, r : r + tile, c : c + tile]).float()  # (B, C', h*s, w*s)
            if out is None:
                out = piece.new_zeros(B, piece.shape[1], round(H * scale), round(W * scale))
                weight = piece.new_zeros(1, 1, out.shape[2], out.shape[3])
            ph, pw = piece.shape[2:]
            o = round(overlap * scale)
            wy = blend_ramp(ph, o, r == rows[0], r == rows[-1]).to(piece.device)
            wx = blend_ramp(pw, o, c == cols[0], c == cols[-1]).to(piece.device)
            w = (wy[:, None] * wx[None, :])[None, None]
            y0, x0 = round(r * scale), round(c * scale)
            out[:, :, y0 : y0 + ph, x0 : x0 + pw] += piece * w
            weight[:, :, y0 : y0 + ph, x0 : x0 + pw] += w
    assert out is not None and weight is not None
    return out / weight


def tiled_decode(
    decode: Any, z: torch.Tensor, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP, scale: int = VAE_SCALE
) -> torch.Tensor:
    """Decode latents (B, C, h, w) tile by tile -> pixels (B, 3, scale*h, scale*w) fp32.

    decode: latents -> pixels (e.g. the next entry of a model's decode hook), or a diffusers VAE.
    """
    if hasattr(decode, "decode"):
        vae = decode
        decode = lambda t: vae.decode(t, return_dict=False)[0]  # noqa: E731
    return tiled_apply(z, decode, tile, overlap, scale)


def tiled_encode(
    encode: Any, pixels: torch.Tensor, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP, scale: int = VAE_SCALE
) -> torch.Tensor:
    """Encode pixels (B, 3, H, W) tile by tile -> latent means (B, C, H/scale, W/scale) fp32 (tile sizes in
    latent pixels). encode: pixels -> latent distribution (`.mode()`), or a diffusers VAE."""
    if hasattr(encode, "encode"):
        vae = encode
        encode = lambda t: vae.encode(t).latent_dist  # noqa: E731
    tile_px, overlap_px = tile * scale, overlap * scale
    return tiled_apply(pixels, lambda t: encode(t).mode(), tile_px, overlap_px, 1 / scale)


@dataclass
class VaeTilingTransform:
    """Tiles on a model's `decode` and `encode_image` hooks when the options ask for them (a transform,
    host/transforms.py). The model's `vae_scale_factor` (pixels per latent pixel) is used when it has one."""

    options: TilingOptions = field(default_factory=TilingOptions)
    name: str = "vae_tiling"
    reversible: bool = True

    def apply(self, model: Any) -> None:
        hooks = hooks_of(model)
        hooks.decode.add(self.name, self._decode(model))
        hooks.encode_image.add(self.name, self._encode(model))

    def remove(self, model: Any) -> None:
        hooks = hooks_of(model)
        hooks.decode.remove(self.name)
        hooks.encode_image.remove(self.name)

    def _decode(self, model: Any) -> Callable[..., torch.Tensor]:
        def decode(call_next: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor) -> torch.Tensor:
            opts = self.options
            if not opts.wants(z.shape[-2], z.shape[-1]):
                return call_next(z)
            log.debug("tiled VAE decode of a %dx%d latent", z.shape[-2], z.shape[-1])
            return tiled_decode(call_next, z, opts.tile, opts.overlap, _scale(model)).to(z.dtype)

        return decode

    def _encode(self, model: Any) -> Callable[..., Any]:
        def encode(call_next: Callable[[torch.Tensor], Any], x: torch.Tensor) -> Any:
            opts, scale = self.options, _scale(model)
            if not opts.wants(x.shape[-2] // scale, x.shape[-1] // scale):
                return call_next(x)
            return _PointDistribution(tiled_encode(call_next, x, opts.tile, opts.overlap, scale).to(x.dtype))

        return encode


def _scale(model: Any) -> int:
    return int(getattr(model, "vae_scale_factor", VAE_SCALE))


class _PointDistribution:
    """The tiled encoder's result in the shape of diffusers' latent distribution (its mean)."""

    def __init__(self, mean: torch.Tensor):
        self.mean = mean

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """The mean (the tiles give no spread), after drawing, unused, the noise an untiled sample draws:
        what `generator` gives next (image-to-image's noise) is then the same as without tiling."""
        if generator is not None:
            torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype, device=generator.device)
        return self.mean
