"""Our S3-DiT against diffusers' ZImageTransformer2DModel (the numerical oracle) on random weights."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import ZImageTransformer2DModel

from host.lowvram import planner
from models.z_image.loading_z_image import CONFIG_DIR
from models.z_image.transformer_z_image import ZImageConfig, ZImageTransformer, rope_angles
from models.z_image.z_image_handler import family_handler

TINY = dict(dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=(8, 12, 12))


def _pair(seed: int = 0, **overrides) -> tuple[ZImageTransformer2DModel, ZImageTransformer]:
    torch.manual_seed(seed)
    cfg = ZImageConfig(**{**TINY, **overrides})
    ref = ZImageTransformer2DModel(**cfg.to_dict()).eval()
    with torch.no_grad():
        for p in ref.parameters():  # pad tokens and the final layer are zero-initialised: randomise all
            p.normal_(0, 0.3)
    ours = ZImageTransformer(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _ref_forward(ref: ZImageTransformer2DModel, x: torch.Tensor, t: torch.Tensor, caps: list[torch.Tensor]) -> torch.Tensor:
    out = ref(list(x.unsqueeze(2).unbind(0)), t, caps, return_dict=False)[0]
    return torch.stack(out).squeeze(2)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize(
    ("size", "cap_lens"),
    [
        ((16, 16), [32]),  # everything already a multiple of 32
        ((12, 20), [7]),  # 60 image tokens and a 7-token caption: both padded
        ((24, 8), [7, 40, 33]),  # batch with different caption lengths: masks in play
    ],
)
def test_forward_matches_diffusers_fp32(size: tuple[int, int], cap_lens: list[int]) -> None:
    ref, ours = _pair()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(len(cap_lens), 16, *size, generator=gen)
    t = torch.rand(len(cap_lens), generator=gen)
    caps = [torch.randn(n, 32, generator=gen) for n in cap_lens]
    with torch.no_grad():
        expected = _ref_forward(ref, x, t, caps)
        got = ours(x, t, caps)
    assert got.shape == expected.shape == x.shape
    assert _rel(got, expected) < 1e-5


@pytest.mark.parametrize(
    ("size", "cap_lens", "refiner_rows"),
    [
        ((16, 16), [9, 20], 1),  # captions of the same padded length (32): the halves get the same positions
        ((16, 16), [9, 40], 1),  # 32 vs 64: the image tokens' first RoPE axis differs by a constant per row
        ((12, 20), [9, 40], 2),  # 60 image tokens + 4 pad tokens at position 0: the offset no longer cancels
        ((12, 20), [9, 20], 1),
    ],
)
def test_guidance_batch_matches_diffusers_and_shares_the_noise_refiner(
    size: tuple[int, int], cap_lens: list[int], refiner_rows: int
) -> None:
    """A CFG batch (one image and time, two captions): the noise refiner, which never sees the captions, runs on
    one row unless the two halves' image tokens see different relative positions, and the output still matches
    diffusers', which refines both rows with their own positions."""
    ref, ours = _pair()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, *size, generator=gen).repeat(2, 1, 1, 1)
    t = torch.rand(1, generator=gen).repeat(2)
    caps = [torch.randn(n, 32, generator=gen) for n in cap_lens]
    rows: list[int] = []
    ours.noise_refiner[0].register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    with torch.no_grad():
        expected = _ref_forward(ref, x, t, caps)
        got = ours(x, t, caps)
    assert rows == [refiner_rows]
    assert _rel(got, expected) < 1e-5


