"""Memory planner: expected peak VRAM and RAM per offload profile and quantization, before downloading.

Estimates from the real component sizes and the activation sizes at a resolution; formulas, not
measurements (the CPU parts are checked against measured peak RSS by bench/bench_lowvram.py). The sizes
come from the family (`ModelFacts`, its handler's `query_model_facts`): `sizes_from_facts`.

- weights: bf16 = 2 bytes/param; int8 = 1 byte for the Linear weights the family's int8 pattern selects
  + 2 for the rest.
- VRAM in a phase = the weights on the GPU + that phase's activations; phases run one after the other
  (text encoder -> transformer -> VAE), so the peak is the largest phase. Weights on the GPU: the whole
  part for profiles 1 and 3; for 2, 4 and 5 mmgp streams blocks within a budget (1200 MB transformer in
  2/4, 400 MB in 5, 3000 MB other parts), counted twice (the block in use + the one being prefetched).
- RAM: every part is held in RAM (memory-mapped or pinned) plus the runtime (~RUNTIME_GB).
"""

from __future__ import annotations

from dataclasses import dataclass

from common.model_facts import AUXILIARY, DECODER, DENOISER, TEXT_ENCODER, ComponentFacts, ModelFacts

GB = 1e9


@dataclass(frozen=True)
class PartSize:
    """A model part: all parameters and those in the Linear weights that int8 files hold in int8."""

    params: int
    quantizable: int

    def bytes(self, quantization: str, full_bytes: int = 2) -> float:
        if quantization == "int8":
            return self.quantizable * 1 + (self.params - self.quantizable) * full_bytes
        return self.params * (4 if quantization == "fp32" else full_bytes)


@dataclass(frozen=True)
class ModelSizes:
    """Sizes of one architecture (dims give the activation sizes); the transformer is the denoiser."""

    transformer: PartSize
    text_encoder: PartSize
    vae_params: int
    dim: int  # transformer width
    ffn_hidden: int
    text_hidden: int
    patch: int  # latent pixels per transformer token side
    vae_scale: int  # image pixels per latent pixel side
    token_multiple: int = 1  # text tokens are padded up to a multiple of this
    vae_bytes_per_pixel: float = 0.0  # decode activations per output pixel in fp32 (0: unknown)


def sizes_from_facts(facts: ModelFacts) -> ModelSizes | None:
    """The planner's sizes from a family's facts; None when they lack what a plan needs (the denoiser's
    parameter count and widths, the latent format). Auxiliary parts run at every step beside the denoiser
    (a ControlNet): their weights count with the denoiser's."""
    denoiser = facts.with_role(DENOISER)
    if denoiser is None or facts.latent is None or not (denoiser.params and denoiser.hidden and denoiser.ffn_hidden):
        return None
    text = facts.with_role(TEXT_ENCODER) or ComponentFacts("none", TEXT_ENCODER)
    decoder = facts.with_role(DECODER)
    auxiliary = [c for c in facts.components if c.role == AUXILIARY]
    return ModelSizes(
        transformer=PartSize(
            denoiser.params + sum(c.params for c in auxiliary), denoiser.int8_params + sum(c.int8_params for c in auxiliary)
        ),
        text_encoder=PartSize(text.params, text.int8_params),
        vae_params=decoder.params if decoder is not None else 0,
        dim=denoiser.hidden,
        ffn_hidden=denoiser.ffn_hidden,
        text_hidden=text.hidden,
        patch=facts.patch,
        vae_scale=facts.latent.pixels_per_latent,
        token_multiple=facts.text_token_multiple,
        vae_bytes_per_pixel=facts.decode_bytes_per_pixel,
    )


RUNTIME_GB = 2.0  # python + torch + CUDA libraries resident in RAM
CUDA_CONTEXT_GB = 0.6  # the CUDA context and cuBLAS workspaces (outside torch's allocator)
# Transformer activations per token (inference): the residual stream, fp32 norm/RoPE copies, q/k/v and
# the SwiGLU hidden (w1, w3, product) live together in a block: ~ (10*dim + 3*hidden) elements.
ACT_DIM_FACTOR, ACT_HIDDEN_FACTOR = 10, 3
# The VAE decodes in tiles of TILE_LATENT latent pixels above TILED_ABOVE_LATENT per side (the defaults
# of host/lowvram/vae_tiling.py).
TILED_ABOVE_LATENT, TILE_LATENT = 128, 64
STREAM_BUDGET_MB = {2: (1200, 3000), 4: (1200, 3000), 5: (400, 3000)}  # (transformer, other parts)
PROFILES = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class Plan:
    profile: int
    quantization: str
    vram_gb: float
    ram_gb: float
    fits: bool | None


