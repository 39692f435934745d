"""Z-Image text-to-image pipeline: encode prompt -> prepare noise -> denoise -> decode.

The model's two conventions are converted at exactly one seam, `ZImagePipeline.velocity`:
the transformer takes t = 1 - sigma and returns x0 - noise, the negated flow velocity.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from common.errors import NonFiniteOutputError, SettingsError
from common.model_hooks import ModelHooks
from common.nag import NAGOptions
from common.sampling import (
    Guidance,
    apply_guidance,
    denoise,
    denoise_twinflow,
    get_sigmas,
    seeded_noise,
    twinflow_sigmas,
)
from models.z_image.settings_z_image import GenerationSettings
from models.z_image.transformer_z_image import ZImageConfig, ZImageTransformer
from models.z_image.variety_z_image import prompt_schedule

log = logging.getLogger(__name__)

LATENT_CHANNELS = 16
TWINFLOW_NOISE_OFFSET = 0x7F10  # TwinFlow's step noise: its own stream, not a replay of the starting noise's
VAE_FACTOR = 8  # the released VAE's; a pipeline reads its own VAE's factor (`ZImagePipeline.vae_scale_factor`)


@dataclass(frozen=True)
class ZImageComponents:
    """Resolved local paths of the four parts (see docs/DESIGN.md for what each may be)."""

    transformer: Path
    text_encoder: Path
    tokenizer: Path
    vae: Path
    text_encoder_config: Path | None = None
    vae_config: Path | None = None
    transformer_config: Path | None = None

    @classmethod
    def from_diffusers_folder(cls, folder: Path) -> ZImageComponents:
        """A folder as downloaded from Tongyi-MAI/Z-Image(-Turbo): transformer/ text_encoder/ tokenizer/ vae/."""
        folder = Path(folder)
        return cls(
            transformer=folder / "transformer",
            text_encoder=folder / "text_encoder",
            tokenizer=folder / "tokenizer",
            vae=folder / "vae",
        )


@dataclass(frozen=True)
class LoadOptions:
    device: str = "cpu"
    dtype: torch.dtype = torch.bfloat16  # transformer and text encoder
    vae_dtype: torch.dtype = torch.float32
    # False: load the text encoder only when a prompt must be encoded and free it right after, so it
    # never sits in memory beside the transformer (low-RAM machines; a prompt cache skips it entirely).
    keep_text_encoder: bool = True


@dataclass
class EncodedPrompt:
    embeds: torch.Tensor  # (L, hidden) masked-in tokens only
    tokens: int  # tokens before truncation (chat template included)
    truncated: bool


@dataclass
class StepEvent:
    step: int  # 1-based
    total: int
    elapsed_s: float
    latents: torch.Tensor  # (B, 16, H/f, W/f) fp32, f = the VAE's scale factor (8 for the released VAE)


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seed: int
    settings: GenerationSettings
    prompt_tokens: int
    truncated: bool
    timings: dict[str, float] = field(default_factory=dict)


StepCallback = Callable[[StepEvent], None]
BeforeStepCallback = Callable[[int, int], None]
AfterStepFn = Callable[[int, torch.Tensor], torch.Tensor]  # (0-based step, latents) -> latents


class ZImagePipeline:
    """Holds the built parts; `generate` runs one settings dict. Device and dtypes come from the caller."""

    def __init__(self, transformer: ZImageTransformer, text_encoder: Any, tokenizer: Any, vae: Any, device: str = "cpu"):
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.vae = vae
        self.device = torch.device(device)
        # Batch the positive and negative branches in one forward (faster) or run them one after the
        # other (half the activation memory): the host turns this off when memory is tight.
        self.batch_cfg = True
        # The seams transforms use (prompt cache, VAE tiling, guards, offload, LoRA schedules): data, so
        # nothing outside replaces a method of this object (common/model_hooks.py).
        self.hooks = ModelHooks()
        # True once the encoder's last layer and final norm are dropped (see drop_unused_text_layers).
        self.text_encoder_trimmed = False
        # Set by from_components when the text encoder is loaded on demand (keep_text_encoder=False).
        self.load_text_encoder: Callable[[], Any] | None = None

    @classmethod
    def from_components(cls, components: ZImageComponents, options: LoadOptions) -> ZImagePipeline:
        """Load the four parts from local paths (any supported layout)."""
        from models.z_image import loading_z_image as loading

        def load_text_encoder() -> Any:
            encoder = loading.load_text_encoder(
                components.text_encoder, components.text_encoder_config, options.dtype, options.device
            )
            return drop_unused_text_layers(encoder)

        config = ZImageConfig.from_json(components.transformer_config) if components.transformer_config else None
        transformer = loading.load_transformer(components.transformer, config, options.dtype, options.device)
        text_encoder = load_text_encoder() if options.keep_text_encoder else None
        tokenizer = loading.load_tokenizer(components.tokenizer)
        vae = loading.load_vae(components.vae, components.vae_config, options.vae_dtype, options.device)
        pipe = cls(transformer, text_encoder, tokenizer, vae, options.device)
        pipe.text_encoder_trimmed = True
        if not options.keep_text_encoder:
            pipe.load_text_encoder = load_text_encoder
        return pipe

    def components(self) -> dict[str, torch.nn.Module | None]:
        """The parts, in the order they run (None: not loaded now, e.g. a text encoder loaded on demand)."""
        return {"text_encoder": self.text_encoder, "transformer": self.transformer, "vae": self.vae}

    def release(self) -> None:
        """Drop the weights so their memory can be reclaimed (transforms holding them are told first)."""
        self.hooks.on_release()
        self.transformer = self.text_encoder = self.vae = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- 1. prompt ------------------------------------------------------------------------------

    def encode_prompt(self, prompt: str, max_sequence_length: int) -> EncodedPrompt:
        """The prompt's embeddings, through the `encode_prompt` hooks (e.g. a cache) around `_encode_prompt`."""
        return self.hooks.encode_prompt.call(self._encode_prompt, prompt, max_sequence_length)

    @torch.no_grad()
    def _encode_prompt(self, prompt: str, max_sequence_length: int) -> EncodedPrompt:
        """Chat template (thinking enabled) -> Qwen3 -> hidden_states[-2] of the real tokens.

        The reference pads to max_sequence_length and then drops the pad rows; the encoder is causal,
        so running the real tokens alone gives the same rows without computing hundreds of pads.
        """
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=True
        )
        total = len(self.tokenizer(text).input_ids)
        ids = self.tokenizer(text, truncation=True, max_length=max_sequence_length).input_ids
        if total > max_sequence_length:
            log.warning(
                "prompt is %d tokens, over max_sequence_length=%d: the end is cut off", total, max_sequence_length
            )
        ids = torch.tensor([ids], dtype=torch.long, device=self.device)  # (1, L): explicit device, never the default
        mask = torch.ones_like(ids)
        if self.text_encoder is None and self.load_text_encoder is not None:
            self.text_encoder = self.load_text_encoder()  # freed again at the end of the prompt stage
        if self.text_encoder_trimmed:
            hidden = self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        else:
            hidden = self.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        return EncodedPrompt(hidden[0], total, total > max_sequence_length)

    # -- 2. noise -------------------------------------------------------------------------------

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel along a side: the VAE halves the size at every level but the
        last, as diffusers computes it (8 for the released VAE's four levels)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def check_size(self, width: int, height: int) -> None:
        """Both sides must be multiples of VAE factor x patch size (16 for the released model)."""
        multiple = self.vae_scale_factor * self.transformer.config.all_patch_size[0]
        for key, value in (("width", width), ("height", height)):
            if value % multiple:
                low = max(multiple, value // multiple * multiple)
                raise SettingsError(
                    f"{key} must be a multiple of {multiple} for this model's VAE (got {value}); "
                    f"nearest valid sizes: {low} or {low + multiple}"
                )

    @staticmethod
    def prepare_latents(batch: int, width: int, height: int, seed: int, vae_factor: int = VAE_FACTOR) -> torch.Tensor:
        """fp32 noise from a CPU generator, so a seed gives the same image on any device."""
        return draw_noise(torch.Generator("cpu").manual_seed(seed), batch, width, height, vae_factor)

    # -- 3. denoise -----------------------------------------------------------------------------

    def velocity(
        self,
        latents: torch.Tensor,
        sigma: float,
        pos: list[torch.Tensor],
        neg: list[torch.Tensor],
        guidance: Guidance,
        nag: NAGOptions | None = None,
        target: float | None = None,
    ) -> torch.Tensor:
        """The seam: t = 1 - sigma in, v = -(model output) out, guidance combined in fp32.

        nag: with guidance off at this sigma, the negative captions steer the attention instead (one forward
        over [positive ; negative], the transformer's NAG). target: TwinFlow's target time (sigma-like), passed
        to the transformer as its second timestep (`twinflow_model_time`).
        """
        scale = guidance.scale_at(sigma)
        B = latents.shape[0]
        x = latents.to(self.transformer.dtype)
        t = torch.full((B,), 1.0 - sigma, dtype=torch.float32, device=latents.device)
        twin = {} if target is None else {"t_target": torch.full_like(t, twinflow_model_time(target))}
        if scale == 0 and nag is not None and neg:
            twin = {k: torch.cat([v, v]) for k, v in twin.items()}
            out = self.evaluate(torch.cat([x, x]), torch.cat([t, t]), pos + neg, nag=nag, **twin)[:B].float()
        elif scale == 0:
            out = self.evaluate(x, t, pos, **twin).float()
        elif self.batch_cfg:
            twin = {k: torch.cat([v, v]) for k, v in twin.items()}
            both = self.evaluate(torch.cat([x, x]), torch.cat([t, t]), pos + neg, **twin).float()
            out = apply_guidance(both[:B], both[B:], scale, guidance.normalization)
        else:
            out_pos = self.evaluate(x, t, pos, **twin).float()
            out_neg = self.evaluate(x, t, neg, **twin).float()
            out = apply_guidance(out_pos, out_neg, scale, guidance.normalization)
        return -out  # model output is x0 - noise; the flow velocity is noise - x0

    @staticmethod
    def schedule(s: GenerationSettings) -> torch.Tensor:
        """The sampler's times ((steps + 1,) fp32, ending at 0): TwinFlow's own grid, else the shifted sigmas."""
        if s.sample_solver == "twinflow":
            return twinflow_sigmas(s.num_inference_steps)
        return get_sigmas(s.num_inference_steps, s.flow_shift)

    def predict(self, x: torch.Tensor, t: torch.Tensor, captions: list[torch.Tensor], **inputs: Any) -> torch.Tensor:
        """One transformer evaluation: (B, 16, h, w) latents, (B,) t, B captions -> raw output (x0 - noise).
        A variant with extra inputs (the ControlNet's residuals) adds them here, around the same call."""
        return self.transformer(x, t, captions, **inputs)

    def evaluate(self, x: torch.Tensor, t: torch.Tensor, captions: list[torch.Tensor], **inputs: Any) -> torch.Tensor:
        """`predict` through the `predict` hooks (e.g. a step cache that may answer without the transformer);
        with no hooks, exactly `predict`."""
        return self.hooks.predict.call(self.predict, x, t, captions, **inputs)

    # -- 4. decode ------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """VAE-decode one image at a time (bounded memory); scale/shift from the VAE's own config."""
        cfg = self.vae.config
        images = []
        for item in latents:
            z = item[None].to(self.vae.dtype) / cfg.scaling_factor + cfg.shift_factor
            pixels = self.hooks.decode.call(self._vae_decode, z).float()
            images.append(_to_pil(pixels[0]))
        return images

    def _vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, 16, h, w) VAE-space latents -> (B, 3, H, W) pixels in [-1, 1]: the VAE alone. On the CPU its
        convolutions run channels-last, oneDNN's fast layout (measured 1.2-1.6x faster on bench_engine's mid VAE at
        512x512, pixels within 2e-4 of the default layout's)."""
        if z.device.type == "cpu":
            z = z.contiguous(memory_format=torch.channels_last)
        return self.vae.decode(z, return_dict=False)[0]

    # -- all together ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        settings: Mapping[str, Any] | GenerationSettings,
        on_step: StepCallback | None = None,
        before_step: BeforeStepCallback | None = None,
    ) -> GenerationResult:
        """Generate `batch_size` images for one prompt. on_step may raise GenerationCancelled.

        `hooks.before_step` listeners (and `before_step`) run before each step; `hooks.after_generate`
        listeners run at the end, whatever happened.
        """
        try:
            return self._generate(settings, on_step, before_step)
        finally:
            self.hooks.after_generate()

    def _generate(
        self,
        settings: Mapping[str, Any] | GenerationSettings,
        on_step: StepCallback | None,
        before_step: BeforeStepCallback | None,
    ) -> GenerationResult:
        s = settings if isinstance(settings, GenerationSettings) else GenerationSettings.from_dict(dict(settings))
        self.check_size(s.width, s.height)
        if s.image_start is not None or s.image_mask is not None:  # a sibling variant, same steps
            from models.z_image.pipeline_z_image_img2img import generate_from_image

            return generate_from_image(self, s, on_step, before_step)
        seed = resolve_seed(s.seed)
        timings: dict[str, float] = {}
        prompts = self.encode_prompts(s, timings)
        latents = self.prepare_latents(s.batch_size, s.width, s.height, seed, self.vae_scale_factor).to(self.device)
        sigmas = self.schedule(s)
        latents = self.denoise_latents(latents, sigmas, s, prompts, timings, on_step, before_step, seed=seed)
        return self.finish(latents, seed, s, prompts, timings)

    # -- the steps every variant (text-to-image, image-to-image, inpainting) calls -------------------

    def encode_prompts(self, s: GenerationSettings, timings: dict[str, float]) -> Prompts:
        """The positive prompt, and the negative one when guidance is on; the text encoder freed after
        when it is loaded on demand."""
        start = time.perf_counter()
        pos = self.encode_prompt(s.prompt, s.max_sequence_length)
        neg = self.encode_prompt(s.negative_prompt, s.max_sequence_length) if s.uses_negative_prompt else None
        if self.load_text_encoder is not None:
            self.text_encoder = None  # loaded on demand: do not keep it beside the transformer
        timings["text_encoding_s"] = time.perf_counter() - start
        return Prompts(pos, neg)

    def denoise_latents(
        self,
        latents: torch.Tensor,
        sigmas: torch.Tensor,
        s: GenerationSettings,
        prompts: Prompts,
        timings: dict[str, float],
        on_step: StepCallback | None,
        before_step: BeforeStepCallback | None,
        after_step: AfterStepFn | None = None,
        seed: int | None = None,
    ) -> torch.Tensor:
        """Run the steps of `sigmas` ((steps + 1,), ending at 0) from `latents` (B, 16, h, w) at sigmas[0],
        with the sampler `s.sample_solver` names.

        `after_step(step, latents) -> latents` may change the latents after each step (inpainting puts the
        known region back); progress and hooks count the steps of this run. `seed` (default: s.seed) seeds
        the seed-variety perturbation and TwinFlow's step noise.
        """
        guidance = Guidance(s.guidance_scale, s.cfg_normalization, s.cfg_truncation)
        nag = NAGOptions(s.NAG_scale, s.NAG_tau, s.NAG_alpha) if s.uses_nag else None
        seed = s.seed if seed is None else seed
        captions = prompt_schedule(prompts.pos.embeds, s.batch_size, s.seed_variety, s.seed_variety_steps, seed)
        neg_list = [prompts.neg.embeds] * s.batch_size if prompts.neg is not None else []
        twinflow = s.sample_solver == "twinflow"
        total = len(sigmas) - 1
        start = time.perf_counter()

        def velocity(x: torch.Tensor, sigma: float, step: int) -> torch.Tensor:
            self.hooks.before_step(step, total)
            if before_step is not None:
                before_step(step, total)
            # TwinFlow's few-step style: every step asks for the jump to the clean end (target time 0)
            return self.velocity(x, sigma, captions.at(step), neg_list, guidance, nag, 0.0 if twinflow else None)

        def step_done(step: int, x: torch.Tensor) -> None:
            if on_step is not None:
                on_step(StepEvent(step + 1, total, time.perf_counter() - start, x))

        if twinflow:
            noise = seeded_noise(seed + TWINFLOW_NOISE_OFFSET)
            latents = denoise_twinflow(latents, sigmas.to(self.device), velocity, noise, step_done, after_step)
        else:
            latents = denoise(latents, sigmas.to(self.device), velocity, step_done, after_step)
        timings["denoise_s"] = time.perf_counter() - start
        timings["s_per_it"] = timings["denoise_s"] / total
        check_finite(latents)
        return latents

    def finish(
        self, latents: torch.Tensor, seed: int, s: GenerationSettings, prompts: Prompts, timings: dict[str, float]
    ) -> GenerationResult:
        """Decode the denoised latents into the result."""
        start = time.perf_counter()
        images = self.decode(latents)
        timings["vae_decode_s"] = time.perf_counter() - start
        return GenerationResult(images, seed, s, prompts.pos.tokens, prompts.pos.truncated, timings)


