"""TwinFlow few-step sampling (arXiv 2512.05150): its time grid and update rule against values computed by
hand, and the transformer's second (target) timestep."""

from __future__ import annotations

import math

import pytest
import torch

from common.sampling import denoise_twinflow, twinflow_sigmas
from models.z_image.tiny_z_image import TINY_CONFIG
from models.z_image.transformer_z_image import ZImageTransformer

# t_i = 1 - linspace(0.001, 1 - end_gap, N)_i, then 0; end_gap 0.6 for 1-2 steps, 0.5 for 3-4 (by hand):
HAND_GRIDS = {
    1: [0.999, 0.0],  # linspace with one point is its start
    2: [0.999, 0.6, 0.0],  # linspace(0.001, 0.4, 2) = [0.001, 0.4]
    3: [0.999, 0.7495, 0.5, 0.0],  # linspace(0.001, 0.5, 3) = [0.001, 0.2505, 0.5]
    4: [0.999, 1 - (0.001 + 0.499 / 3), 1 - (0.001 + 2 * 0.499 / 3), 0.5, 0.0],  # step 0.499 / 3
}


@pytest.mark.parametrize("steps", sorted(HAND_GRIDS))
def test_grid_matches_the_hand_computed_values(steps: int) -> None:
    grid = twinflow_sigmas(steps)
    assert grid.dtype == torch.float32 and len(grid) == steps + 1
    assert grid.tolist() == pytest.approx(HAND_GRIDS[steps], abs=1e-7)


@pytest.mark.parametrize("steps", [0, 5, 8])
def test_grid_refuses_other_step_counts(steps: int) -> None:
    with pytest.raises(ValueError, match="1 to 4 steps"):
        twinflow_sigmas(steps)


def test_update_rule_by_hand() -> None:
    """velocity 2 everywhere, noise 0.5 everywhere, x = 1 at t = 0.999, 2 steps (grid 0.999 -> 0.6 -> 0):
    step 1: x0 = 1 - 0.999 * 2 = -0.998; x = (1 - 0.6) * -0.998 + 0.6 * 0.5 = -0.0992
    step 2: x0 = -0.0992 - 0.6 * 2 = -1.2992; t_next = 0, so x = x0 = -1.2992 (no noise drawn)."""
    calls: list[tuple[float, int]] = []
    draws: list[torch.Size] = []

    def velocity(x: torch.Tensor, t: float, step: int) -> torch.Tensor:
        calls.append((t, step))
        return torch.full_like(x, 2.0)

    def noise(shape: torch.Size) -> torch.Tensor:
        draws.append(shape)
        return torch.full(shape, 0.5)

    seen: list[float] = []
    out = denoise_twinflow(torch.ones(1, 1, 1, 1), twinflow_sigmas(2), velocity, noise, lambda s, x: seen.append(x.item()))
    assert seen == pytest.approx([-0.0992, -1.2992], abs=1e-6)
    assert out.item() == pytest.approx(-1.2992, abs=1e-6)
    assert [step for _, step in calls] == [0, 1] and calls[0][0] == pytest.approx(0.999) and calls[1][0] == pytest.approx(0.6)
    assert len(draws) == 1  # N steps = N velocity calls; fresh noise before every step but the last


def test_after_step_edits_the_latents_between_steps() -> None:
    out = denoise_twinflow(
        torch.ones(1, 1, 1, 1), twinflow_sigmas(2), lambda x, t, s: torch.zeros_like(x), lambda shape: torch.zeros(shape),
        after_step=lambda step, x: x + 10.0,
    )
    # v = 0: x0 = x. step 1: 0.4 * 1 + 0 + 10 = 10.4; step 2: x0 = 10.4, + 10 = 20.4
    assert out.item() == pytest.approx(20.4)


@pytest.fixture(scope="module")
def model() -> ZImageTransformer:
    torch.manual_seed(0)
    m = ZImageTransformer(TINY_CONFIG).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


@torch.no_grad()
def test_target_time_embedding_is_the_scaled_gap_embedding(model: ZImageTransformer) -> None:
    t, target = torch.tensor([0.25, 0.9]), torch.tensor([1.0, 0.0])
    got = model.target_time_embedding(t, target)
    # by hand: gaps 0.75 and -0.9 -> t_embedder(750) * 0.75 and t_embedder(-900) * 0.9
    expected = torch.cat([model.t_embedder(torch.tensor([750.0])) * 0.75, model.t_embedder(torch.tensor([-900.0])) * 0.9])
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-3)  # fp32 rounding of 0.9 * 1000 in the sinusoid
    assert math.isclose(float(model.target_time_embedding(t, t).abs().max()), 0.0)  # no gap, no change


@torch.no_grad()
def test_target_timestep_reaches_the_output_only_when_given(model: ZImageTransformer) -> None:
    gen = torch.Generator().manual_seed(3)
    x, t = torch.randn(1, 16, 8, 8, generator=gen), torch.tensor([0.4])
    caps = [torch.randn(9, TINY_CONFIG.cap_feat_dim, generator=gen)]
    plain = model(x, t, caps)
    assert torch.equal(model(x, t, caps, t_target=t.clone()), plain)  # gap 0 adds exactly 0
    moved = model(x, t, caps, t_target=torch.tensor([0.0]))
    assert float((moved - plain).abs().mean()) > 1e-3 * float(plain.abs().mean())
