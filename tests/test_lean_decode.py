"""The lean VAE decode (host/lowvram/lean_decode.py): the stock decoder's pixels, fewer maps alive at once.

Numbers against diffusers' own `Decoder.forward` on random weights (fp32): bit-equal where nothing is streamed,
within 1e-5 where the GroupNorm -> SiLU -> conv and the upsampling run in strips; a lower peak measured in a fresh
process; the stock forward wherever the walk does not apply.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.resnet import ResnetBlock2D

from host.lowvram import lean_decode
from host.lowvram.lean_decode import LeanDecode, lean_decoder_forward

REPO = Path(__file__).resolve().parents[1]


def small_vae(seed: int = 0) -> AutoencoderKL:
    """Flux-VAE-shaped (4 up blocks of UpDecoderBlock2D, channel changes with 1x1 shortcuts), tiny widths."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        latent_channels=16, block_out_channels=(8, 16, 16, 32), layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        use_quant_conv=False, use_post_quant_conv=False,
    ).eval()  # fmt: skip
    with torch.no_grad():  # away from the default init, so that the norms' affine terms matter
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae


def decode_both(vae: AutoencoderKL, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        stock = vae.decode(z, return_dict=False)[0]
        vae.decoder.forward = functools.partial(lean_decoder_forward, vae.decoder)
        try:
            lean = vae.decode(z, return_dict=False)[0]
        finally:
            del vae.decoder.forward
    return stock, lean


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_unstreamed_walk_is_bit_equal(monkeypatch: pytest.MonkeyPatch, layout: torch.memory_format) -> None:
    """Early frees, in-place SiLU and residual, the upsampling as one strip: the same arithmetic, the same bits.
    (Cut into strips, the convolutions' own kernels may sum in another order on small shapes: that case is
    `test_streamed_walk_matches_stock`.)"""
    monkeypatch.setattr(lean_decode, "STREAM_BYTES", 1 << 62)
    monkeypatch.setattr(lean_decode, "MIN_ROWS", 1 << 20)
    z = torch.randn(1, 16, 12, 10).contiguous(memory_format=layout)
    stock, lean = decode_both(small_vae(), z)
    assert stock.shape == lean.shape == (1, 3, 96, 80)
    assert torch.equal(stock, lean)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("latent", [(12, 10), (9, 13), (1, 3)])
def test_streamed_walk_matches_stock(monkeypatch: pytest.MonkeyPatch, layout: torch.memory_format, latent: tuple) -> None:
    """Every resnet streamed in strips of 2 rows (odd heights, a last strip shorter than the others, a
    one-row latent): within 1e-5 of the stock decoder."""
    monkeypatch.setattr(lean_decode, "STREAM_BYTES", 0)
    monkeypatch.setattr(lean_decode, "MIN_ROWS", 2)
    monkeypatch.setattr(lean_decode, "STRIPS", 1000)
    z = torch.randn(1, 16, *latent).contiguous(memory_format=layout)
    stock, lean = decode_both(small_vae(1), z)
    assert stock.shape == lean.shape
    assert (stock - lean).abs().max().item() < 1e-5 * max(1.0, stock.abs().max().item())
    assert not torch.equal(stock, torch.zeros_like(stock))


def test_resnet_with_scale_factor_and_identity_shortcut(monkeypatch: pytest.MonkeyPatch) -> None:
    """A resnet the VAE does not have (output_scale_factor 2, same channels: identity shortcut), streamed."""
    monkeypatch.setattr(lean_decode, "STREAM_BYTES", 0)
    monkeypatch.setattr(lean_decode, "MIN_ROWS", 3)
    torch.manual_seed(3)
    for block in (
        ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=None, groups=4, output_scale_factor=2.0).eval(),
        ResnetBlock2D(in_channels=8, out_channels=12, temb_channels=None, groups=4, groups_out=3).eval(),
    ):
        x = torch.randn(2, 8, 11, 7)
        with torch.no_grad():
            stock = block(x, None)
            lean = lean_decode._resnet(block, [x.clone()])
        assert (stock - lean).abs().max().item() < 1e-5


