"""LoRA weight deltas in one canonical form, shared by the families (which build them from foreign
key dialects) and the host (which applies, merges and saves them).

A `LoraDelta` is the change to one Linear weight W (out, in): dW = scale * f(factors), where f is
  lora: up @ down                       (up: (out, r), down: (r, in))
  lokr: kron(w1, w2)                    (w1: (o1, i1), w2: (o2, i2), o1*o2 = out, i1*i2 = in)
  loha: (w1a @ w1b) * (w2a @ w2b)       (Hadamard product of two low-rank products)
  full: diff                            ((out, in), a plain weight difference)
and scale = alpha / rank (1.0 when the file has no alpha). An optional `bias` delta is added to the
bias, and an optional DoRA magnitude `dora_scale` turns W into m * (W + dW) / ||W + dW||.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

KINDS = ("lora", "lokr", "loha", "full")


@dataclass
class LoraDelta:
    """The delta of one target module (a Linear named by its checkpoint key, e.g. `layers.0.attention.to_q`)."""

    module: str
    kind: str
    factors: dict[str, torch.Tensor]
    scale: float = 1.0
    rank: int | None = None  # None: full-rank factors (LoKr without decomposition, plain diffs)
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None  # (out, 1): per-row norm, or (1, in): per-column norm
    bias: torch.Tensor | None = None  # (out,)
    keys: list[str] = field(default_factory=list)  # source keys, for the report
    # Where alpha came from when not from an `.alpha` tensor: "metadata" (the file header's LoRA config).
    alpha_source: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown LoRA delta kind {self.kind!r} (expected one of {KINDS})")

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the target weight."""
        f = self.factors
        if self.kind == "lora":
            return f["up"].shape[0], f["down"].shape[1]
        if self.kind == "lokr":
            return f["w1"].shape[0] * f["w2"].shape[0], f["w1"].shape[1] * f["w2"].shape[1]
        if self.kind == "loha":
            return f["w1a"].shape[0], f["w1b"].shape[1]
        return tuple(f["diff"].shape)

    def weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full delta (out, in), scale included, DoRA not included (it depends on the base weight)."""
        f = {k: v.to(dtype) for k, v in self.factors.items()}
        if self.kind == "lora":
            w = f["up"] @ f["down"]
        elif self.kind == "lokr":
            w = torch.kron(f["w1"], f["w2"])
        elif self.kind == "loha":
            w = (f["w1a"] @ f["w1b"]) * (f["w2a"] @ f["w2b"])
        else:
            w = f["diff"]
        return w * self.scale

    def forward(self, x: torch.Tensor, cached_weight: torch.Tensor | None = None) -> torch.Tensor:
        """dW @ x for activations x (..., in) -> (..., out), without forming dW where the kind allows.

        Factors must already be on x's device and dtype. `cached_weight` (the result of `weight`) is
        used for kinds that have no factored product (loha, full).
        """
        f = self.factors
        if self.kind == "lora":
            return (x @ f["down"].T) @ f["up"].T * self.scale
        if self.kind == "lokr":
            # kron(w1, w2) @ vec(X) = vec(w1 @ X @ w2^T) with X = x viewed as (i1, i2): no (out, in) matrix.
            w1, w2 = f["w1"], f["w2"]
            xs = x.unflatten(-1, (w1.shape[1], w2.shape[1]))  # (..., i1, i2)
            y = torch.matmul(torch.matmul(w1, xs), w2.T)  # (..., o1, o2)
            return y.flatten(-2) * self.scale
        w = cached_weight if cached_weight is not None else self.weight(x.dtype)
        return x @ w.T

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LoraDelta:
        """A copy with factors (and bias / DoRA magnitude) moved; alpha, scale and keys kept."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        return LoraDelta(
            self.module, self.kind, {k: move(v) for k, v in self.factors.items()}, self.scale, self.rank,
            self.alpha, move(self.dora_scale), move(self.bias), list(self.keys), self.alpha_source,
        )


@dataclass
class NormalizedLora:
    """A LoRA file after key normalisation: one delta per target module.

    dialects: the dialect(s) recognised, e.g. ["musubi/kohya"], ["ai-toolkit", "DoRA"].
    ignored: keys deliberately not applied, each with the reason (e.g. text-encoder LoRA keys).
    """

    deltas: dict[str, LoraDelta]
    dialects: list[str]
    ignored: dict[str, str] = field(default_factory=dict)


def rebuild_tucker(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """LyCORIS Tucker (CP) reconstruction core x wa x wb -> (p, r): core (i, j, *1), wb (j, r), wa (i, p).

    Only linear targets are supported, so the core's trailing (kernel) dims must all be 1.
    """
    if any(d != 1 for d in core.shape[2:]):
        raise ValueError(f"a Tucker core of shape {tuple(core.shape)} is for a convolution, not a Linear layer")
    core2 = core.reshape(core.shape[0], core.shape[1])
    return torch.einsum("ij,jr,ip->pr", core2, wb, wa)


def dora_weight(base: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA: m * (W + dW) / ||W + dW||, the norm per output row if m is (out, 1), per input column if (1, in).

    All in fp32; returns the new full weight (out, in).
    """
    w = base.float() + delta.float()
    m = magnitude.float()
    if m.dim() == 1:
        m = m[:, None]  # PEFT's lora_magnitude_vector: (out,)
    if m.shape == (w.shape[0], 1):
        norm = w.norm(dim=1, keepdim=True)
    elif m.shape == (1, w.shape[1]):
        norm = w.norm(dim=0, keepdim=True)
    else:
        raise ValueError(f"DoRA magnitude of shape {tuple(magnitude.shape)} does not fit a weight {tuple(w.shape)}")
    return w * (m / norm)


def dora_row_factor(base: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor | None:
    """s = m / ||W + dW|| per output row (out,) when the magnitude is per row, else None (per column).

    With s, the DoRA output is s * (W x + dW x): the runtime path reuses the base output W x.
    """
    m = magnitude.float().reshape(-1)
    if magnitude.dim() == 2 and magnitude.shape[0] == 1 and base.shape[0] != 1:
        return None
    if m.numel() != base.shape[0]:
        return None
    return m / (base.float() + delta.float()).norm(dim=1)
