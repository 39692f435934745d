"""Seed variety for Turbo: seeded noise on the prompt embedding during the first steps (opt-in, off at 0).

Why: Turbo is distilled for 8 steps without guidance, and its images change little from one seed to the
next: the first steps settle the composition from the prompt almost whatever the starting noise. Perturbing
the prompt embedding during those first steps (a different perturbation per seed) lets each seed settle on
another composition; the later steps see the clean embedding, so the image still follows the prompt.

    embeds_i = embeds + strength * std_f * eps_i,   eps_i ~ N(0, I), one per image of the batch

std_f is each feature's spread over the prompt's tokens: the text encoder's hidden states have a few features
hundreds of times larger than the rest, so one global scale would drown the ordinary features in noise while
a per-feature one perturbs every feature in proportion to its own range.

eps comes from a CPU generator seeded from the image seed (the same image on any device, a different
perturbation for every seed), separate from the latent noise's generator, so turning it on leaves the
starting noise as it was. How much more the images differ is measured by bench/bench_seed_variety.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Offset between the image seed and this generator's seed: the same seed must not give the perturbation the
# same numbers as the latent noise (both are drawn from the start of a generator's stream).
SEED_OFFSET = 0x5EED_5EED


@dataclass
class PromptSchedule:
    """The positive captions of each step: perturbed ones for the first `noisy_steps`, the clean ones after."""

    clean: list[torch.Tensor]
    noisy: list[torch.Tensor] | None = None
    noisy_steps: int = 0

    def at(self, step: int) -> list[torch.Tensor]:
        """The captions (B tensors (L, D)) for 0-based `step`."""
        return self.noisy if self.noisy is not None and step < self.noisy_steps else self.clean


def perturbed_embeddings(embeds: torch.Tensor, batch: int, strength: float, seed: int) -> list[torch.Tensor]:
    """`batch` copies of embeds (L, D), copy i plus strength * std_f * eps_i with std_f (1, D) each feature's
    standard deviation over the L tokens; noise drawn in fp32 on the CPU and added in fp32, returned in embeds'
    dtype and device."""
    generator = torch.Generator("cpu").manual_seed((seed + SEED_OFFSET) % 2**64)
    noise = torch.randn((batch, *embeds.shape), generator=generator, dtype=torch.float32, device="cpu")
    base = embeds.float()
    scale = strength * base.std(dim=0, correction=0, keepdim=True)  # (1, D); a one-token prompt gets none
    return [(base + scale * eps.to(base.device)).to(embeds.dtype) for eps in noise]


def prompt_schedule(embeds: torch.Tensor, batch: int, strength: float, steps: int, seed: int) -> PromptSchedule:
    """The captions of every step for one generation; strength 0 gives the clean captions throughout (the
    same tensors as without this feature, so the image is bit-identical)."""
    clean = [embeds] * batch
    if strength <= 0:
        return PromptSchedule(clean)
    return PromptSchedule(clean, perturbed_embeddings(embeds, batch, strength, seed), steps)
