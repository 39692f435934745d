"""Caches that let a generation skip work: the step cache (step_cache.py), an opt-in transform on the model's
`predict` hook."""

from host.cache.step_cache import StepCacheReport, StepCacheTransform

__all__ = ["StepCacheReport", "StepCacheTransform"]
