"""Z-Image S3-DiT: a single-stream diffusion transformer over [image tokens ; caption tokens].

Module names are the checkpoint keys of the released weights (the diffusers / official names), so a
real state dict loads with no renaming. The model knows nothing about files, devices, offloading,
quantization or LoRAs: those are applied to a built model from outside.

Shapes: B batch, C latent channels (16), H/W latent size, N image tokens (H/2 * W/2), Np image
tokens padded to a multiple of 32, Lc caption tokens padded to a multiple of 32, D model dim,
h heads, d head dim.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.attention import attention
from common.nag import NAGOptions, normalized_attention_guidance

SEQ_MULTIPLE = 32  # caption and image token counts are each padded up to a multiple of this
ADALN_DIM = 256  # width of the conditioning vector c (min(dim, 256))
TIME_FREQ_DIM = 256  # sinusoidal time-embedding width
TIME_MLP_DIM = 1024


@dataclass(frozen=True)
class ZImageConfig:
    """Architecture of the transformer. Defaults are the released 6B model (Base and Turbo)."""

    all_patch_size: tuple[int, ...] = (2,)
    all_f_patch_size: tuple[int, ...] = (1,)
    in_channels: int = 16
    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    # Read and ignored, as diffusers does: attention is full multi-head (k and v have n_heads heads), so
    # a config that says otherwise loads when its weights have Z-Image's shapes (checked on load).
    n_kv_heads: int = 30
    norm_eps: float = 1e-5
    qk_norm: bool = True
    cap_feat_dim: int = 2560
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: tuple[int, ...] = (32, 48, 48)
    axes_lens: tuple[int, ...] = (1536, 512, 512)

    def __post_init__(self) -> None:
        head_dim = self.dim // self.n_heads
        if self.dim % self.n_heads or sum(self.axes_dims) != head_dim:
            raise ValueError(f"axes_dims {self.axes_dims} must sum to dim / n_heads = {head_dim}")
        if any(d % 2 for d in self.axes_dims):
            raise ValueError(f"axes_dims {self.axes_dims} must all be even (RoPE rotates pairs)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        return int(self.dim / 3 * 8)

    @property
    def adaln_dim(self) -> int:
        return min(self.dim, ADALN_DIM)

    @property
    def patch_key(self) -> str:
        return f"{self.all_patch_size[0]}-{self.all_f_patch_size[0]}"

    @classmethod
    def from_dict(cls, raw: dict) -> ZImageConfig:
        """Build from a diffusers-style config dict; `_`-prefixed bookkeeping keys are ignored."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if not k.startswith("_")}
        if values.pop("siglip_feat_dim", None) is not None:
            raise ValueError("this config is Z-Image-Omni (siglip_feat_dim set), which is not supported")
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown Z-Image transformer config keys: {unknown}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**values)

    @classmethod
    def from_json(cls, path: Path) -> ZImageConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (squares of bf16 activations overflow/lose precision), scaled by a weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.to(self.weight.dtype) * self.weight


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x0,x1),(x2,x3)... by the angles; in fp32 because angles reach ~1500 rad.

    x: (B, L, h, d); cos/sin: (B, L, d/2) fp32.
    """
    # As one complex product, (x0 + i x1)(cos + i sin) = (x0 cos - x1 sin) + i (x0 sin + x1 cos): the same arithmetic
    # in one kernel instead of six (measured bit-identical on the CPU, and ~25x faster than stacking the halves).
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())  # (B, L, h, d/2) complex
    return torch.view_as_real(pairs * torch.complex(cos, sin)[:, :, None, :]).flatten(-2).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ZImageConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.to_q = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.to_k = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.to_v = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(cfg.dim, cfg.dim, bias=False)])
        self.norm_q = RMSNorm(cfg.head_dim, eps=1e-5)  # one weight shared by all heads
        self.norm_k = RMSNorm(cfg.head_dim, eps=1e-5)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        key_mask: torch.Tensor | None,
        nag: NAGRows | None = None,
    ) -> torch.Tensor:
        q = self.norm_q(self.to_q(x).unflatten(-1, (self.n_heads, -1)))  # (B, L, h, d)
        k = self.norm_k(self.to_k(x).unflatten(-1, (self.n_heads, -1)))
        v = self.to_v(x).unflatten(-1, (self.n_heads, -1))
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = attention(q, k, v, key_mask).flatten(2)  # (B, L, D)
        if nag is not None:
            out = nag(out)
        return self.to_out[0](out)


@dataclass(frozen=True)
class NAGRows:
    """NAG (common/nag.py) in Z-Image's single stream. The batch is [positive items ; negative items]: the same
    latents, each half with its own caption. Z-Image has no separate text stream, so, as the NAG paper does in
    Flux's single-stream blocks, the image tokens are one state shared by both branches: at each main layer
    A+ / A- are the attention outputs (before the output projection) of the image tokens (the first `n_img`
    of each row) with the positive / negative caption as context, the guided result replaces the image rows
    of both halves (the forward gives both halves the positive half's image tokens before the main layers, so
    they stay equal), and each caption's own tokens keep their unguided output."""

    options: NAGOptions
    n_img: int  # image tokens at the start of each row, pads included

    def __call__(self, out: torch.Tensor) -> torch.Tensor:
        """out: (2B, L, D) attention outputs -> the same with the image rows guided."""
        B = out.shape[0] // 2
        guided = normalized_attention_guidance(out[:B, : self.n_img], out[B:, : self.n_img], self.options)  # (B, Np, D)
        return torch.cat([guided.repeat(2, 1, 1), out[:, self.n_img :]], dim=1)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In place on w1's fresh output: the same values, two fewer (tokens x hidden) tensors alive at the peak
        # (~0.4 GB of the full model's 1024x1024 CFG batch in bf16) and less memory traffic.
        hidden = F.silu(self.w1(x), inplace=True)
        return self.w2(hidden.mul_(self.w3(x)))


