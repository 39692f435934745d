"""What the host may know about a family's model without loading it: `ModelFacts`.

A family answers `query_model_facts(model_type, model_def)` with one `ModelFacts`; the host reads it
for the memory planner (parameter counts, activation widths), on-the-fly int8 (which module names
quantize, per component), the live preview (the latent format and its latent-to-RGB map) and offload
(the components, in the order a generation runs them). The host keeps no model's numbers of its own.

Roles say what a component does in a generation, so the planner can tell its phases apart without
knowing component names: `text_encoder` (runs once per prompt), `denoiser` (runs every step),
`decoder` (latents -> pixels, once), `auxiliary` (anything else, e.g. a ControlNet beside the denoiser).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

TEXT_ENCODER, DENOISER, DECODER, AUXILIARY = "text_encoder", "denoiser", "decoder", "auxiliary"
ROLES = (TEXT_ENCODER, DENOISER, DECODER, AUXILIARY)


@dataclass(frozen=True)
class ComponentFacts:
    """One part of the model, named as the loaded model's attribute that holds it (e.g. "transformer").

    params: parameters of the released weights (0: unknown, the planner then has no plan).
    int8_params: of them, those in the Linear weights `int8_pattern` selects (1 byte each in int8).
    int8_pattern: regex matched (`re.match`) against module names inside the component, picking the
        Linears that int8 files hold and on-the-fly quantization converts; None: always full precision.
    hidden / ffn_hidden: activation widths per token (the planner's activation estimate; 0: unknown).
    """

    name: str
    role: str
    params: int = 0
    int8_params: int = 0
    int8_pattern: str | None = None
    hidden: int = 0
    ffn_hidden: int = 0

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"component name {self.name!r} must be the model attribute that holds it")
        if self.role not in ROLES:
            raise ValueError(f"component {self.name}: role {self.role!r} is not one of {', '.join(ROLES)}")
        counts = (self.params, self.int8_params, self.hidden, self.ffn_hidden)
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in counts):
            raise ValueError(f"component {self.name}: params, int8_params, hidden, ffn_hidden must be integers >= 0")
        if self.int8_params > self.params:
            raise ValueError(f"component {self.name}: int8_params {self.int8_params} > params {self.params}")
        if self.int8_pattern is not None:
            try:
                re.compile(self.int8_pattern)
            except re.error as exc:
                raise ValueError(f"component {self.name}: int8_pattern {self.int8_pattern!r} is not a regex ({exc})") from exc


@dataclass(frozen=True)
class LatentFormat:
    """The denoiser's latents as the sampler holds them, and how to show them without the decoder.

    rgb_factors: (channels, 3) rows mapping each latent channel to R, G, B in [-1, 1], plus rgb_bias;
    None when no fixed map is known (the host then shows no preview rather than a wrong one).
    pixels_per_latent: image pixels per latent pixel side (the decoder's upscale, e.g. 8).
    """

    channels: int
    pixels_per_latent: int
    rgb_factors: tuple[tuple[float, float, float], ...] | None = None
    rgb_bias: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        if self.channels < 1 or self.pixels_per_latent < 1:
            raise ValueError(f"latent format: channels {self.channels} and pixels_per_latent {self.pixels_per_latent} must be >= 1")
        if self.rgb_factors is not None and (
            len(self.rgb_factors) != self.channels or any(len(row) != 3 for row in self.rgb_factors)
        ):
            raise ValueError(f"latent format: rgb_factors must be {self.channels} rows of (R, G, B)")
        if len(self.rgb_bias) != 3:
            raise ValueError("latent format: rgb_bias must be (R, G, B)")


@dataclass(frozen=True)
class StepCacheLevel:
    """One level of the host's `cache` setting that a model type offers (host/cache/step_cache.py, EasyCache's
    criterion): how freely the denoiser's output may be reused on steps where it barely changes.

    threshold: the accumulated estimated relative change of the output allowed before the denoiser runs again
    (EasyCache's tau; higher skips more). warmup: the share of the steps always computed first (EasyCache's
    R; at least the first step). The last step is always computed.
    """

    name: str
    threshold: float
    warmup: float

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"step cache level {self.name!r}: the name must be a word such as 'fast'")
        if not (math.isfinite(self.threshold) and self.threshold > 0):
            raise ValueError(f"step cache level {self.name}: threshold {self.threshold} must be a number > 0")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"step cache level {self.name}: warmup {self.warmup} must be in [0, 1)")


@dataclass(frozen=True)
class ModelFacts:
    """A model type's facts. components: in the order a generation runs them (load/offload order).

    patch: latent pixels per denoiser token side; text_token_multiple: text tokens are padded up to a
    multiple of it; decode_bytes_per_pixel: the decoder's activations per output pixel in fp32 (measured;
    0: unknown). latent: None for a model whose latents have no known format (no preview). step_cache: the
    levels of the `cache` setting this model type offers, by name (none: the step cache is not offered).
    """

    components: tuple[ComponentFacts, ...]
    latent: LatentFormat | None = None
    patch: int = 1
    text_token_multiple: int = 1
    decode_bytes_per_pixel: float = 0.0
    step_cache: tuple[StepCacheLevel, ...] = ()

    def __post_init__(self) -> None:
        levels = [level.name for level in self.step_cache]
        if len(set(levels)) != len(levels):
            raise ValueError(f"step cache level names repeat: {levels}")
        names = [c.name for c in self.components]
        if len(set(names)) != len(names):
            raise ValueError(f"component names repeat: {names}")
        for role in (TEXT_ENCODER, DENOISER, DECODER):
            if sum(c.role == role for c in self.components) > 1:
                raise ValueError(f"more than one {role} component: {names}")
        if self.patch < 1 or self.text_token_multiple < 1 or self.decode_bytes_per_pixel < 0:
            raise ValueError("patch and text_token_multiple must be >= 1, decode_bytes_per_pixel >= 0")

    @property
    def names(self) -> tuple[str, ...]:
        """Component names in run order (the offload list)."""
        return tuple(c.name for c in self.components)

    @property
    def int8_components(self) -> tuple[str, ...]:
        """Components that may hold int8 layers (those with an int8_pattern)."""
        return tuple(c.name for c in self.components if c.int8_pattern is not None)

    def component(self, name: str) -> ComponentFacts:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(f"no component {name!r} (this model has {', '.join(self.names) or 'none'})")

    def cache_level(self, name: str) -> StepCacheLevel | None:
        """The step cache level called `name` (None when this model type does not offer it)."""
        return next((level for level in self.step_cache if level.name == name), None)

    def with_role(self, role: str) -> ComponentFacts | None:
        """The component that plays `role` (None when the model has none)."""
        return next((c for c in self.components if c.role == role), None)

    def quantize_pattern(self, name: str) -> re.Pattern[str] | None:
        """The compiled int8 pattern of component `name` (None: it stays full precision or is unknown)."""
        pattern = next((c.int8_pattern for c in self.components if c.name == name), None)
        return None if pattern is None else re.compile(pattern)

    def quantizes(self, name: str, module: str) -> bool:
        """True when module `module` of component `name` is one of its int8 Linears."""
        pattern = self.quantize_pattern(name)
        return pattern is not None and pattern.match(module) is not None
