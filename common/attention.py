"""One attention entry point for every model: `attention(q, k, v, mask)`.

The backend is chosen once (by the host, from the preset's rules and the user's flag) with
`set_attention_backend`; models never pick one themselves.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_BACKEND = "sdpa"


def set_attention_backend(name: str) -> None:
    """Select the attention implementation used by `attention` ("sdpa" is always available)."""
    global _BACKEND
    _BACKEND = name


def get_attention_backend() -> str:
    return _BACKEND


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Non-causal multi-head attention.

    q, k, v: (B, L, H, D). key_mask: (B, L) bool, True = a real token (None = all real).
    Returns (B, L, H, D).
    """
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2)
