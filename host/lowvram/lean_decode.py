"""Lean VAE decode: the stock decoder's pixels with a lower memory peak.

diffusers' `Decoder.forward` keeps each up block's input alive while the block runs, its `ResnetBlock2D`s run
SiLU out of place, and an `Upsample2D` interpolates the whole map 2x before its 3x3 convolution. At the last,
full-resolution stages three or four full-size maps are alive together, and that is the decode's peak, the
highest point of a whole generation on bench_engine's mid model. The lean walk computes the same operations
with fewer of them alive:

- the walk drops each block's input as soon as the block no longer needs it (the stock walk holds it in a local
  variable until the block returns), and SiLU runs in place on the fresh output of a GroupNorm;
- an `Upsample2D` (nearest 2x, then a 3x3 convolution) runs in row strips, so the interpolated map never exists
  whole, and hands its output on as a `RowStrips` map: row blocks with their own storage;
- a `ResnetBlock2D` whose input is large runs both GroupNorm -> SiLU -> 3x3 convolution halves in row strips,
  so no normalised map exists whole (the GroupNorm statistics are taken over the whole map first); a strip
  map input is consumed block by block, its 1x1 shortcut taken per block and each block freed once read, and
  the second half's strips are added into the shortcut's storage.

Measured (tests/test_lean_decode.py's mid VAE, 64 channels at 512x512, channels-last): peak over the start
203 MB stock, 97 MB lean; `bench/bench_lowvram.py --vae` has the Flux VAE's. The arithmetic is the stock one
except the streamed GroupNorm statistics (shifted sums per channel, fp64 across strips, instead of the fused
kernel) and the strips' convolution shapes: the tests hold the pixels to the stock decoder's within 1e-5 in
fp32, and bit-equal where nothing is streamed. What the walk does not recognise (another block type, a latent
embedding for the norms, gradients on, weights not on the map's device or dtype, a quantized convolution) runs
the stock way. `LeanDecode` installs the walk as the decoder's own `forward`, before mmgp wraps the parts, so
mmgp's loading hooks run around it; the children it calls through their modules keep their own hooks.
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
    held: list[Map] = [decoder.conv_in(sample)]
    del sample
    held.append(decoder.mid_block(held.pop(), None))
    for up_block in decoder.up_blocks:
        held.append(_up_block(up_block, held))
    h = decoder.conv_norm_out(_whole(held.pop()))
    h = F.silu(h, inplace=True) if type(decoder.conv_act) is nn.SiLU else decoder.conv_act(h)
    return decoder.conv_out(h)


class RowStrips:
    """A (N, C, H, W) map held as row blocks with their own storage, top to bottom: what an upsampling hands to
    the next resnet, which reads it a block at a time and frees each block once its rows are used."""

    def __init__(self, parts: list[torch.Tensor]):
        self.parts: list[torch.Tensor | None] = list(parts)
        self.starts = [0]
        for part in parts:
            self.starts.append(self.starts[-1] + part.shape[2])
        first = parts[0]
        self.shape = (*first.shape[:2], self.starts[-1], first.shape[3])
        self.dtype, self.device, self.format = first.dtype, first.device, _memory_format(first)

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def dim(self) -> int:
        return 4

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi): a view when they lie in one block, else a copy of the pieces."""
        pieces = []
        for i, part in enumerate(self.parts):
            a, b = max(lo, self.starts[i]), min(hi, self.starts[i + 1])
            if a < b:
                if part is None:
                    raise RuntimeError(f"rows {a}-{b} of a strip map were read after being freed")
                pieces.append(part[:, :, a - self.starts[i] : b - self.starts[i]])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)

    def release(self, i: int) -> None:
        self.parts[i] = None

    def whole(self) -> torch.Tensor:
        out = self.rows(0, self.shape[2]).contiguous(memory_format=self.format)
        self.parts = [None] * len(self.parts)
        return out


Map = torch.Tensor | RowStrips


