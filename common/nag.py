"""Normalized Attention Guidance (NAG): negative prompting for models that run without CFG.

Source: Chen, Bandyopadhyay, Zou, Song, "Normalized Attention Guidance: Universal Negative Guidance for
Diffusion Models", arXiv 2505.21179 (2025), section 3 (extrapolation, L1 normalisation, alpha blending).
Per attention layer, with A+ the attention output Z = softmax(QK^T / sqrt(d)) V computed with the positive
caption and A- the one computed with the negative caption (the same image queries):

    g = A+ * s - A- * (s - 1)              extrapolate away from the negative (s = NAG_scale)
    r = ||g||_1 / ||A+||_1                  per token, over the feature dimension
    g = g * tau / r   where r > tau         cap how far the guided feature may grow (tau = NAG_tau)
    out = alpha * g + (1 - alpha) * A+      blend back towards the positive (alpha = NAG_alpha)

s = 1 gives out = A+ exactly; callers skip the negative branch entirely then (NAGOptions.active).
Family-agnostic: a family decides which tokens of which layers it applies to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NAGOptions:
    """scale s (1 = off), tau (the cap on the L1 ratio, > 0), alpha (blend in [0, 1]); the paper's defaults for
    few-step DiTs are about tau 2.5-3.5, alpha 0.25-0.5 (Wan2GP ships 3.5 and 0.5 for Z-Image Turbo)."""

    scale: float = 1.0
    tau: float = 3.5
    alpha: float = 0.5

    @property
    def active(self) -> bool:
        return self.scale > 1.0


def normalized_attention_guidance(pos: torch.Tensor, neg: torch.Tensor, options: NAGOptions) -> torch.Tensor:
    """The guided attention output for the positive branch. pos/neg: (..., D) attention outputs of the same
    tokens; the L1 norms are taken over D. Computed in fp32 (an L1 sum over thousands of bf16 features loses
    precision) and returned in pos's dtype."""
    a_pos, a_neg = pos.float(), neg.float()
    s = options.scale
    guided = a_pos * s - a_neg * (s - 1)
    ratio = guided.abs().sum(-1, keepdim=True) / a_pos.abs().sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    guided = torch.where(ratio > options.tau, guided * (options.tau / ratio), guided)
    return (options.alpha * guided + (1 - options.alpha) * a_pos).to(pos.dtype)