def transformer_activation_bytes(
    sizes: ModelSizes, width: int, height: int, batch: int, caption: int, elem: int
) -> float:
    """Peak activations of one transformer forward: tokens x (10 dim + 3 hidden) elements."""
    step = sizes.vae_scale * sizes.patch
    tokens = (width // step) * (height // step) + -(-caption // sizes.token_multiple) * sizes.token_multiple
    return batch * tokens * (ACT_DIM_FACTOR * sizes.dim + ACT_HIDDEN_FACTOR * sizes.ffn_hidden) * elem


def vae_decode_bytes(sizes: ModelSizes, width: int, height: int, elem: int = 4) -> float:
    """Decode activations; above the tiling threshold, those of one tile instead of the whole image."""
    pixels = width * height
    if max(width, height) > TILED_ABOVE_LATENT * sizes.vae_scale:
        pixels = min(pixels, (TILE_LATENT * sizes.vae_scale) ** 2)
    return pixels * sizes.vae_bytes_per_pixel * elem / 4


def plan(
    sizes: ModelSizes,
    width: int,
    height: int,
    quantization: str,
    profile: int,
    batch: int = 1,
    cfg: bool = True,
    caption: int = 512,
    vram_gb: float | None = None,
) -> Plan:
    """Expected peaks for one generation (CFG batched doubles the transformer batch)."""
    t_w = sizes.transformer.bytes(quantization)
    te_w = sizes.text_encoder.bytes(quantization)
    vae_w = sizes.vae_params * 4
    elem = 4 if quantization == "fp32" else 2
    t_act = transformer_activation_bytes(sizes, width, height, batch * (2 if cfg else 1), caption, elem)
    te_act = caption * sizes.text_hidden * 16 * elem  # a few hidden-size buffers per token
    vae_act = vae_decode_bytes(sizes, width, height)
    if profile in (1, 3):
        on_gpu = {"te": te_w, "t": t_w}
    else:
        t_mb, other_mb = STREAM_BUDGET_MB[profile]
        on_gpu = {"te": min(te_w, 2 * other_mb * 1e6), "t": min(t_w, 2 * t_mb * 1e6)}
    phases = (on_gpu["te"] + te_act, on_gpu["t"] + t_act, vae_w + vae_act)
    vram = max(phases) / GB + CUDA_CONTEXT_GB
    ram = (t_w + te_w + vae_w) / GB + RUNTIME_GB
    fits = None if vram_gb is None else vram <= vram_gb
    return Plan(profile, quantization, round(vram, 2), round(ram, 2), fits)


def plan_table(sizes: ModelSizes, width: int, height: int, cfg: bool, vram_gb: float | None) -> list[Plan]:
    """Every profile x (bf16, int8)."""
    return [plan(sizes, width, height, q, p, cfg=cfg, vram_gb=vram_gb) for q in ("bf16", "int8") for p in PROFILES]


def format_table(plans: list[Plan], title: str) -> str:
    """A plain-text table for the CLI."""
    lines = [title, f"{'profile':>7} {'weights':>7} {'peak VRAM GB':>12} {'peak RAM GB':>11}  fits"]
    for p in plans:
        fits = "-" if p.fits is None else ("yes" if p.fits else "no")
        lines.append(f"{p.profile:>7} {p.quantization:>7} {p.vram_gb:>12.2f} {p.ram_gb:>11.2f}  {fits}")
    return "\n".join(lines)


def cpu_peak_rss_gb(
    sizes: ModelSizes, width: int, height: int, quantization: str, batch: int = 1, caption: int = 32
) -> float:
    """CPU (fp32 compute) transformer phase: weights + one forward's activations, without the runtime."""
    weights = sizes.transformer.bytes(quantization, full_bytes=4)
    return (weights + transformer_activation_bytes(sizes, width, height, batch, caption, 4)) / GB