def _whole(x: Map) -> torch.Tensor:
    return x.whole() if isinstance(x, RowStrips) else x


def _up_block(block: nn.Module, held: list[Map]) -> Map:
    """An `UpDecoderBlock2D` (resnets, then upsamplers) fed from `held` (emptied: the input is freed as early as the
    block allows); any other block runs as it is."""
    if type(block).__name__ != "UpDecoderBlock2D":
        return block(_whole(held.pop()), None)
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


def _big(x: Map) -> bool:
    return x.numel() * x.element_size() >= STREAM_BYTES


def _resnet(resnet: nn.Module, held: list[Map]) -> torch.Tensor:
    """ResnetBlock2D.forward(x) = (shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))) / output_scale_factor.

    Large maps: both GroupNorm -> SiLU -> conv halves run in strips; a strip map input is consumed block by block,
    its 1x1 shortcut taken per block; the second half's strips are added into the shortcut's storage (the stock
    sum, shortcut + h, element by element)."""
    x = held.pop()
    if not _plain_resnet(resnet):
        return resnet(_whole(x), None)
    stream = _big(x) and _streamable(resnet.norm1, resnet.conv1, x)
    if isinstance(x, RowStrips) and not (stream and resnet.conv_shortcut is not None):
        x = x.whole()
    if isinstance(x, RowStrips):
        h, shortcut = _norm_silu_conv(x, resnet.norm1, resnet.conv1, shortcut=resnet.conv_shortcut)
    else:
        if stream:
            h, _ = _norm_silu_conv(RowStrips([x]), resnet.norm1, resnet.conv1)
        else:
            h = resnet.conv1(F.silu(resnet.norm1(x), inplace=True))
        shortcut = resnet.conv_shortcut(x) if resnet.conv_shortcut is not None else x
    del x
    if _big(h) and _streamable(resnet.norm2, resnet.conv2, h) and shortcut.shape == h.shape:
        # the walk made this map and holds its only reference (an identity shortcut is the block's own input)
        out, _ = _norm_silu_conv(RowStrips([h]), resnet.norm2, resnet.conv2, into=shortcut)
        del h
    else:
        out = resnet.conv2(resnet.dropout(F.silu(resnet.norm2(h), inplace=True)))
        del h
        out.add_(shortcut)  # out + shortcut == shortcut + out exactly: the stock sum, in a fresh storage
    del shortcut
    if resnet.output_scale_factor != 1:
        out.div_(resnet.output_scale_factor)
    return out


def _plain_conv3(conv: nn.Module, x: Map) -> bool:
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


def _streamable(norm: nn.GroupNorm, conv: nn.Module, x: Map) -> bool:
    return norm.affine and norm.weight.device == x.device and x.dim() == 4 and _plain_conv3(conv, x)


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


