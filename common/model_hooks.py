"""The seams a loaded model offers to transforms, as data: no method of the model is replaced from outside.

A model (e.g. the Z-Image pipeline) holds one `ModelHooks` and routes its calls through it:
- `encode_prompt`: a chain of middleware around the prompt encoder, fn(call_next, prompt, max_len) -> encoded;
- `decode` / `encode_image`: chains around the VAE, fn(call_next, tensor) -> tensor;
- `predict`: a chain around each evaluation of the denoiser, fn(call_next, x, t, captions, **inputs) -> raw
  output (x: the latents as the denoiser takes them, t: its timesteps, captions: one per batch row; several
  calls per step when the guidance branches run one after the other): what a step cache decides to skip;
- `before_step`: listeners called with (step, total) before each denoising step (0-based step);
- `after_generate`: listeners called once a generation ends (also after an error or a cancel);
- `on_release`: listeners called when the model is released.
Transforms (int8, prompt cache, tiling, guards, offload, LoRA) add entries under their own name and remove
exactly those; the model never knows which transforms exist.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Middleware = Callable[..., Any]  # fn(call_next, *args, **kwargs) -> result
Listener = Callable[..., None]


class HookChain:
    """Ordered middleware around one call: the first entry is the outermost."""

    def __init__(self, name: str):
        self.name = name
        self._entries: list[tuple[str, Middleware]] = []

    def add(self, owner: str, fn: Middleware, outermost: bool = False) -> None:
        """Add (or replace) `owner`'s middleware; new entries go innermost unless `outermost`."""
        self.remove(owner)
        if outermost:
            self._entries.insert(0, (owner, fn))
        else:
            self._entries.append((owner, fn))

    def remove(self, owner: str) -> None:
        self._entries = [(o, fn) for o, fn in self._entries if o != owner]

    @property
    def owners(self) -> list[str]:
        return [owner for owner, _ in self._entries]

    def call(self, inner: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run the chain around `inner` (the model's own implementation)."""
        call = inner
        for _, fn in reversed(self._entries):
            call = _bind(fn, call)
        return call(*args, **kwargs)


def _bind(fn: Middleware, call_next: Callable[..., Any]) -> Callable[..., Any]:
    def bound(*args: Any, **kwargs: Any) -> Any:
        return fn(call_next, *args, **kwargs)

    return bound


class Listeners:
    """Named callbacks of one event, called in the order they were added."""

    def __init__(self, name: str):
        self.name = name
        self._entries: dict[str, Listener] = {}

    def add(self, owner: str, fn: Listener) -> None:
        self._entries[owner] = fn

    def remove(self, owner: str) -> None:
        self._entries.pop(owner, None)

    @property
    def owners(self) -> list[str]:
        return list(self._entries)

    def __call__(self, *args: Any) -> None:
        for fn in list(self._entries.values()):
            fn(*args)


@dataclass
class ModelHooks:
    """Every seam of a loaded model; see the module docstring."""

    encode_prompt: HookChain = field(default_factory=lambda: HookChain("encode_prompt"))
    decode: HookChain = field(default_factory=lambda: HookChain("decode"))
    encode_image: HookChain = field(default_factory=lambda: HookChain("encode_image"))
    predict: HookChain = field(default_factory=lambda: HookChain("predict"))
    before_step: Listeners = field(default_factory=lambda: Listeners("before_step"))
    after_generate: Listeners = field(default_factory=lambda: Listeners("after_generate"))
    on_release: Listeners = field(default_factory=lambda: Listeners("on_release"))

    def owners(self) -> dict[str, list[str]]:
        """Which transform holds an entry where (for logs and tests)."""
        points = (
            self.encode_prompt, self.decode, self.encode_image, self.predict, self.before_step, self.after_generate,
            self.on_release,
        )
        return {p.name: p.owners for p in points if p.owners}
