"""Flow-matching sampling shared by the families: sigma schedule, guidance and the Euler loop.

Conventions (stated once here): sigma runs from 1 (pure noise) to 0 (clean image); the latent
moves as x <- x + (sigma_next - sigma) * v with v the velocity (noise - x0). N steps means exactly N
calls to `velocity` (each call may run the model once per guidance branch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def get_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """Shifted flow-matching schedule: (num_steps + 1,) fp32, from 1.0 down to a final 0.

    sigma_i = linspace(1, 1/N, N), shifted by s*sig / (1 + (s-1)*sig) (the Flux/SD3 time shift;
    s > 1 spends more steps at high noise). Computed in fp32 like the reference scheduler.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1 (got {num_steps})")
    if shift <= 0:
        raise ValueError(f"flow shift must be > 0 (got {shift})")
    sigmas = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float32, device="cpu")
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float32, device="cpu")])


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance options.

    scale: g in pred = pos + g * (pos - neg); guidance is on when g > 0.
    normalization: k; if ||pred|| > k * ||pos|| (per sample, whole tensor, fp32) pred is rescaled to
        that norm. 0 disables it (True in settings means 1.0).
    truncation: c; on steps where t = 1 - sigma > c guidance is switched off (and the negative
        branch skipped). c >= 1 never truncates.
    """

    scale: float = 0.0
    normalization: float = 0.0
    truncation: float = 1.0

    def scale_at(self, sigma: float) -> float:
        """Guidance scale to use at this sigma (0 means: run the positive branch only)."""
        if self.scale <= 0:
            return 0.0
        if self.truncation <= 1 and (1.0 - sigma) > self.truncation:
            return 0.0
        return self.scale


def apply_guidance(pos: torch.Tensor, neg: torch.Tensor, scale: float, normalization: float) -> torch.Tensor:
    """pred = pos + scale * (pos - neg), then the optional norm cap. pos/neg: (B, ...) fp32."""
    pred = pos + scale * (pos - neg)
    if normalization > 0:
        dims = tuple(range(1, pred.ndim))
        pos_norm = torch.linalg.vector_norm(pos, dim=dims, keepdim=True)
        pred_norm = torch.linalg.vector_norm(pred, dim=dims, keepdim=True)
        limit = pos_norm * normalization
        pred = torch.where(pred_norm > limit, pred * (limit / pred_norm), pred)
    return pred


VelocityFn = Callable[[torch.Tensor, float, int], torch.Tensor]
StepFn = Callable[[int, torch.Tensor], None]


EditFn = Callable[[int, torch.Tensor], torch.Tensor]


def denoise(
    latents: torch.Tensor,
    sigmas: torch.Tensor,
    velocity: VelocityFn,
    on_step: StepFn | None = None,
    after_step: EditFn | None = None,
) -> torch.Tensor:
    """Euler integration of the flow from sigmas[0] to sigmas[-1].

    latents: (B, C, H, W) fp32 noise at sigmas[0]. velocity(latents, sigma, step) -> fp32 v of the
    same shape. after_step(step, latents) -> latents may replace the result of each step (inpainting
    puts the known region back); on_step(step, latents) then runs and may raise to cancel.
    """
    for step in range(len(sigmas) - 1):
        v = velocity(latents, float(sigmas[step]), step)
        latents = latents + (sigmas[step + 1] - sigmas[step]) * v  # fp32 step, as the reference
        if after_step is not None:
            latents = after_step(step, latents)
        if on_step is not None:
            on_step(step, latents)
    return latents


# -- TwinFlow few-step sampling (arXiv 2512.05150) ----------------------------------------------------

TWINFLOW_MAX_STEPS = 4
TWINFLOW_START_GAP = 0.001  # the grid starts at t = 1 - 0.001, not at pure noise


def twinflow_end_gap(num_steps: int) -> float:
    """How far from 0 the grid's last model evaluation sits, as published for TwinFlow's few-step sampling
    (the `rfba_gap_steps` end of inclusionAI/TwinFlow's README: 0.6 for 2 steps, 0.5 for 4 steps; 1 step is
    taken with the 2-step value and 3 steps with the 4-step one)."""
    return 0.6 if num_steps <= 2 else 0.5


def twinflow_sigmas(num_steps: int) -> torch.Tensor:
    """TwinFlow's time grid: (num_steps + 1,) fp32, t_i = 1 - linspace(0.001, 1 - end_gap, N)_i, then a final 0.

    t is sigma-like (1 = noise, 0 = clean image). 2 steps: [0.999, 0.6, 0]; 4 steps: [0.999, 0.83267, 0.66633,
    0.5, 0]. The reference builds it in float64 and casts it to its noise's dtype (bf16 in its demo, which
    rounds 0.999 to 1.0); here it stays fp32 like the latents. No flow shift: the grid is the sampler's own.
    """
    if not 1 <= num_steps <= TWINFLOW_MAX_STEPS:
        raise ValueError(
            f"TwinFlow sampling takes 1 to {TWINFLOW_MAX_STEPS} steps (got {num_steps}); "
            "use sample_solver 'default' for more steps"
        )
    points = torch.linspace(TWINFLOW_START_GAP, 1.0 - twinflow_end_gap(num_steps), num_steps, dtype=torch.float64)
    return torch.cat([1.0 - points, torch.zeros(1, dtype=torch.float64)]).to(torch.float32)


NoiseFn = Callable[[torch.Size], torch.Tensor]


def seeded_noise(seed: int) -> NoiseFn:
    """Standard-normal fp32 noise of any shape from one CPU generator seeded with `seed` (the same draws on any
    device), each call continuing the stream: the step noise of a stochastic sampler."""
    generator = torch.Generator("cpu").manual_seed(seed % 2**64)
    return lambda shape: torch.randn(shape, generator=generator, dtype=torch.float32, device="cpu")


def denoise_twinflow(
    latents: torch.Tensor,
    sigmas: torch.Tensor,
    velocity: VelocityFn,
    noise: NoiseFn,
    on_step: StepFn | None = None,
    after_step: EditFn | None = None,
) -> torch.Tensor:
    """TwinFlow's few-step update: its UCGM sampler at the published settings (first order, no extrapolation,
    stochastic ratio 1: each step re-noises with fresh noise).

    At each grid time t (to t_next): v = velocity(latents, t, step) is the flow velocity (noise - x0, the
    caller asks the model for the jump to the clean end), x0 = latents - t * v, then
    latents = (1 - t_next) * x0 + t_next * noise(shape); the last step (t_next = 0) returns x0.
    N steps = N velocity calls. noise(shape) -> fp32 standard-normal noise, seeded by the caller.
    after_step and on_step as in `denoise`.
    """
    for step in range(len(sigmas) - 1):
        t, t_next = float(sigmas[step]), float(sigmas[step + 1])
        x0 = latents - t * velocity(latents, t, step)
        latents = x0 if t_next == 0 else (1 - t_next) * x0 + t_next * noise(latents.shape).to(latents.device)
        if after_step is not None:
            latents = after_step(step, latents)
        if on_step is not None:
            on_step(step, latents)
    return latents
