"""Lean VAE decode: the stock decoder's pixels with a lower memory peak.

diffusers' `Decoder.forward` keeps each up block's input alive while the block runs, its `ResnetBlock2D`s run
SiLU out of place, and an `Upsample2D` interpolates the whole map 2x before its 3x3 convolution. At the last,
full-resolution stages three or four full-size maps are alive together, and that is the decode's peak, the
highest point of a whole generation on bench_engine's mid model. The lean walk computes the same operations
with fewer of them alive:

- the walk drops each block's input as soon as the block no longer needs it (the stock walk holds it in a local
  variable until the block returns);
- SiLU runs in place on the fresh output of a GroupNorm;
- a `ResnetBlock2D` whose input is large runs its first GroupNorm -> SiLU -> 3x3 convolution in row strips
  written into the output, so the normalised map never exists whole: the GroupNorm's statistics are taken over
  the whole map first, in fp32;
- an `Upsample2D` (nearest 2x, then a 3x3 convolution) runs in row strips written into the output, so the
  interpolated map never exists whole.

Everything is the stock arithmetic except the streamed GroupNorm's statistics (`torch.var_mean` instead of the
fused kernel) and the strips' convolution shapes: tests/test_lean_decode.py holds the pixels to the stock
decoder's within 1e-5 in fp32. What the walk does not recognise (another block type, a latent embedding for
the norms, gradients on, weights not on the map's device, a quantized convolution) runs through the stock
forward. `LeanDecode` installs the walk as the decoder's own `forward`, before mmgp wraps the parts, so mmgp's
loading hooks run around it; the children it calls through their modules keep their own hooks.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.model_facts import DECODER, ModelFacts
from host.transforms import component

STREAM_BYTES = 16 << 20  # a ResnetBlock2D input at least this large is streamed (smaller ones run whole)
STRIPS = 16  # a streamed map is cut into about this many row strips (at least MIN_ROWS rows each)
MIN_ROWS = 8


@dataclass
class LeanDecode:
    """The lean walk (`lean_decoder_forward`) as the `forward` of every diffusers-style `Decoder` (a module with
    conv_in, mid_block, up_blocks, conv_norm_out, conv_act, conv_out) inside the model's decoder components."""

    facts: ModelFacts | None = None
    name: str = "lean_decode"
    reversible: bool = True

    def apply(self, model: Any) -> None:
        for decoder in self._decoders(model):
            decoder.forward = functools.partial(lean_decoder_forward, decoder)

    def remove(self, model: Any) -> None:
        for decoder in self._decoders(model):
            forward = decoder.__dict__.get("forward")
            if isinstance(forward, functools.partial) and forward.func is lean_decoder_forward:
                del decoder.forward

    def _decoders(self, model: Any) -> list[nn.Module]:
        names = [c.name for c in self.facts.components if c.role == DECODER] if self.facts is not None else ["vae"]
        found = []
        for name in names:
            part = component(model, name)
            if isinstance(part, nn.Module):
                found += [m for m in part.modules() if is_walkable_decoder(m)]
        return found


def is_walkable_decoder(module: nn.Module) -> bool:
    """A diffusers `Decoder`: the parts the lean walk calls, in the stock walk's order."""
    return all(hasattr(module, a) for a in ("conv_in", "mid_block", "up_blocks", "conv_norm_out", "conv_act", "conv_out"))


def lean_decoder_forward(decoder: nn.Module, sample: torch.Tensor, latent_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """`Decoder.forward(sample)` with a lower peak (module docstring); anything unusual goes the stock way."""
    if latent_embeds is not None or torch.is_grad_enabled() or decoder.training:
        return type(decoder).forward(decoder, sample, latent_embeds)
    held = [decoder.conv_in(sample)]
    del sample
    held.append(decoder.mid_block(held.pop(), None))
    for up_block in decoder.up_blocks:
        _trim()
        held.append(_up_block(up_block, held))
    h = decoder.conv_norm_out(held.pop())
    h = F.silu(h, inplace=True) if type(decoder.conv_act) is nn.SiLU else decoder.conv_act(h)
    return decoder.conv_out(h)


def _trim() -> None:
    from host.lowvram.heap import malloc_trim

    trim = malloc_trim()
    if trim is not None:
        trim()


def _up_block(block: nn.Module, held: list[torch.Tensor]) -> torch.Tensor:
    """An `UpDecoderBlock2D` (resnets, then upsamplers) fed from `held` (emptied: the input is freed as early as the
    block allows); any other block runs as it is."""
    if type(block).__name__ != "UpDecoderBlock2D":
        return block(held.pop(), None)
    for resnet in block.resnets:
        held.append(_resnet(resnet, held))
    for upsampler in block.upsamplers or ():
        held.append(_upsample(upsampler, held))
    return held.pop()


def _plain_resnet(resnet: nn.Module) -> bool:
    """A VAE `ResnetBlock2D`: no time embedding, no resampling, SiLU, GroupNorms."""
    return (
        type(resnet).__name__ == "ResnetBlock2D"
        and resnet.upsample is None
        and resnet.downsample is None
        and resnet.time_emb_proj is None
        and resnet.time_embedding_norm in ("default", "group")  # without a time embedding: norm2 alone
        and type(resnet.nonlinearity) is nn.SiLU
        and type(resnet.norm1) is nn.GroupNorm
        and type(resnet.norm2) is nn.GroupNorm
        and not resnet.training
    )


def _resnet(resnet: nn.Module, held: list[torch.Tensor]) -> torch.Tensor:
    """ResnetBlock2D.forward(x) = (shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))) / output_scale_factor."""
    if not _plain_resnet(resnet):
        return resnet(held.pop(), None)
    x = held.pop()
    if x.numel() * x.element_size() >= STREAM_BYTES and _streamable(resnet.norm1, resnet.conv1, x):
        h = _norm_silu_conv_strips(x, resnet.norm1, resnet.conv1)
    else:
        h = resnet.conv1(F.silu(resnet.norm1(x), inplace=True))
    shortcut = resnet.conv_shortcut(x) if resnet.conv_shortcut is not None else x
    del x
    h = resnet.conv2(resnet.dropout(F.silu(resnet.norm2(h), inplace=True)))
    h.add_(shortcut)  # h + shortcut == shortcut + h exactly: the stock sum, in h's fresh storage
    del shortcut
    if resnet.output_scale_factor != 1:
        h.div_(resnet.output_scale_factor)
    return h


def _plain_conv3(conv: nn.Module, x: torch.Tensor) -> bool:
    """A 3x3, stride-1, zero-padded-by-1 `nn.Conv2d` whose weights are on x's device and dtype."""
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and conv.weight.device == x.device
        and conv.weight.dtype == x.dtype
    )


