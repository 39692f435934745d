"""Sigma schedule, guidance formula and the Euler loop (common/sampling.py)."""

from __future__ import annotations

import pytest
import torch

from common.sampling import Guidance, apply_guidance, denoise, get_sigmas


def _diffusers_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """The grid diffusers' ZImagePipeline runs: its default sigmas, set on FlowMatchEulerDiscreteScheduler with
    the Z-Image scheduler config (shift, no dynamic shifting, so `mu` is ignored), terminal 0 included."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas, retrieve_timesteps

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False)
    retrieve_timesteps(scheduler, num_steps, "cpu", sigmas=get_default_z_image_sigmas(num_steps), mu=0.5)
    return scheduler.sigmas


@pytest.mark.parametrize(("num_steps", "shift"), [(8, 3.0), (30, 6.0), (1, 3.0), (4, 1.0)])
def test_schedule_matches_diffusers(num_steps: int, shift: float) -> None:
    expected = _diffusers_sigmas(num_steps, shift)
    ours = get_sigmas(num_steps, shift)
    assert ours.shape == expected.shape == (num_steps + 1,)
    assert torch.allclose(ours, expected.to(ours.dtype), atol=1e-6)


def test_shift_takes_effect_and_one_step_is_one_evaluation() -> None:
    assert not torch.allclose(get_sigmas(30, 6.0), get_sigmas(30, 3.0))
    calls: list[float] = []

    def velocity(x: torch.Tensor, sigma: float, step: int) -> torch.Tensor:
        calls.append(sigma)
        return torch.ones_like(x)

    out = denoise(torch.zeros(1, 2), get_sigmas(5, 6.0), velocity)
    assert len(calls) == 5 and calls[0] == 1.0
    assert torch.allclose(out, torch.full((1, 2), -1.0))  # integrates v=1 from sigma 1 to 0


def test_bad_schedule_arguments() -> None:
    with pytest.raises(ValueError, match="num_steps"):
        get_sigmas(0, 3.0)
    with pytest.raises(ValueError, match="shift"):
        get_sigmas(4, 0.0)


def test_guidance_formula_truncation_and_normalization() -> None:
    pos, neg = torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 0.0]])
    assert torch.allclose(apply_guidance(pos, neg, 2.0, 0.0), torch.tensor([[9.0, 12.0]]))
    capped = apply_guidance(pos, neg, 2.0, 1.0)  # ||pred|| = 15 > 1.0 * ||pos|| = 5 -> rescaled to 5
    assert torch.allclose(capped, torch.tensor([[3.0, 4.0]]))
    g = Guidance(scale=4.0, normalization=0.0, truncation=0.6)
    assert g.scale_at(1.0) == 4.0  # t = 0 <= 0.6
    assert g.scale_at(0.3) == 0.0  # t = 0.7 > 0.6: guidance off, negative branch skipped
    assert Guidance(scale=0.0).scale_at(1.0) == 0.0
    assert Guidance(scale=4.0, truncation=1.5).scale_at(0.0) == 4.0
