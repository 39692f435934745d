"""Prompt cache: text embeddings reused across generations, so a repeated prompt never runs the
text encoder (and, with a lazily loaded encoder, never needs it in memory).

An LRU keyed by (prompt, max_sequence_length, text encoder file identity), bounded in bytes. Entries
are kept on the CPU (VRAM is for the transformer) and moved to the pipeline's device on a hit.
The identity of a file is (absolute path, size, modification time): replacing the file invalidates it.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from host.transforms import hooks_of

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 256 * 2**20  # ~100 prompts of 512 tokens x 2560 in bf16


def file_identity(path: Path | str | None) -> tuple[str, int, int] | None:
    """(absolute path, size, mtime in ns) of a weights file or folder; None when unknown."""
    if path is None:
        return None
    path = Path(path).resolve()
    try:
        stat = os.stat(path)
    except OSError:
        return (str(path), -1, -1)
    return (str(path), stat.st_size, stat.st_mtime_ns)


class PromptCache:
    """LRU of encoded prompts bounded by the total bytes of their tensors."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> Any | None:
        """The cached value (marked most recently used) or None."""
        item = self._entries.get(key)
        if item is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return item[0]

    def put(self, key: Hashable, value: Any, nbytes: int) -> None:
        """Store a value; the least recently used entries go until the total fits. Too big: not stored."""
        if key in self._entries:
            self.bytes -= self._entries.pop(key)[1]
        if nbytes > self.max_bytes:
            log.debug(
                "prompt cache: an entry of %d bytes exceeds the %d-byte budget; not cached", nbytes, self.max_bytes
            )
            return
        self._entries[key] = (value, nbytes)
        self.bytes += nbytes
        while self.bytes > self.max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.bytes -= dropped

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def lookup(
        self, encode: Callable[[str, int], Any], prompt: str, max_sequence_length: int, identity: Hashable, device: Any
    ) -> Any:
        """`encode(prompt, max_sequence_length)` (a value with an `.embeds` tensor), or its cached copy.

        The key is (prompt, max_sequence_length, identity); a hit goes to `device`.
        """
        key = (prompt, max_sequence_length, identity)
        hit = self.get(key)
        if hit is None:
            hit = _to_cpu(encode(prompt, max_sequence_length))
            self.put(key, hit, hit.embeds.numel() * hit.embeds.element_size())
        return replace(hit, embeds=hit.embeds.to(device))


def _to_cpu(encoded: Any) -> Any:
    return replace(encoded, embeds=encoded.embeds.detach().to("cpu"))


_SHARED: PromptCache | None = None


def shared_cache() -> PromptCache:
    """The process-wide cache (outlives model reloads, so a reloaded model reuses old prompts)."""
    global _SHARED
    if _SHARED is None:
        _SHARED = PromptCache()
    return _SHARED


@dataclass
class PromptCacheTransform:
    """The cache on a model's `encode_prompt` hook (a transform, host/transforms.py).

    identity: what else decides the embeddings, e.g. `file_identity(<text encoder file>)`.
    """

    identity: Hashable
    cache: PromptCache = field(default_factory=lambda: shared_cache())
    name: str = "prompt_cache"
    reversible: bool = True

    def apply(self, model: Any) -> None:
        def cached(call_next: Callable[[str, int], Any], prompt: str, max_sequence_length: int) -> Any:
            return self.cache.lookup(call_next, prompt, max_sequence_length, self.identity, model.device)

        hooks_of(model).encode_prompt.add(self.name, cached)

    def remove(self, model: Any) -> None:
        hooks_of(model).encode_prompt.remove(self.name)


def attach_prompt_cache(pipe: Any, identity: Hashable, cache: PromptCache | None = None) -> PromptCache:
    """Put a cache on the model's prompt encoder (replacing one already there); returns the cache."""
    cache = shared_cache() if cache is None else cache  # an empty cache is falsy (len 0)
    PromptCacheTransform(identity, cache).apply(pipe)
    return cache