def _streamable(norm: nn.GroupNorm, conv: nn.Module, x: torch.Tensor) -> bool:
    return norm.affine and norm.weight.device == x.device and _plain_conv3(conv, x) and x.dim() == 4


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() else torch.contiguous_format


def _rows_per_strip(height: int) -> int:
    return max(MIN_ROWS, math.ceil(height / STRIPS))


def _conv3_rows(conv: nn.Conv2d, rows: torch.Tensor, first: bool, last: bool, fmt: torch.memory_format) -> torch.Tensor:
    """conv over `rows`, which carry one halo row above and below except at the map's top (first) and bottom
    (last), where the zero padding goes instead: the output has the rows between the halos."""
    if first or last:
        rows = F.pad(rows, (0, 0, int(first), int(last)))
    return F.conv2d(rows.contiguous(memory_format=fmt), conv.weight, conv.bias, 1, (0, 1))


def _group_stats(x: torch.Tensor, groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (item, group) mean and 1/std over the group's channels and all pixels, in fp32: (N, G) each."""
    N, C = x.shape[:2]
    if x.dtype in (torch.float32, torch.float64):
        var, mean = torch.var_mean(x.view(N, groups, C // groups, *x.shape[2:]), dim=(2, 3, 4), correction=0)
    else:  # half precision: one group at a time in fp32, a copy of 1/G of the map, never of the whole
        stats = [torch.var_mean(part.float(), dim=(1, 2, 3), correction=0) for part in x.chunk(groups, dim=1)]
        var, mean = torch.stack([v for v, _ in stats], 1), torch.stack([m for _, m in stats], 1)
    return mean, torch.rsqrt(var + eps)


def _norm_silu_conv_strips(x: torch.Tensor, norm: nn.GroupNorm, conv: nn.Conv2d) -> torch.Tensor:
    """conv(silu(norm(x))) computed in row strips into one output: the normalised map exists a strip at a time."""
    N, C, H, W = x.shape
    G = norm.num_groups
    mean, rstd = _group_stats(x, G, norm.eps)
    scale = rstd[:, :, None] * norm.weight.float().view(1, G, C // G)  # (N, G, C/G): y = x * scale + shift
    shift = norm.bias.float().view(1, G, C // G) - mean[:, :, None] * scale
    scale, shift = scale.reshape(N, C, 1, 1), shift.reshape(N, C, 1, 1)
    fmt = _memory_format(x)
    out = torch.empty((N, conv.out_channels, H, W), dtype=x.dtype, device=x.device, memory_format=fmt)
    step = _rows_per_strip(H)
    for r0 in range(0, H, step):
        r1 = min(r0 + step, H)
        lo, hi = max(r0 - 1, 0), min(r1 + 1, H)
        rows = torch.addcmul(shift, x[:, :, lo:hi].float(), scale).to(x.dtype)
        out[:, :, r0:r1] = _conv3_rows(conv, F.silu(rows, inplace=True), r0 == 0, r1 == H, fmt)
    return out


def _upsample(upsampler: nn.Module, held: list[torch.Tensor]) -> torch.Tensor:
    """Upsample2D: nearest 2x then a 3x3 convolution, in row strips when it is the plain kind."""
    x = held.pop()
    plain = (
        type(upsampler).__name__ == "Upsample2D"
        and upsampler.use_conv
        and not upsampler.use_conv_transpose
        and upsampler.interpolate
        and upsampler.norm is None
        and upsampler.name == "conv"
        and x.dim() == 4
        and _plain_conv3(upsampler.conv, x)
    )
    if not plain:
        return upsampler(x)
    N, C, h, w = x.shape
    H = 2 * h
    fmt = _memory_format(x)
    conv = upsampler.conv
    out = torch.empty((N, conv.out_channels, H, 2 * w), dtype=x.dtype, device=x.device, memory_format=fmt)
    step = max(1, _rows_per_strip(H) // 2)  # low-resolution rows per strip
    for a in range(0, h, step):
        b = min(a + step, h)
        lo, hi = max(a - 1, 0), min(b + 1, h)
        up = F.interpolate(x[:, :, lo:hi], scale_factor=2.0, mode="nearest")  # upsampled rows [2 lo, 2 hi)
        need_lo, need_hi = max(2 * a - 1, 0), min(2 * b + 1, H)  # what output rows [2a, 2b) read
        rows = up[:, :, need_lo - 2 * lo : need_hi - 2 * lo]
        out[:, :, 2 * a : 2 * b] = _conv3_rows(conv, rows, a == 0, b == h, fmt)
    return out
