"""Transforms applied to a loaded model, as an ordered list the session holds.

A transform changes a built model from outside through what the model exposes: its components
(`model.components()`: parts such as the text encoder, transformer and VAE), its hooks
(`model.hooks`, common/model_hooks.py: prompt encoder, decode, before-step, after-generate, release) and
PyTorch module hooks on its parts. It never replaces a method of the model. Each transform has a name,
`apply(model)` and `remove(model)`; the stack removes them in reverse order. Weight-changing transforms
that cannot be undone in place (int8) say so with `reversible = False`: removing them means reloading.

The low-VRAM transforms are built by host/lowvram/__init__.py (`lowvram_transforms`), in this order: int8, packed
linears, prompt cache, VAE tiling, lean decode, black-image guard, heap trim, sequential guidance, offload; LoRAs
(host/lora/__init__.py) come last and are swapped on the same weights.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from common.errors import SettingsError

log = logging.getLogger(__name__)


@runtime_checkable
class Transform(Protocol):
    """One change to a loaded model, undone by `remove`."""

    name: str
    reversible: bool

    def apply(self, model: Any) -> None: ...

    def remove(self, model: Any) -> None: ...


@dataclass
class TransformStack:
    """The transforms applied to one model, in order (the session holds one per loaded model)."""

    model: Any
    applied: list[Transform] = field(default_factory=list)

    def push(self, transform: Transform) -> Transform:
        """Apply `transform` and remember it; a transform of the same name is removed first."""
        if self.get(transform.name) is not None:
            self.pop(transform.name)
        transform.apply(self.model)
        self.applied.append(transform)
        log.debug("transform %s applied", transform.name)
        return transform

    def extend(self, transforms: Iterable[Transform]) -> None:
        for transform in transforms:
            self.push(transform)

    def get(self, name: str) -> Any:
        return next((t for t in self.applied if t.name == name), None)

    def pop(self, name: str) -> None:
        """Remove the transform called `name` (nothing if absent)."""
        transform = self.get(name)
        if transform is None:
            return
        if not transform.reversible:
            raise SettingsError(f"the {name} transform changed the weights in place: reload the model to undo it")
        transform.remove(self.model)
        self.applied.remove(transform)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.applied]

    def clear(self) -> None:
        """Remove every transform, last first (irreversible ones just let go of what they hold)."""
        while self.applied:
            self.applied.pop().remove(self.model)


def hooks_of(model: Any) -> Any:
    """The model's `hooks` (common.model_hooks.ModelHooks), or None for a model that offers none."""
    return getattr(model, "hooks", None)


def component(model: Any, name: str) -> Any:
    """A part of the model by name (None when it has no such part or it is not loaded now)."""
    components = getattr(model, "components", None)
    if callable(components):
        return components().get(name)
    return getattr(model, name, None)


@dataclass
class PhaseReporter:
    """Tells `emit` when a generation starts encoding the prompt, denoising, and decoding (once each per
    generation), through the model's hooks; the session pushes it for one run and pops it after."""

    emit: Callable[[str], None]
    name: str = "phase_reporter"
    reversible: bool = True
    _seen: set[str] = field(default_factory=set)

    def apply(self, model: Any) -> None:
        hooks = hooks_of(model)
        if hooks is None:
            return

        def encode(call_next: Callable[..., Any], *args: Any) -> Any:
            self._once("encode")
            return call_next(*args)

        def decode(call_next: Callable[..., Any], z: Any) -> Any:
            self._once("decode")
            return call_next(z)

        hooks.encode_prompt.add(self.name, encode, outermost=True)
        hooks.decode.add(self.name, decode, outermost=True)
        hooks.before_step.add(self.name, lambda step, total: self._once("denoise"))

    def remove(self, model: Any) -> None:
        hooks = hooks_of(model)
        if hooks is not None:
            for point in (hooks.encode_prompt, hooks.decode, hooks.before_step):
                point.remove(self.name)

    def _once(self, name: str) -> None:
        if name not in self._seen:
            self._seen.add(name)
            self.emit(name)