def _group_stats(x: Map, groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and 1/std per (item, group) of a map, (N, G) each, read a strip at a time (no copy of the whole).

    Per channel, the sums of (x - s) and (x - s)^2 in fp32 per strip, added up in fp64, with s one pixel of that
    channel (shifted data keeps the variance free of cancellation); then the groups' moments from their
    channels' (equal counts: the mean of the means, the mean of the variances plus the variance of the means).
    Measured on a 64-channel 512x512 channels-last map: 12 ms, where torch.var_mean took 135 ms."""
    parts = [x] if isinstance(x, torch.Tensor) else x.parts
    N, C, H, W = x.shape
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    shift = parts[0][:, :, :1, :1].to(work)  # (N, C, 1, 1)
    s1 = torch.zeros((N, C), dtype=torch.float64, device=x.device)
    s2 = torch.zeros((N, C), dtype=torch.float64, device=x.device)
    step = _rows_per_strip(H)
    for part in parts:
        for r0 in range(0, part.shape[2], step):
            d = part[:, :, r0 : r0 + step].to(work) - shift
            s1 += d.sum(dim=(2, 3)).double()
            s2 += d.square_().sum(dim=(2, 3)).double()
            del d
    n = H * W
    mean_c = s1 / n
    var_c = (s2 / n - mean_c**2).clamp_min(0)
    mean_c = mean_c + shift.view(N, C).double()
    mean_c, var_c = mean_c.view(N, groups, C // groups), var_c.view(N, groups, C // groups)
    mean = mean_c.mean(-1)
    var = (var_c + (mean_c - mean[..., None]) ** 2).mean(-1)
    out = torch.float64 if x.dtype == torch.float64 else torch.float32
    return mean.to(out), torch.rsqrt(var + eps).to(out)


def _norm_silu_conv(
    x: RowStrips, norm: nn.GroupNorm, conv: nn.Conv2d, into: torch.Tensor | None = None, shortcut: nn.Module | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """conv(silu(norm(x))) in row strips: the normalised map exists a strip at a time.

    into: add the result into this map (in place) instead of a new one. shortcut: also return shortcut(x),
    a 1x1 convolution taken block by block; x's blocks are then freed as soon as no strip needs them (x must be
    a strip map the caller gave away)."""
    N, C, H, W = x.shape
    G = norm.num_groups
    mean, rstd = _group_stats(x, G, norm.eps)
    scale = rstd[:, :, None] * norm.weight.to(mean.dtype).view(1, G, C // G)  # (N, G, C/G): y = x * scale + shift
    shift = norm.bias.to(mean.dtype).view(1, G, C // G) - mean[:, :, None] * scale
    scale, shift = scale.reshape(N, C, 1, 1), shift.reshape(N, C, 1, 1)
    fmt = x.format
    out = into if into is not None else torch.empty((N, conv.out_channels, H, W), dtype=x.dtype, device=x.device, memory_format=fmt)
    short = None
    if len(x.parts) > 1:  # strips = the blocks
        bounds = list(zip(x.starts[:-1], x.starts[1:], strict=True))
    else:
        step = _rows_per_strip(H)
        bounds = [(r0, min(r0 + step, H)) for r0 in range(0, H, step)]
    for i, (r0, r1) in enumerate(bounds):
        lo, hi = max(r0 - 1, 0), min(r1 + 1, H)
        rows = torch.addcmul(shift, x.rows(lo, hi).to(shift.dtype), scale).to(x.dtype)
        y = _conv3_rows(conv, F.silu(rows, inplace=True), r0 == 0, r1 == H, fmt)
        del rows
        if into is not None:
            out[:, :, r0:r1].add_(y)  # out + y == the stock y + out, element by element
        else:
            out[:, :, r0:r1] = y
        del y
        if shortcut is not None:
            part = shortcut(x.rows(r0, r1))  # 1x1: rows map to rows
            if short is None:
                short = torch.empty((N, part.shape[1], H, W), dtype=part.dtype, device=part.device, memory_format=fmt)
            short[:, :, r0:r1] = part
            if i > 0:
                x.release(i - 1)  # strip i + 1 reads rows of block i and i + 1 only
    return out, short


def _upsample(upsampler: nn.Module, held: list[Map]) -> Map:
    """Upsample2D: nearest 2x then a 3x3 convolution; the plain kind in row strips, returned as a strip map."""
    x = _whole(held.pop())
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
    h = x.shape[2]
    H = 2 * h
    fmt = _memory_format(x)
    parts = []
    step = max(1, _rows_per_strip(H) // 2)  # low-resolution rows per strip
    for a in range(0, h, step):
        b = min(a + step, h)
        lo, hi = max(a - 1, 0), min(b + 1, h)
        up = F.interpolate(x[:, :, lo:hi], scale_factor=2.0, mode="nearest")  # upsampled rows [2 lo, 2 hi)
        need_lo, need_hi = max(2 * a - 1, 0), min(2 * b + 1, H)  # what output rows [2a, 2b) read
        parts.append(_conv3_rows(upsampler.conv, up[:, :, need_lo - 2 * lo : need_hi - 2 * lo], a == 0, b == h, fmt))
        del up
    return RowStrips(parts)