class TransformerBlock(nn.Module):
    """Sandwich-norm block. Modulated blocks scale the pre-norm outputs by (1 + s) and gate the
    residuals by tanh(g); the context refiner's blocks have neither (no shift terms anywhere)."""

    def __init__(self, cfg: ZImageConfig, modulation: bool):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)
        self.attention_norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention_norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.modulation = modulation
        if modulation:
            # Applied to c directly: no SiLU here (unlike the final layer).
            self.adaLN_modulation = nn.Sequential(nn.Linear(cfg.adaln_dim, 4 * cfg.dim, bias=True))

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        key_mask: torch.Tensor | None,
        c: torch.Tensor | None = None,
        nag: NAGRows | None = None,
    ) -> torch.Tensor:
        if not self.modulation:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), rope, key_mask))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        mod = self.adaLN_modulation(c).unsqueeze(1)  # (B, 1, 4D)
        scale_msa, gate_msa, scale_mlp, gate_mlp = mod.chunk(4, dim=-1)
        attn_out = self.attention(self.attention_norm1(x) * (1 + scale_msa), rope, key_mask, nag)
        x = x + gate_msa.tanh() * self.attention_norm2(attn_out)
        ffn_out = self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp))
        return x + gate_mlp.tanh() * self.ffn_norm2(ffn_out)