def test_group_stats_of_half_precision_maps_are_taken_in_fp32() -> None:
    x = torch.randn(2, 12, 5, 6) * 3 + 1
    mean, rstd = lean_decode._group_stats(x.half(), groups=4, eps=1e-6)
    ref_var, ref_mean = torch.var_mean(x.half().float().view(2, 4, -1), dim=-1, correction=0)
    assert mean.dtype == rstd.dtype == torch.float32
    assert torch.allclose(mean, ref_mean, atol=1e-6) and torch.allclose(rstd, torch.rsqrt(ref_var + 1e-6), rtol=1e-5)


def test_stock_forward_when_the_walk_does_not_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gradients on, or a latent embedding for spatial norms: diffusers' own forward runs, not the walk."""
    vae = small_vae()
    walked: list[str] = []
    real = lean_decode._up_block
    monkeypatch.setattr(lean_decode, "_up_block", lambda block, held: walked.append("x") or real(block, held))
    z = torch.randn(1, 16, 4, 4)
    with torch.enable_grad():
        out = lean_decoder_forward(vae.decoder, z)
    assert walked == [] and out.requires_grad
    with torch.no_grad():
        lean_decoder_forward(vae.decoder, z)
    assert len(walked) == 4


def test_transform_installs_the_walk_and_removes_only_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """apply() makes the walk the decoder's forward (so an offloader that wraps forwards later wraps it);
    remove() takes it away, but never another wrapper that replaced it."""

    class Model:
        def __init__(self) -> None:
            self.vae = small_vae()

    model = Model()
    transform = LeanDecode()
    transform.apply(model)
    forward = model.vae.decoder.forward
    assert isinstance(forward, functools.partial) and forward.func is lean_decoder_forward
    z = torch.randn(1, 16, 6, 6)
    with torch.no_grad():
        lean = model.vae.decode(z, return_dict=False)[0]
    transform.remove(model)
    assert "forward" not in model.vae.decoder.__dict__
    with torch.no_grad():
        stock = model.vae.decode(z, return_dict=False)[0]
    assert (lean - stock).abs().max().item() < 1e-5 and not torch.equal(stock, torch.zeros_like(stock))

    transform.apply(model)
    wrapped = functools.partial(lambda inner, *a: inner(*a), model.vae.decoder.forward)  # an offloader's wrapper
    model.vae.decoder.forward = wrapped
    transform.remove(model)
    assert model.vae.decoder.forward is wrapped


PEAK = textwrap.dedent(
    """
    import ctypes, functools, sys
    sys.path.insert(0, sys.argv[1])
    ctypes.CDLL("libc.so.6").mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD: freed maps leave the resident size at once
    import torch
    from diffusers import AutoencoderKL
    from host.lowvram.lean_decode import lean_decoder_forward

    torch.manual_seed(0)
    vae = AutoencoderKL(latent_channels=16, block_out_channels=(32, 64, 64, 64), layers_per_block=1,
                        norm_num_groups=16, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False, use_post_quant_conv=False).eval()
    if sys.argv[2] == "lean":
        vae.decoder.forward = functools.partial(lean_decoder_forward, vae.decoder)
    z = torch.randn(1, 16, 64, 64).contiguous(memory_format=torch.channels_last)  # as the pipeline decodes on the CPU

    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096

    def hwm():
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))

    with torch.no_grad():
        vae.decode(z[:, :, :8, :8])
        base = rss()
        open("/proc/self/clear_refs", "w").write("5")  # the high-water mark starts again from here
        vae.decode(z)
    print(hwm() - base)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/clear_refs and glibc's mallopt")
def test_lean_decode_peak_is_lower() -> None:
    """512x512 with 64 channels at full resolution, channels-last as the pipeline decodes on the CPU (in NCHW,
    oneDNN's own layout copies of whole maps add to both): the stock walk holds three 64 MB maps at its peak
    (the block input, its GroupNorm, its SiLU), the lean one the upsampling's 16 MB input and its 64 MB output
    (in strips, freed as the next resnet reads them). Measured: 203 MB against 97 MB."""
    peaks = {}
    for mode in ("stock", "lean"):
        ran = subprocess.run([sys.executable, "-c", PEAK, str(REPO), mode], capture_output=True, text=True, timeout=300)
        assert ran.returncode == 0, ran.stderr[-2000:]
        peaks[mode] = int(ran.stdout.strip().splitlines()[-1])
    assert peaks["stock"] > 180e6
    assert peaks["lean"] < 0.6 * peaks["stock"], peaks
