"""NAG (Normalized Attention Guidance, arXiv 2505.21179): the formula by hand, its wiring in Z-Image's single
stream, and the guided output moving away from what the negative caption alone gives."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import SettingsError
from common.nag import NAGOptions, normalized_attention_guidance
from models.z_image.tiny_z_image import TINY_CONFIG
from models.z_image.transformer_z_image import ZImageTransformer
from tests.fixtures.pipelines import flat_pipeline


def _nag(pos: list[float], neg: list[float], **options: float) -> list[float]:
    out = normalized_attention_guidance(torch.tensor([pos]), torch.tensor([neg]), NAGOptions(**options))
    return out[0].tolist()


def test_formula_computed_by_hand() -> None:
    # g = 3*[1,1] - 2*[0,0] = [3,3]; r = 6/2 = 3 <= tau 3.5: kept; out = 0.5*[3,3] + 0.5*[1,1] = [2,2]
    assert _nag([1.0, 1.0], [0.0, 0.0], scale=3.0, tau=3.5, alpha=0.5) == [2.0, 2.0]
    # the same with tau 2: r = 3 > 2, so g = [3,3] * 2/3 = [2,2]; out = 0.5*[2,2] + 0.5*[1,1] = [1.5,1.5]
    assert _nag([1.0, 1.0], [0.0, 0.0], scale=3.0, tau=2.0, alpha=0.5) == [1.5, 1.5]
    # g = 2*[2,-1] - [1,1] = [3,-3]; r = 6/3 = 2 <= 3.5; alpha 1 keeps g, alpha 0.5 blends: [2.5, -2]
    assert _nag([2.0, -1.0], [1.0, 1.0], scale=2.0, tau=3.5, alpha=1.0) == [3.0, -3.0]
    assert _nag([2.0, -1.0], [1.0, 1.0], scale=2.0, tau=3.5, alpha=0.5) == [2.5, -2.0]
    # a negative equal to the positive guides nowhere
    assert _nag([0.5, -4.0], [0.5, -4.0], scale=3.0, tau=3.5, alpha=0.5) == [0.5, -4.0]


def test_norm_ratio_is_per_token() -> None:
    pos = torch.tensor([[[1.0, 1.0], [1.0, 1.0]]])  # (1 item, 2 tokens, 2 features)
    neg = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])  # the first token is pushed (r = 3), the second is not (r = 1)
    out = normalized_attention_guidance(pos, neg, NAGOptions(scale=3.0, tau=2.0, alpha=1.0))
    assert out.tolist() == [[[2.0, 2.0], [1.0, 1.0]]]


@pytest.fixture(scope="module")
def model() -> ZImageTransformer:
    torch.manual_seed(0)
    m = ZImageTransformer(TINY_CONFIG).eval()
    with torch.no_grad():
        for p in m.parameters():  # pad tokens and the final layer start at zero: randomise everything
            p.normal_(0, 0.3)
    return m


def _inputs() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 8, 8, generator=gen)
    t = torch.tensor([0.3])
    pos = [torch.randn(7, TINY_CONFIG.cap_feat_dim, generator=gen)]
    neg = [torch.randn(40, TINY_CONFIG.cap_feat_dim, generator=gen)]  # longer: padded batch, mask in play
    return x, t, pos, neg


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def test_scale_one_through_the_guided_path_is_the_positive_forward(model: ZImageTransformer) -> None:
    """The [positive ; negative] batch with s = 1 gives the plain positive result: the rows, positions and mask
    of each half are wired right (the pipeline skips this path at s = 1, for bit-identical images)."""
    x, t, pos, neg = _inputs()
    plain = model(x, t, pos)
    both = model(torch.cat([x, x]), torch.cat([t, t]), pos + neg, nag=NAGOptions(scale=1.0))
    assert _rel(both[:1], plain) < 1e-5
    assert torch.equal(both[:1], both[1:])  # the image tokens are one state shared by both halves


@torch.no_grad()
def test_larger_scale_moves_the_output_away_from_the_negative_caption(model: ZImageTransformer) -> None:
    x, t, pos, neg = _inputs()
    plain, negative_only = model(x, t, pos), model(x, t, neg)
    distances = [float((plain - negative_only).norm())]
    for scale in (2.0, 3.0, 5.0):
        guided = model(torch.cat([x, x]), torch.cat([t, t]), pos + neg, nag=NAGOptions(scale=scale))[:1]
        distances.append(float((guided - negative_only).norm()))
    assert distances == sorted(distances) and distances[-1] > 1.3 * distances[0], distances


# -- through the pipeline and the host ---------------------------------------------------------------

BASE = dict(prompt="a photo of a cat sitting on a red chair", width=64, height=64, num_inference_steps=4, seed=3)
NEGATIVE = "blurry, low quality"


@pytest.fixture(scope="module")
def pipe(tiny_flat_layout: dict[str, Path]) -> Any:
    return flat_pipeline(tiny_flat_layout)


def _run(pipe: Any, **settings: Any) -> tuple[np.ndarray, torch.Tensor, list[int]]:
    """Pixels, final latents, and the batch size of every transformer call."""
    latents: list[torch.Tensor] = []
    batches: list[int] = []
    hook = pipe.transformer.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        result = pipe.generate({**BASE, **settings}, on_step=lambda event: latents.append(event.latents.clone()))
    finally:
        hook.remove()
    return np.stack([np.asarray(im) for im in result.images]).astype(np.float64), latents[-1], batches


def test_scale_one_is_plain_turbo_bit_for_bit(pipe: Any) -> None:
    plain, plain_latents, plain_batches = _run(pipe)
    one, one_latents, one_batches = _run(pipe, negative_prompt=NEGATIVE, NAG_scale=1.0, NAG_tau=2.0, NAG_alpha=0.9)
    assert torch.equal(one_latents, plain_latents) and np.array_equal(one, plain)
    assert one_batches == plain_batches == [1, 1, 1, 1]  # no negative branch is run at all


def test_larger_scale_moves_the_image_away_from_the_negative_prompt(pipe: Any) -> None:
    """Measured on the tiny self-test weights (seed 3, 4 steps, 64x64): NAG_scale 3 changes the image by
    5.8/255 on average, and its mean distance to the image the negative prompt alone gives grows from
    8.1/255 (plain) to 13.1/255 (scale 2: 11.2, scale 5: 15.2)."""
    plain, _, _ = _run(pipe)
    negative_alone, _, _ = _run(pipe, prompt=NEGATIVE)
    guided, _, batches = _run(pipe, negative_prompt=NEGATIVE, NAG_scale=3.0)
    change = np.abs(guided - plain).mean()
    before, after = np.abs(plain - negative_alone).mean(), np.abs(guided - negative_alone).mean()
    assert change > 3.0, change
    assert after > before + 3.0, (before, after)
    assert batches == [2, 2, 2, 2]  # 4 steps = 4 transformer calls, each over [positive ; negative]


def test_nag_with_guidance_is_refused_with_the_fix() -> None:
    from models.z_image.settings_z_image import GenerationSettings

    with pytest.raises(SettingsError, match="NAG_scale 3 needs guidance_scale 0.*set NAG_scale to 1 or guidance_scale to 0"):
        GenerationSettings.from_dict({"prompt": "a cat", "NAG_scale": 3, "guidance_scale": 4})
    with pytest.raises(SettingsError, match="NAG_scale"):
        GenerationSettings.from_dict({"prompt": "a cat", "NAG_scale": 0.5})


def test_a_wan2gp_task_with_nag_runs(tmp_path: Path) -> None:
    """A task file as Wan2GP writes Z-Image Turbo's NAG settings, run with `--process` on the self-test model."""
    from host import cli

    task = {"model_type": "z_image_selftest", "prompt": "a red fox in the snow", "negative_prompt": "blurry, low quality",
            "resolution": "64x64", "num_inference_steps": 4, "guidance_scale": 0.0, "seed": 7,
            "NAG_scale": 3, "NAG_tau": 3.5, "NAG_alpha": 0.5}
    pixels = {}
    for scale in (3, 1):
        path = tmp_path / f"task_{scale}.json"
        path.write_text(json.dumps({**task, "NAG_scale": scale}))
        out = tmp_path / f"out_{scale}"
        args = ["--process", str(path), "--ckpts", str(tmp_path / "ckpts"), "--output-dir", str(out), "--offline", "--device", "cpu"]
        assert cli.main(args) == 0
        [image] = list(out.glob("*.png"))
        assert json.loads(Image.open(image).info["wgp_settings"])["NAG_scale"] == scale
        pixels[scale] = np.asarray(Image.open(image)).astype(np.float64)
    assert np.abs(pixels[3] - pixels[1]).mean() > 1.0