class TimestepEmbedder(nn.Module):
    def __init__(self, out_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(TIME_FREQ_DIM, TIME_MLP_DIM, bias=True), nn.SiLU(), nn.Linear(TIME_MLP_DIM, out_dim, bias=True)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t: (B,) already multiplied by t_scale. Sinusoid in fp32 (cos first, then sin)."""
        half = TIME_FREQ_DIM // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class FinalLayer(nn.Module):
    def __init__(self, cfg: ZImageConfig, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(cfg.dim, out_dim, bias=True)
        # This modulation does have a SiLU, unlike the blocks'.
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.adaln_dim, cfg.dim, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale = 1 + self.adaLN_modulation(c).unsqueeze(1)  # (B, 1, D)
        x = F.layer_norm(x, x.shape[-1:], eps=1e-6) * scale
        return self.linear(x)


def rope_angles(pos: torch.Tensor, axes_dims: tuple[int, ...], theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the 3-axis RoPE angles. pos: (..., 3) int -> two (..., d/2) fp32 tensors.

    Angles are formed in float64 and rounded to fp32 before cos/sin, like the reference tables.
    """
    parts = []
    for axis, d in enumerate(axes_dims):
        inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=pos.device) / d))
        parts.append((pos[..., axis].to(torch.float64)[..., None] * inv_freq).float())
    angles = torch.cat(parts, dim=-1)
    return angles.cos(), angles.sin()


