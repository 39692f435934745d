"""Z-Image ControlNet Union (VideoX-Fun "Z-Image-Turbo-Fun-Controlnet-Union": v1, v2.0, v2.1).

The ControlNet reads the guide image's latents (the "control context") beside the noisy latents and returns
one residual per main-transformer layer it controls; the transformer adds each after its layer
(`ZImageTransformer.forward(residuals=...)`), so nothing here reaches into the transformer's main layers. It
shares the transformer's embedders, refiners and pad tokens, as diffusers' `from_transformer` does: `forward`
takes the transformer and calls those parts; this module owns only the control blocks. Module names are the
checkpoint keys (`control_layers.K.*`, `control_all_x_embedder.2-1.*`, `control_noise_refiner.R.*`).

Versions (REFERENCE.md section 9; the oracle is diffusers 0.42.1 models/controlnets/controlnet_z_image.py):
- v1: control context of 16 channels (the guide latents); control blocks at layers [0, 5, ..., 25]; the
  control tokens are first refined alone by plain modulated blocks (`control_noise_refiner.R`).
- v2.0: 33 channels ([guide latents (16), keep mask (1), masked-image latents (16)]); blocks at [0, 2, ..., 28];
  in the refiner stage the whole control chain runs over the embedded image tokens, its first residuals are
  added after the noise-refiner blocks ([0, 1]) of the ControlNet's own copy of the image tokens.
- v2.1: as v2.0, but the refiner stage runs dedicated control blocks (`control_noise_refiner.R`).
As in diffusers, the refiner-stage residuals only shape the image tokens the control chain reads: the
transformer's own noise refiner runs without them.

Shapes: B batch, Cc control channels, N image tokens, Np padded to 32, Lc caption tokens, D model dim.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from models.z_image.transformer_z_image import (
    TransformerBlock,
    ZImageConfig,
    ZImageTransformer,
    rope_angles,
)

# How the control tokens are refined before the main stage (diffusers' `add_control_noise_refiner`).
PLAIN_REFINER = None  # v1: plain modulated blocks over the control tokens alone
CHAIN_IN_REFINER = "control_layers"  # v2.0: the control chain itself, its residuals into the noise refiner
CONTROL_REFINER = "control_noise_refiner"  # v2.1: dedicated control blocks, their residuals into the noise refiner
REFINER_MODES = (PLAIN_REFINER, CHAIN_IN_REFINER, CONTROL_REFINER)
VERSIONS = {PLAIN_REFINER: "v1", CHAIN_IN_REFINER: "v2.0", CONTROL_REFINER: "v2.1"}

Rope = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class ZImageControlNetConfig:
    """Architecture of a ControlNet Union (diffusers' `ZImageControlNetModel` config keys). Defaults: the
    released v2.1; `RELEASED` holds the three released versions."""

    control_layers_places: tuple[int, ...] = tuple(range(0, 30, 2))
    control_refiner_layers_places: tuple[int, ...] = (0, 1)
    control_in_dim: int = 33
    add_control_noise_refiner: str | None = CONTROL_REFINER
    all_patch_size: tuple[int, ...] = (2,)
    all_f_patch_size: tuple[int, ...] = (1,)
    dim: int = 3840
    n_refiner_layers: int = 2
    n_heads: int = 30
    n_kv_heads: int = 30
    norm_eps: float = 1e-5
    qk_norm: bool = True

    def __post_init__(self) -> None:
        places = self.control_layers_places
        if not places or places[0] != 0 or list(places) != sorted(set(places)):
            raise ValueError(f"control_layers_places {list(places)} must start at 0 and increase")
        if self.add_control_noise_refiner not in REFINER_MODES:
            raise ValueError(f"add_control_noise_refiner {self.add_control_noise_refiner!r} is not one of {REFINER_MODES}")
        if self.control_in_dim < 1 or self.dim % self.n_heads:
            raise ValueError(f"control_in_dim {self.control_in_dim} must be >= 1 and dim {self.dim} a multiple of n_heads")
        if self.add_control_noise_refiner is not None:
            chain = len(places) if self.add_control_noise_refiner == CHAIN_IN_REFINER else self.n_refiner_layers
            refiner = self.control_refiner_layers_places
            if len(refiner) > chain or any(not 0 <= p < self.n_refiner_layers for p in refiner):
                raise ValueError(
                    f"control_refiner_layers_places {list(refiner)} must name noise-refiner blocks "
                    f"(0..{self.n_refiner_layers - 1}), at most one per refiner-stage control block ({chain})"
                )

    @property
    def version(self) -> str:
        """"v1", "v2.0" or "v2.1"."""
        return VERSIONS[self.add_control_noise_refiner]

    @property
    def patch_key(self) -> str:
        return f"{self.all_patch_size[0]}-{self.all_f_patch_size[0]}"

    @property
    def patch_in(self) -> int:
        """Input width of the control embedder: one patch of the control context."""
        return self.all_f_patch_size[0] * self.all_patch_size[0] ** 2 * self.control_in_dim

    @classmethod
    def from_dict(cls, raw: dict) -> ZImageControlNetConfig:
        """From a diffusers `config.json` (`_`-prefixed bookkeeping ignored, null lists empty)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if not k.startswith("_")}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ZImageControlNetModel config keys: {unknown}")
        if values.get("control_refiner_layers_places") is None:
            values["control_refiner_layers_places"] = ()
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**values)

    @classmethod
    def from_json(cls, path: Path) -> ZImageControlNetConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict:
        """diffusers' config keys (what `ZImageControlNetModel(**config)` takes)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# The released configs (diffusers' single-file configs hlky/Z-Image-Turbo-Fun-Controlnet-Union{,-2.0,-2.1}).
RELEASED = {
    "v1": ZImageControlNetConfig(
        control_layers_places=(0, 5, 10, 15, 20, 25), control_refiner_layers_places=(), control_in_dim=16,
        add_control_noise_refiner=PLAIN_REFINER,
    ),
    "v2.0": ZImageControlNetConfig(add_control_noise_refiner=CHAIN_IN_REFINER),
    "v2.1": ZImageControlNetConfig(),
}


class ControlBlock(TransformerBlock):
    """A modulated transformer block over the control tokens with zero-initialised projections: the first
    block of a chain starts from `before_proj(control) + x` (x: the image tokens it follows), every block
    emits its residual through `after_proj`."""

    def __init__(self, cfg: ZImageConfig, first: bool):
        super().__init__(cfg, modulation=True)
        self.first = first
        if first:
            self.before_proj = nn.Linear(cfg.dim, cfg.dim, bias=True)
        self.after_proj = nn.Linear(cfg.dim, cfg.dim, bias=True)

    def forward(  # unlike a plain block, it also reads x and returns its residual
        self, control: torch.Tensor, x: torch.Tensor, rope: Rope, key_mask: torch.Tensor | None, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """control, x: (B, L, D) -> (the control tokens after this block, its residual (B, L, D))."""
        if self.first:
            control = self.before_proj(control) + x
        control = super().forward(control, rope, key_mask, c)
        return control, self.after_proj(control)


def run_chain(
    blocks: nn.ModuleList, control: torch.Tensor, x: torch.Tensor, rope: Rope, key_mask: torch.Tensor | None, c: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run a chain of ControlBlocks; returns the last control tokens and each block's residual."""
    residuals = []
    for block in blocks:
        control, residual = block(control, x, rope, key_mask, c)
        residuals.append(residual)
    return control, residuals