@dataclass
class Prompts:
    """The encoded prompts of one generation (neg: None when guidance is off)."""

    pos: EncodedPrompt
    neg: EncodedPrompt | None


def draw_noise(generator: torch.Generator, batch: int, width: int, height: int, vae_factor: int) -> torch.Tensor:
    """(batch, 16, height / f, width / f) fp32 noise, drawn on the CPU from `generator` (where the draw
    comes in a variant's sequence of draws matters: image-to-image samples the VAE first)."""
    shape = (batch, LATENT_CHANNELS, height // vae_factor, width // vae_factor)
    return torch.randn(shape, generator=generator, dtype=torch.float32, device="cpu")


def resolve_seed(seed: int) -> int:
    """-1 -> a random seed (reported in the result), otherwise the seed itself."""
    return seed if seed >= 0 else secrets.randbelow(2**32)


def twinflow_model_time(sigma: float) -> float:
    """A TwinFlow time (sigma-like, signed: negative times are its training's fake trajectory) in the transformer's
    convention, as TwinFlow's Z-Image wrapper converts it: sign(s) * (1 - |s|). For s > 0 that is 1 - sigma, like t;
    the target s = 0 (the jump to the clean image) reaches the model as 0, since sign(0) = 0 (read in
    smthemex/ComfyUI_TwinFlow's diffusers_patch/z_image/modeling_z_image.py; to confirm on the real weights)."""
    return math.copysign(1.0, sigma) * (1.0 - abs(sigma)) if sigma != 0 else 0.0


def drop_unused_text_layers(text_encoder: Any) -> Any:
    """Z-Image conditions on hidden_states[-2]: the output of the second-to-last decoder layer, before
    the final norm. Without the last layer and the norm, the encoder's last_hidden_state is exactly
    that, and the last layer (1/36 of Qwen3-4B) is neither run nor kept in memory."""
    base = getattr(text_encoder, "model", text_encoder)  # Qwen3ForCausalLM wraps a Qwen3Model
    base.layers = base.layers[:-1]
    base.config.num_hidden_layers = len(base.layers)
    base.norm = torch.nn.Identity()
    return base


def check_finite(latents: torch.Tensor) -> None:
    """Refuse to decode NaN/inf latents into a silent black image."""
    if not torch.isfinite(latents).all():
        raise NonFiniteOutputError(
            "the denoised latents contain NaN/inf, so the image would be black. Try another attention "
            "backend (--attention sdpa), bf16 instead of fp16, or the bf16 weights instead of int8."
        )


def _to_pil(pixels: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> 8-bit RGB, rounded like the reference image processor."""
    array = (pixels / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray((array * 255).round().astype(np.uint8))