def test_the_caption_length_offset_cancels_in_the_noise_refiner_only_without_image_pads() -> None:
    """Why the rows are shared: refining one image with the positions a 32- and a 64-token caption give it yields
    the same tokens (float rounding apart) when every image token is real, and different ones when pad tokens
    (at position 0) are in the row."""
    _, ours = _pair()
    gen = torch.Generator().manual_seed(5)
    c = ours.t_embedder(torch.rand(1, generator=gen) * ours.config.t_scale)

    def refined(size: tuple[int, int], cap_len: int) -> torch.Tensor:
        x = torch.randn(1, 16, *size, generator=torch.Generator().manual_seed(6))
        img, n_img = ours.embed_image(x)
        img_pos, _ = ours.positions([cap_len], n_img, img.shape[1], size[1] // 2, cap_len, x.device)
        rope = rope_angles(img_pos, ours.config.axes_dims, ours.config.rope_theta)
        for block in ours.noise_refiner:
            img = block(img, rope, None, c)
        return img

    with torch.no_grad():
        assert _rel(refined((16, 16), 32), refined((16, 16), 64)) < 1e-6
        assert _rel(refined((12, 20), 32), refined((12, 20), 64)) > 1e-3


def test_real_config_defaults() -> None:
    """Our defaults are the released model's config (the shipped copy of its config.json), and both
    implementations built from it on the meta device have the same parameters, shape for shape."""
    cfg = ZImageConfig()
    assert (cfg.dim, cfg.n_layers, cfg.n_refiner_layers, cfg.n_heads) == (3840, 30, 2, 30)
    assert cfg.axes_lens == (1536, 512, 512) and cfg.ffn_dim == 10240 and cfg.head_dim == 128
    for name in ("z_image_turbo.json", "z_image_base.json"):
        released = json.loads((CONFIG_DIR / name).read_text())
        assert ZImageConfig.from_json(CONFIG_DIR / name) == cfg, name
        with torch.device("meta"):
            theirs = {k: tuple(p.shape) for k, p in ZImageTransformer2DModel.from_config(released).named_parameters()}
            ours = {k: tuple(p.shape) for k, p in ZImageTransformer(cfg).named_parameters()}
        assert ours == theirs, name
    n_params = sum(math.prod(shape) for shape in theirs.values())
    assert sum(math.prod(shape) for shape in ours.values()) == n_params
    sizes = planner.sizes_from_facts(family_handler.query_model_facts("z_image", {}))
    assert sizes is not None and sizes.transformer.params == n_params  # the planner's size of the real model


@pytest.mark.isolated  # bf16 matmuls on the CPU: native kernels that may crash some CPUs
def test_bf16_error_no_worse_than_reference_bf16() -> None:
    """bf16 has an 8-bit mantissa (relative rounding 2^-9 ~ 0.2% per op), so a bf16 forward drifts from
    fp32 by roughly 0.5-2% over a few blocks. The meaningful bound is relative to the reference run in
    the same precision: our bf16 error against the fp32 oracle must not exceed diffusers' own bf16
    error by more than 50%, and both must stay under 5%."""
    ref, ours = _pair(seed=3)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 16, 16, 16, generator=gen)
    t = torch.rand(2, generator=gen)
    caps = [torch.randn(n, 32, generator=gen) for n in (9, 45)]
    with torch.no_grad():
        oracle = _ref_forward(ref, x, t, caps)
        ref_bf16 = _ref_forward(ref.to(torch.bfloat16), x.bfloat16(), t, [c.bfloat16() for c in caps])
        ours_bf16 = ours.to(torch.bfloat16)(x, t, caps)
    assert ours_bf16.dtype == torch.bfloat16
    ref_err, our_err = _rel(ref_bf16, oracle), _rel(ours_bf16, oracle)
    assert our_err < 0.05 and ref_err < 0.05
    assert our_err <= 1.5 * ref_err


def test_config_from_diffusers_dict_ignores_bookkeeping_and_rejects_unknown() -> None:
    raw = {"_class_name": "ZImageTransformer2DModel", "_diffusers_version": "0.42.1", "siglip_feat_dim": None, **TINY}
    raw["axes_dims"] = list(raw["axes_dims"])
    assert ZImageConfig.from_dict(raw).axes_dims == (8, 12, 12)
    with pytest.raises(ValueError, match="unknown"):
        ZImageConfig.from_dict({**raw, "n_layer": 3})
    with pytest.raises(ValueError, match="sum"):
        ZImageConfig(**{**TINY, "axes_dims": (8, 12, 10)})