class ZImageControlNet(nn.Module):
    """ControlNet Union. forward(transformer, latents, t, captions, control, scale) -> {main layer: residual}."""

    # Its forward's float inputs must arrive in fp32 whatever the weights' dtype (see ZImageTransformer): t feeds
    # the transformer's time embedding, and the control context is cast where it is embedded.
    fp32_input_modules: tuple[str, ...] = ("",)

    def __init__(self, cfg: ZImageControlNetConfig, backbone: ZImageConfig):
        super().__init__()
        if (cfg.dim, cfg.n_heads, cfg.patch_key) != (backbone.dim, backbone.n_heads, backbone.patch_key):
            raise ValueError(
                f"this ControlNet (dim {cfg.dim}, {cfg.n_heads} heads, patch {cfg.patch_key}) does not fit the "
                f"transformer (dim {backbone.dim}, {backbone.n_heads} heads, patch {backbone.patch_key})"
            )
        if cfg.control_layers_places[-1] >= backbone.n_layers or cfg.n_refiner_layers > backbone.n_refiner_layers:
            raise ValueError(
                f"this ControlNet controls layers up to {cfg.control_layers_places[-1]} and refiner blocks up to "
                f"{cfg.n_refiner_layers - 1}; the transformer has {backbone.n_layers} and {backbone.n_refiner_layers}"
            )
        self.config = cfg
        # The blocks are the transformer's own kind (same width, heads, norms); only the projections are added.
        self.control_layers = nn.ModuleList([ControlBlock(backbone, first=i == 0) for i in range(len(cfg.control_layers_places))])
        self.control_all_x_embedder = nn.ModuleDict({cfg.patch_key: nn.Linear(cfg.patch_in, cfg.dim, bias=True)})
        if cfg.add_control_noise_refiner == PLAIN_REFINER:
            self.control_noise_refiner = nn.ModuleList(
                [TransformerBlock(backbone, modulation=True) for _ in range(cfg.n_refiner_layers)]
            )
        elif cfg.add_control_noise_refiner == CONTROL_REFINER:
            self.control_noise_refiner = nn.ModuleList(
                [ControlBlock(backbone, first=i == 0) for i in range(cfg.n_refiner_layers)]
            )

    @property
    def dtype(self) -> torch.dtype:
        return self.control_all_x_embedder[self.config.patch_key].bias.dtype

    def embed_control(self, backbone: ZImageTransformer, control: torch.Tensor, n_padded: int) -> torch.Tensor:
        """(B, Cc, H, W) control context -> (B, Np, D) tokens, padded like the image tokens (x_pad_token)."""
        tokens = self.control_all_x_embedder[self.config.patch_key](backbone.patchify(control.to(self.dtype)))
        B, n, _ = tokens.shape
        if n_padded > n:
            pad = backbone.x_pad_token.to(tokens.dtype).expand(B, n_padded - n, -1)
            tokens = torch.cat([tokens, pad], dim=1)
        return tokens

    def refine(
        self, backbone: ZImageTransformer, img: torch.Tensor, control: torch.Tensor, rope: Rope, c: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The refiner stage: (image tokens, control tokens) (B, Np, D) each -> both refined."""
        mode = self.config.add_control_noise_refiner
        hints: dict[int, torch.Tensor] = {}
        if mode == PLAIN_REFINER:
            for block in self.control_noise_refiner:  # the control tokens alone, image tokens untouched
                control = block(control, rope, None, c)
        else:
            chain = self.control_layers if mode == CHAIN_IN_REFINER else self.control_noise_refiner
            control, residuals = run_chain(chain, control, img, rope, None, c)
            hints = {place: residuals[i] * scale for i, place in enumerate(self.config.control_refiner_layers_places)}
        for i, block in enumerate(backbone.noise_refiner):  # image tokens only, equal lengths: no mask
            img = block(img, rope, None, c)
            if i in hints:
                img = img + hints[i]
        return img, control

    def forward(
        self,
        backbone: ZImageTransformer,
        latents: torch.Tensor,
        t: torch.Tensor,
        captions: list[torch.Tensor],
        control: torch.Tensor,
        scale: float,
    ) -> dict[int, torch.Tensor]:
        """latents (B, C, H, W), t (B,) = 1 - sigma, captions B tensors, control (B, Cc, H, W) -> residuals
        {main layer index: (B, Np + Lc, D) already times `scale`} for `backbone.forward(residuals=...)`.

        The inputs are embedded with the transformer's parts exactly as its forward does (same tokens,
        positions and masks), so each residual lines up with the transformer's unified sequence.
        """
        cfg = backbone.config
        B, _, H, W = latents.shape
        c = backbone.t_embedder(t * cfg.t_scale)  # (B, adaln)
        img, n_img = backbone.embed_image(latents)  # (B, Np, D)
        ctrl = self.embed_control(backbone, control, img.shape[1])  # (B, Np, D)
        cap, cap_lengths, cap_mask = backbone.embed_captions(captions)  # (B, Lc, D)
        img_pos, cap_pos = backbone.positions(cap_lengths, n_img, img.shape[1], W // cfg.all_patch_size[0], cap.shape[1], latents.device)
        img_rope = rope_angles(img_pos, cfg.axes_dims, cfg.rope_theta)
        cap_rope = tuple(a.expand(B, -1, -1) for a in rope_angles(cap_pos, cfg.axes_dims, cfg.rope_theta))

        rows = backbone.refiner_rows(img_pos, n_img, latents, t, control)  # CFG: one image and control, twice
        img, ctrl = self.refine(backbone, img[:rows], ctrl[:rows], tuple(a[:rows] for a in img_rope), c[:rows], scale)
        if rows < B:
            img, ctrl = img.repeat(2, 1, 1), ctrl.repeat(2, 1, 1)
        for block in backbone.context_refiner:
            cap = block(cap, cap_rope, cap_mask)

        # [image ; caption] for both the transformer's tokens and the control tokens (same caption tokens).
        x = torch.cat([img, cap], dim=1)
        ctrl = torch.cat([ctrl, cap], dim=1)
        rope = (torch.cat([img_rope[0], cap_rope[0]], dim=1), torch.cat([img_rope[1], cap_rope[1]], dim=1))
        mask = None
        if cap_mask is not None:
            mask = torch.cat([cap_mask.new_ones(B, img.shape[1]), cap_mask], dim=1)
        _, residuals = run_chain(self.control_layers, ctrl, x, rope, mask, c)
        return {place: r * scale for place, r in zip(self.config.control_layers_places, residuals, strict=True)}
