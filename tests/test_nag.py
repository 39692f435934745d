"""NAG (Normalized Attention Guidance, arXiv 2505.21179): the formula by hand, its wiring in Z-Image's single
stream, and the guided output moving away from what the negative caption alone gives."""

from __future__ import annotations

import pytest
import torch

from common.nag import NAGOptions, normalized_attention_guidance
from models.z_image.tiny_z_image import TINY_CONFIG
from models.z_image.transformer_z_image import ZImageTransformer


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
