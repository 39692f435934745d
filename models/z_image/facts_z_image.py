"""Z-Image's model facts for the host (common/model_facts.py): sizes, int8 layers, latent format.

Numbers of the released model (REFERENCE.md section 1); Turbo and Base share the architecture, so one
set serves every Z-Image preset. The self-test preset's tiny weights are not described: its facts are
the architecture's (the host shows no memory plan for self-test presets).
"""

from __future__ import annotations

import functools
from dataclasses import replace

from common.model_facts import (
    AUXILIARY,
    DECODER,
    DENOISER,
    TEXT_ENCODER,
    ComponentFacts,
    LatentFormat,
    ModelFacts,
    StepCacheLevel,
)

# The repeated blocks (`layers.N.`) of both the transformer and the Qwen3 text encoder: the bulk of the
# parameters. Embedders, refiners, the final layer and norms stay in full precision (they are small and
# sensitive: the embedders see raw inputs, the final layer writes the prediction).
REPEATED_BLOCKS = r"^layers\.\d+\."

# Rows: the 16 latent channels; columns: R, G, B. These are the published Flux.1 latent-to-RGB factors
# and bias (ComfyUI comfy/latent_formats.py, class Flux, latent_rgb_factors / latent_rgb_factors_bias;
# the same numbers are used by stable-diffusion.cpp and other previewers). They were fitted by least
# squares between real Flux VAE latents (sampler space) and their decoded images; Z-Image uses the same
# VAE (16 channels, scaling 0.3611, shift 0.1159), so they hold unchanged. The result is in [-1, 1].
FLUX_VAE_LATENT_RGB = (
    (-0.0346, 0.0244, 0.0681),
    (0.0034, 0.0210, 0.0687),
    (0.0275, -0.0668, -0.0433),
    (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329),
    (0.0004, 0.0383, 0.0115),
    (0.0405, 0.0861, 0.0915),
    (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180),
    (0.1008, 0.0755, -0.0421),
    (-0.0515, 0.0201, 0.0011),
    (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749),
    (-0.1264, -0.0522, -0.1103),
    (-0.0280, -0.0881, -0.0499),
    (-0.1262, -0.0982, -0.0778),
)
FLUX_VAE_LATENT_RGB_BIAS = (-0.0329, -0.0718, -0.0851)
LATENT = LatentFormat(
    channels=16, pixels_per_latent=8, rgb_factors=FLUX_VAE_LATENT_RGB, rgb_bias=FLUX_VAE_LATENT_RGB_BIAS
)

# Transformer: 30 blocks x (4*3840^2 attention + 3*3840*10240 FFN + 256*4*3840 modulation) =
# 5,426,380,800 int8 params. Qwen3-4B: 36 layers x 100,925,440 Linear params.
FACTS = ModelFacts(
    components=(
        ComponentFacts("text_encoder", TEXT_ENCODER, 4_022_468_096, 3_633_315_840, REPEATED_BLOCKS, hidden=2560),
        ComponentFacts(
            "transformer", DENOISER, 6_154_908_736, 5_426_380_800, REPEATED_BLOCKS, hidden=3840, ffn_hidden=10240
        ),
        ComponentFacts("vae", DECODER, 83_819_683),
    ),
    latent=LATENT,
    patch=2,
    text_token_multiple=32,  # the transformer pads caption tokens to a multiple of 32 (SEQ_MULTIPLE)
    # Decode activations per output pixel in fp32: measured 4.0-4.2 kB/pixel at 512x512
    # (bench/bench_lowvram.py --vae: 1.06-1.10 GB), i.e. ~4.4 GB at 1024x1024 untiled.
    decode_bytes_per_pixel=4200,
)


# ControlNet Union (models/z_image/controlnet_z_image.py), beside the transformer: its repeated blocks
# (`control_layers.K.`, `control_noise_refiner.R.`) are the int8 layers of Wan2GP's int8 module files and of
# on-the-fly quantization; the control embedder stays in full precision. Per block (dim 3840, FFN 10240):
# 4*3840^2 + 3*3840*10240 + 256*4*3840 + 3840^2 (after_proj) Linear weights, plus one before_proj per chain.
# Counts of the released configs (controlnet_z_image.RELEASED), checked by building them on the meta device:
# v1: 6 control blocks + 2 plain refiner blocks; v2.0: 15 control blocks; v2.1: 15 + 2 control blocks.
CONTROL_BLOCKS = r"^(control_layers|control_noise_refiner)\.\d+\."
CONTROLNET_PARAMS = {  # version -> (parameters, int8 parameters)
    "v1": (1_550_778_368, 1_550_254_080),
    "v2.0": (2_950_156_800, 2_949_120_000),
    "v2.1": (3_356_225_792, 3_355_115_520),
}


def controlnet_facts(version: str) -> ModelFacts:
    """A ControlNet model type's facts: the Z-Image parts plus `controlnet` (role auxiliary), which runs
    before the transformer at every step (so it comes first in the run order)."""
    params, int8_params = CONTROLNET_PARAMS[version]
    controlnet = ComponentFacts(
        "controlnet", AUXILIARY, params, int8_params, CONTROL_BLOCKS, hidden=3840, ffn_hidden=10240
    )
    text_encoder, transformer, vae = FACTS.components
    return replace(FACTS, components=(text_encoder, controlnet, transformer, vae))


# The `cache` setting's levels (host/cache/step_cache.py, EasyCache's criterion: threshold = its tau, warmup = its
# share R of first steps always computed). Base (30 steps, CFG) has room to skip; Turbo's 8 distilled steps change
# the image a lot each, so its levels wait longer and allow less. Chosen on the mid-size random-weight model with
# bench/bench_step_cache.py (README "Step cache"); how they treat real Z-Image images is to be checked on a GPU.
# Measured 2026-12-02 on bench_engine's mid config, CPU fp32, 512x512, seed 7 (forwards run / PSNR vs uncached):
# Base fast 14/30 (53% fewer) at 52.3 dB, faster 8/30 (73% fewer) at 45.0 dB; Turbo fast 6/8 at 54.1 dB, faster 5/8
# at 49.3 dB. A 256x256 Base sweep gave: tau 0.02 only 33% fewer; tau 0.2-0.5 (warm-up 0.1) 80-83% fewer at
# 38.6-34.7 dB, little more saving for a steadily worse image. The random network's output drifts slowly, so every
# level passes the 30 dB goal with room; the taus stay near EasyCache's own defaults (0.05 and 0.06 for Wan 2.2)
# rather than being pushed to what random weights tolerate: nothing says real weights drift as slowly.
BASE_STEP_CACHE = (StepCacheLevel("fast", 0.05, 0.2), StepCacheLevel("faster", 0.1, 0.1))
TURBO_STEP_CACHE = (StepCacheLevel("fast", 0.05, 0.25), StepCacheLevel("faster", 0.1, 0.25))


@functools.cache  # one answer per model type, as the host keeps it on each preset
def with_step_cache(facts: ModelFacts, architecture: str) -> ModelFacts:
    """`facts` with the step cache levels of `architecture` (z_image_base: Base's; the others run Turbo's steps)."""
    return replace(facts, step_cache=BASE_STEP_CACHE if architecture == "z_image_base" else TURBO_STEP_CACHE)
