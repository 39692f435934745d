"""Tiled VAE decode and encode: bounded memory for large images, seams blended away.

The latent is cut into overlapping tiles; each is decoded alone and the pixel tiles are blended with
weights that ramp linearly across the overlap (1 in a tile's interior, falling towards its inner edges;
image borders keep weight 1), then normalised by the summed weights. The decoder's receptive field is
finite, so with enough overlap each output pixel sees almost the context it would see untiled.

`enable_tiling(vae, ...)` installs it as a transform on a diffusers-style VAE (`decode(z,
return_dict=False)[0]`, `encode(x).latent_dist`): above `min_latent_size` latent pixels per side (or
always / never), the VAE's own decode/encode calls go through the tiles.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

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


def tiled_decode(vae: Any, z: torch.Tensor, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP) -> torch.Tensor:
    """Decode latents (B, 16, h, w) tile by tile -> pixels (B, 3, 8h, 8w) fp32."""
    decode = getattr(vae, "_untiled_decode", vae.decode)
    return tiled_apply(z, lambda t: decode(t, return_dict=False)[0], tile, overlap, VAE_SCALE)


def tiled_encode(
    vae: Any, pixels: torch.Tensor, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP
) -> torch.Tensor:
    """Encode pixels (B, 3, H, W) tile by tile -> latent means (B, 16, H/8, W/8) fp32 (tile sizes in latent pixels)."""
    encode = getattr(vae, "_untiled_encode", vae.encode)
    tile_px, overlap_px = tile * VAE_SCALE, overlap * VAE_SCALE
    return tiled_apply(pixels, lambda t: encode(t).latent_dist.mode(), tile_px, overlap_px, 1 / VAE_SCALE)


def enable_tiling(vae: Any, options: TilingOptions | None = None) -> Any:
    """Route the VAE's decode/encode through tiles when `options` ask for it (idempotent); returns vae."""
    options = options or TilingOptions()
    if hasattr(vae, "_untiled_decode"):
        vae._tiling = options
        return vae
    vae._untiled_decode, vae._untiled_encode, vae._tiling = vae.decode, vae.encode, options

    def decode(z: torch.Tensor, return_dict: bool = True, **kwargs: Any) -> Any:
        opts = vae._tiling
        if not opts.wants(z.shape[-2], z.shape[-1]):
            return vae._untiled_decode(z, return_dict=return_dict, **kwargs)
        log.debug("tiled VAE decode of a %dx%d latent", z.shape[-2], z.shape[-1])
        pixels = tiled_decode(vae, z, opts.tile, opts.overlap).to(z.dtype)
        return (pixels,) if not return_dict else SimpleNamespace(sample=pixels)

    def encode(x: torch.Tensor, return_dict: bool = True, **kwargs: Any) -> Any:
        opts = vae._tiling
        h, w = x.shape[-2] // VAE_SCALE, x.shape[-1] // VAE_SCALE
        if not opts.wants(h, w):
            return vae._untiled_encode(x, return_dict=return_dict, **kwargs)
        mean = tiled_encode(vae, x, opts.tile, opts.overlap).to(x.dtype)
        dist = _PointDistribution(mean)
        return (dist,) if not return_dict else SimpleNamespace(latent_dist=dist)

    vae.decode, vae.encode = decode, encode
    return vae


class _PointDistribution:
    """The tiled encoder's result in the shape of diffusers' latent distribution (its mean)."""

    def __init__(self, mean: torch.Tensor):
        self.mean = mean

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean
