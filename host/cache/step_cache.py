"""Step cache: skip denoiser evaluations on steps where its output barely changes (opt-in, never the default).

The criterion is EasyCache's (X. Zhou, D. Liang et al., "Less is Enough: Training-Free Video Diffusion
Acceleration via Runtime-Adaptive Caching", arXiv 2507.02860, 2025), as its authors' code decides
(H-EmbodVis/EasyCache, EasyCache4Wan2.2/easycache_generate.py, `easycache_forward`). It reads only the
denoiser's input latents x and raw output v, so it works through the model's `predict` hook alone:

- every computed step i keeps the transformation vector D = v_i - x_i, and, once two steps i > m have been
  computed, the transformation rate k = mean|v_i - v_m| / mean|x_i - x_m|;
- at a later step t the relative change of the output is estimated from the input's change alone,
  eps_t = k * mean|x_t - x_(t-1)| / mean|v_i| (x_(t-1): the previous step's input, computed or not), and
  accumulated, E += eps_t;
- while E < tau (the level's `threshold`) the step is skipped: the output is x_t + D. When E reaches tau the
  denoiser runs, E returns to 0, and D and k are renewed;
- the first steps (the level's `warmup` share, EasyCache's R; at least one) and the last step always run, and
  so does every step until k is known (two computed steps).

Decisions are taken at the first evaluation of a step (EasyCache decides on the conditional pass); when the
guidance branches run one after the other, each evaluation of the step reuses its own D. An evaluation with
no D of its shape (e.g. guidance turned off by cfg_truncation mid-run) is computed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from common.errors import SettingsError
from common.model_facts import ModelFacts, StepCacheLevel
from host.progress import format_steps
from host.transforms import hooks_of

log = logging.getLogger(__name__)

OFF = "off"


def cache_level(facts: ModelFacts | None, name: str, model_type: str) -> StepCacheLevel | None:
    """The level the `cache` setting names for this model type (None for "off"); a level the model type does not
    offer is a SettingsError that lists the ones it does."""
    if name == OFF:
        return None
    level = facts.cache_level(name) if facts is not None else None
    if level is None:
        offered = [level.name for level in facts.step_cache] if facts is not None else []
        choices = ", ".join([OFF, *offered])
        raise SettingsError(
            f"'cache': {model_type} offers no step cache level {name!r} (choose one of: {choices})"
        )
    return level


@dataclass
class StepCacheReport:
    """What the step cache did in one generation. Steps are 1-based, as the progress shows them."""

    level: str
    steps: int = 0
    evaluations: int = 0  # denoiser evaluations the sampler asked for
    forwards: int = 0  # of them, those the denoiser really ran
    skipped_steps: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "steps": self.steps,
            "forwards": self.forwards,
            "evaluations": self.evaluations,
            "skipped_steps": list(self.skipped_steps),
        }

    def describe(self) -> str:
        """'step cache fast: 18/30 forwards, skipped steps 5, 7-9, 12'."""
        skipped = format_steps(self.skipped_steps) or "none"
        return f"step cache {self.level}: {self.forwards}/{self.evaluations} forwards, skipped steps {skipped}"


@dataclass
class _Reference:
    """The last computed evaluation of one slot (its position in the step and its input's shape), in fp32."""

    x: torch.Tensor  # input latents
    v: torch.Tensor  # raw output
    dtype: torch.dtype  # the output's own dtype, kept for reused outputs

    @property
    def delta(self) -> torch.Tensor:
        return self.v - self.x  # EasyCache's transformation vector


def mean_abs(x: torch.Tensor) -> float:
    return float(x.abs().mean())


class StepCache:
    """EasyCache's decision state for one generation (see the module docstring); `StepCacheTransform` feeds it."""

    def __init__(self, level: StepCacheLevel):
        self.level = level
        self.reset()

    def reset(self) -> None:
        """Forget everything: a new generation."""
        self.report = StepCacheReport(self.level.name)
        self._refs: dict[tuple[int, tuple[int, ...]], _Reference] = {}
        self._step, self._total, self._slot = -1, 0, 0
        self._skip = False
        self._step_computed = False
        self._accumulated = 0.0
        self._rate: float | None = None  # k
        self._prev_input: torch.Tensor | None = None  # the first evaluation's input at the previous step

    def start_step(self, step: int, total: int) -> None:
        """Before step `step` (0-based) of `total`: a new generation starts at step 0."""
        if step == 0 or step <= self._step:
            self.reset()
        self._close_step()
        self._step, self._total, self._slot = step, total, 0
        self._step_computed = False
        self.report.steps = total

    def finish(self) -> StepCacheReport:
        """After the generation: the report, with its last step counted."""
        self._close_step()
        self._step = -1
        return self.report

    def evaluate(self, call_next: Callable[..., torch.Tensor], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """One denoiser evaluation: computed (`call_next`) or answered from the cache."""
        slot = self._slot
        self._slot += 1
        self.report.evaluations += 1
        x32 = x.float()
        if slot == 0:
            self._skip = self._decide(x32)
        ref = self._refs.get((slot, tuple(x.shape)))
        if self._skip and ref is not None:
            return (x32 + ref.delta).to(ref.dtype)  # v_t ~ x_t + D
        out = call_next(x, *args, **kwargs)
        self.report.forwards += 1
        self._step_computed = True
        v32 = out.float()
        if slot == 0 and ref is not None:
            input_change = mean_abs(x32 - ref.x)
            self._rate = mean_abs(v32 - ref.v) / input_change if input_change > 0 else None
        self._refs[(slot, tuple(x.shape))] = _Reference(x32.clone(), v32.clone(), out.dtype)
        return out

    def _decide(self, x32: torch.Tensor) -> bool:
        """True when this step may reuse the cache (EasyCache's accumulated estimate below the threshold)."""
        prev, self._prev_input = self._prev_input, x32.clone()
        warmup = max(1, math.ceil(self.level.warmup * self._total))
        ref = self._refs.get((0, tuple(x32.shape)))
        if self._step < warmup or self._step >= self._total - 1:
            self._accumulated = 0.0
            return False
        if prev is None or ref is None or self._rate is None or prev.shape != x32.shape:
            return False
        output_size = mean_abs(ref.v)
        if not output_size > 0:
            return False
        self._accumulated += self._rate * mean_abs(x32 - prev) / output_size
        if self._accumulated < self.level.threshold:
            return True
        self._accumulated = 0.0
        return False

    def _close_step(self) -> None:
        if self._step >= 0 and self._slot > 0 and not self._step_computed:
            self.report.skipped_steps.append(self._step + 1)


@dataclass
class StepCacheTransform:
    """The step cache on a loaded model: middleware on its `predict` hook, a `before_step` listener that
    tells it the step, and an `after_generate` listener that closes the report (`last_report`)."""

    level: StepCacheLevel
    name: str = "step_cache"
    reversible: bool = True
    last_report: StepCacheReport | None = None
    _cache: StepCache | None = None

    def apply(self, model: Any) -> None:
        hooks = hooks_of(model)
        if hooks is None or not hasattr(hooks, "predict"):
            log.warning("step cache: this model offers no predict hook; it runs every step")
            return
        self._cache = StepCache(self.level)
        hooks.predict.add(self.name, self._cache.evaluate)
        hooks.before_step.add(self.name, self._cache.start_step)
        hooks.after_generate.add(self.name, self._finish)

    def remove(self, model: Any) -> None:
        hooks = hooks_of(model)
        if hooks is not None and hasattr(hooks, "predict"):
            for point in (hooks.predict, hooks.before_step, hooks.after_generate):
                point.remove(self.name)
        self._cache = None

    def _finish(self) -> None:
        assert self._cache is not None, "applied first"
        self.last_report = self._cache.finish()
        if self.last_report.skipped_steps:
            log.info("%s", self.last_report.describe())