def add_residual(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """x (B, L, D) + residual (B, L', D) on the first L' <= L tokens (an image-only residual leaves the
    caption tokens as they are)."""
    n = residual.shape[1]
    if n == x.shape[1]:
        return x + residual.to(x.dtype)
    return torch.cat([x[:, :n] + residual.to(x.dtype), x[:, n:]], dim=1)


def same_halves(*tensors: torch.Tensor | None) -> bool:
    """True when each tensor's batch is [a ; a] (None entries ignored): the two guidance branches of one image."""
    for x in (x for x in tensors if x is not None):
        half, odd = divmod(x.shape[0], 2)
        if odd or not torch.equal(x[:half], x[half:]):
            return False
    return True


def _ceil_to(n: int, multiple: int) -> int:
    return n + (-n) % multiple


class ZImageTransformer(nn.Module):
    """The Z-Image transformer. forward(latents, t, captions) -> raw output (x0 - noise)."""

    # Modules ("" = this one) whose float inputs must arrive in fp32 whatever the weights' dtype: the
    # timestep (t, then t * 1000) feeds a sinusoid, and bf16 would round t * 1000 by up to 4 above 512.
    # Wrappers that cast inputs to the weights' dtype must leave these alone.
    fp32_input_modules: tuple[str, ...] = ("", "t_embedder")
    _repeated_blocks = ("TransformerBlock",)  # diffusers' name: the blocks torch.compile compiles once for all

    def __init__(self, cfg: ZImageConfig):
        super().__init__()
        self.config = cfg
        patch_in = cfg.all_f_patch_size[0] * cfg.all_patch_size[0] ** 2 * cfg.in_channels
        self.all_x_embedder = nn.ModuleDict({cfg.patch_key: nn.Linear(patch_in, cfg.dim, bias=True)})
        self.all_final_layer = nn.ModuleDict({cfg.patch_key: FinalLayer(cfg, patch_in)})
        self.noise_refiner = nn.ModuleList([TransformerBlock(cfg, modulation=True) for _ in range(cfg.n_refiner_layers)])
        self.context_refiner = nn.ModuleList(
            [TransformerBlock(cfg, modulation=False) for _ in range(cfg.n_refiner_layers)]
        )
        self.t_embedder = TimestepEmbedder(cfg.adaln_dim)
        self.cap_embedder = nn.Sequential(RMSNorm(cfg.cap_feat_dim, cfg.norm_eps), nn.Linear(cfg.cap_feat_dim, cfg.dim))
        self.x_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.layers = nn.ModuleList([TransformerBlock(cfg, modulation=True) for _ in range(cfg.n_layers)])

    @property
    def dtype(self) -> torch.dtype:
        return self.x_pad_token.dtype

    # -- tokens in and out ---------------------------------------------------------------------

    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H/p * W/p, p*p*C): row-major tokens, features ordered (ph, pw, C)."""
        p = self.config.all_patch_size[0]
        B, C, H, W = latents.shape
        x = latents.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(B, (H // p) * (W // p), p * p * C)

    def unpatchify(self, tokens: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W); the inverse of `patchify`."""
        p = self.config.all_patch_size[0]
        B, C = tokens.shape[0], self.config.in_channels
        x = tokens.view(B, H // p, W // p, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, C, H, W)

    def embed_image(self, latents: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Embed patches and append the learned pad token up to a multiple of 32 -> ((B, Np, D), N)."""
        tokens = self.all_x_embedder[self.config.patch_key](self.patchify(latents.to(self.dtype)))
        B, n, _ = tokens.shape
        pad = _ceil_to(n, SEQ_MULTIPLE) - n
        if pad:
            tokens = torch.cat([tokens, self.x_pad_token.to(tokens.dtype).expand(B, pad, -1)], dim=1)
        return tokens, n

    def embed_captions(self, captions: list[torch.Tensor]) -> tuple[torch.Tensor, list[int], torch.Tensor | None]:
        """Embed each caption, pad it to a multiple of 32 with the learned pad token (which attends
        like any token), then right-pad the batch to the longest one (masked).

        captions: B tensors (Li, cap_feat_dim) -> ((B, Lc, D), padded lengths, key mask or None).
        """
        lengths = [_ceil_to(len(c), SEQ_MULTIPLE) for c in captions]
        longest = max(lengths)
        out = self.cap_pad_token.new_zeros(len(captions), longest, self.config.dim)
        for i, cap in enumerate(captions):
            out[i, : len(cap)] = self.cap_embedder(cap.to(self.dtype))
            out[i, len(cap) : lengths[i]] = self.cap_pad_token
        if all(n == longest for n in lengths):
            return out, lengths, None
        mask = torch.arange(longest, device=out.device)[None] < torch.tensor(lengths, device=out.device)[:, None]
        return out, lengths, mask

    def positions(self, cap_lengths: list[int], n_img: int, n_img_padded: int, grid_w: int, longest: int, device: torch.device):
        """RoPE position ids (F, H, W axes).

        Caption slot i (pads included) -> (1 + i, 0, 0); image token (h, w) -> (Lc_i + 1, h, w) with
        Lc_i that item's padded caption length; image pad tokens -> (0, 0, 0).
        Returns image ids (B, Np, 3) and caption ids (1, Lc, 3).
        """
        B = len(cap_lengths)
        idx = torch.arange(n_img, device=device)
        img = torch.zeros(B, n_img_padded, 3, dtype=torch.long, device=device)
        img[:, :n_img, 0] = torch.tensor(cap_lengths, device=device)[:, None] + 1
        img[:, :n_img, 1] = idx // grid_w
        img[:, :n_img, 2] = idx % grid_w
        cap = torch.zeros(1, longest, 3, dtype=torch.long, device=device)
        cap[0, :, 0] = torch.arange(1, longest + 1, device=device)
        return img, cap

    # -- forward -------------------------------------------------------------------------------

    def forward(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        captions: list[torch.Tensor],
        nag: NAGOptions | None = None,
        t_target: torch.Tensor | None = None,
        residuals: Mapping[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """latents: (B, C, H, W); t: (B,) with t = 1 - sigma (0 = pure noise); captions: B tensors
        (Li, cap_feat_dim). Returns (B, C, H, W) in the model dtype: x0 - noise (the negated velocity).

        nag: the batch is [positive ; negative] (same latents and t, B even) and the image tokens are guided
        away from the negative captions (NAGRows); both halves of the output are then equal.
        t_target: (B,) TwinFlow's second timestep, same convention as t (`target_time_embedding`).
        residuals: {main layer index: (B, L', D)} added to that layer's output, to its first L' tokens (the
        unified sequence is [image tokens (Np) ; caption tokens (Lc)]): the one seam for extra residuals
        (diffusers' `controlnet_block_samples`; a ControlNet's, models/z_image/controlnet_z_image.py).
        """
        cfg = self.config
        B, _, H, W = latents.shape
        c = self.t_embedder(t * cfg.t_scale)  # (B, adaln)
        if t_target is not None:
            c = c + self.target_time_embedding(t, t_target)

        img, n_img = self.embed_image(latents)  # (B, Np, D)
        nag_rows = NAGRows(nag, img.shape[1]) if nag is not None else None
        cap, cap_lengths, cap_mask = self.embed_captions(captions)  # (B, Lc, D)
        img_pos, cap_pos = self.positions(cap_lengths, n_img, img.shape[1], W // cfg.all_patch_size[0], cap.shape[1], latents.device)
        img_rope = rope_angles(img_pos, cfg.axes_dims, cfg.rope_theta)
        cap_rope = tuple(a.expand(B, -1, -1) for a in rope_angles(cap_pos, cfg.axes_dims, cfg.rope_theta))

        rows = self.refiner_rows(img_pos, n_img, latents, t, t_target)  # CFG / NAG: one image, two captions
        img, refiner_rope = img[:rows], tuple(a[:rows] for a in img_rope)
        for block in self.noise_refiner:  # image tokens only, all of equal length: no mask
            img = block(img, refiner_rope, None, c[:rows])
        if rows < B:  # both halves are the same rows, computed once
            img = img.repeat(2, 1, 1)
        for block in self.context_refiner:  # caption tokens only, unmodulated
            cap = block(cap, cap_rope, cap_mask)

        if nag_rows is not None:  # one image state for both branches (see NAGRows), bit-equal from here on
            img = img[: B // 2].repeat(2, 1, 1)
        # Unified sequence [image ; caption]: image lengths are equal across the batch, so the
        # caption batch padding lands at the end of each row and one mask covers it.
        x = torch.cat([img, cap], dim=1)
        del img, cap
        rope = (torch.cat([img_rope[0], cap_rope[0]], dim=1), torch.cat([img_rope[1], cap_rope[1]], dim=1))
        mask = None
        if cap_mask is not None:
            mask = torch.cat([cap_mask.new_ones(B, x.shape[1] - cap_mask.shape[1]), cap_mask], dim=1)
        for i, block in enumerate(self.layers):
            x = block(x, rope, mask, c, nag_rows)
            if residuals is not None and i in residuals:
                x = add_residual(x, residuals[i])

        out = self.all_final_layer[cfg.patch_key](x[:, :n_img], c)  # only real image tokens are kept
        return self.unpatchify(out, H, W)

    @staticmethod
    def refiner_rows(img_pos: torch.Tensor, n_img: int, *inputs: torch.Tensor | None) -> int:
        """How many rows of the batch the noise refiner (and anything else that reads only the image tokens) must
        run: B // 2 when the batch is one image twice, [a ; a] in every one of `inputs` (latents, t, ... ; None
        ignored), as CFG and NAG make it, else B.

        The image tokens never see the captions there, and a caption's length enters them only as their position on
        the first RoPE axis (Lc_i + 1, one value per row; `positions`). Attention scores depend on position
        differences alone, so that per-row constant cancels and both halves refine to the same tokens, float rounding
        apart; unless image pad tokens, which sit at position 0, give the row a second position on that axis.
        img_pos: (B, Np, 3) from `positions`; n_img: the real image tokens."""
        B = img_pos.shape[0]
        if same_halves(*inputs) and (n_img == img_pos.shape[1] or same_halves(img_pos)):
            return B // 2
        return B

    def target_time_embedding(self, t: torch.Tensor, t_target: torch.Tensor) -> torch.Tensor:
        """TwinFlow (arXiv 2512.05150) conditions a few-step model on where a step should land as well: the
        embedding of the gap to the target time, scaled by its size, t_embedder((t_target - t) * 1000) *
        |t - t_target|, added to the time embedding (zero when t_target == t). t, t_target: (B,) -> (B, adaln)."""
        gap = t_target.float() - t.float()  # fp32, like t: the sinusoid needs the exact value
        emb = self.t_embedder(gap * self.config.t_scale)
        return emb * gap.abs()[:, None].to(emb.dtype)
