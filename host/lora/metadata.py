"""LoRA strength written in a file's header instead of `.alpha` tensors.

diffusers' and PEFT's training scripts save the adapter's `LoraConfig` as JSON under the safetensors
header key `lora_adapter_metadata`, and diffusers loads such a file with `LoraConfig(**metadata)`: the
delta of a module is scaled by lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), with lora_alpha and
r overridden per module by `alpha_pattern` / `rank_pattern`. A pipeline's `save_lora_weights` prefixes the
keys with the component (`transformer.lora_alpha`); a model's `save_lora_adapter` writes them bare.

Only plain LoRA deltas (down/up pairs) without an `.alpha` tensor take the header's alpha: a tensor in
the file is more specific, and LoKr/LoHa files carry their own alphas.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from common.errors import CheckpointError
from common.lora_delta import NormalizedLora

METADATA_KEY = "lora_adapter_metadata"
COMPONENT = "transformer"  # the part LoRAs are applied to (host/lora/__init__.py applies to `model.transformer`)


@dataclass(frozen=True)
class AdapterMetadata:
    """The fields of a PEFT `LoraConfig` that decide the strength of each module's delta."""

    lora_alpha: float | None
    r: int | None
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    use_rslora: bool = False

    def alpha_for(self, module: str) -> float | None:
        """The module's alpha: the first `alpha_pattern` key matching its name, else `lora_alpha`."""
        key = _pattern_key(self.alpha_pattern, module)
        return float(self.alpha_pattern[key]) if key is not None else self.lora_alpha

    def scale(self, alpha: float, rank: int) -> float:
        """PEFT's scaling of one module: alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA."""
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def read_adapter_metadata(path: Path) -> AdapterMetadata | None:
    """The LoRA config in the file's header (None when there is none for the transformer).

    Keys prefixed with the component (`transformer.`) win over bare keys; other components' keys
    (`text_encoder.r`) are ignored. A header that is not valid JSON or holds wrong types is an error
    (the caller adds the file's name): applying the LoRA at a guessed strength would be silently wrong.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"LoRA file {path}: cannot read its header ({err})") from err
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"header {METADATA_KEY!r} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"header {METADATA_KEY!r} must be a JSON object")
    prefix = f"{COMPONENT}."
    config = {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)}
    config = config or {k: v for k, v in data.items() if "." not in k}
    if config.get("lora_alpha") is None and not config.get("alpha_pattern"):
        return None
    return _parse(config, f"header {METADATA_KEY!r}")


def _parse(config: Mapping[str, Any], where: str) -> AdapterMetadata:
    def number(key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise CheckpointError(f"{where}: {key} must be a positive number, got {value!r}")
        return float(value)

    def patterns(key: str) -> dict[str, float]:
        value = config.get(key) or {}
        if not isinstance(value, dict):
            raise CheckpointError(f"{where}: {key} must be an object of module pattern -> number, got {value!r}")
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as err:
                raise CheckpointError(f"{where}: {key} pattern {pattern!r} is not a regular expression ({err})") from None
        return {p: number(f"{key}[{p!r}]", v) for p, v in value.items()}

    alpha = config.get("lora_alpha")
    rank = config.get("r")
    return AdapterMetadata(
        lora_alpha=number("lora_alpha", alpha) if alpha is not None else None,
        r=int(number("r", rank)) if rank is not None else None,
        alpha_pattern=patterns("alpha_pattern"),
        rank_pattern={k: int(v) for k, v in patterns("rank_pattern").items()},
        use_rslora=bool(config.get("use_rslora", False)),
    )


def _pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """PEFT's matching: a key starting with '^' matches from the start of the name, any other key must
    match the name's end after a dot (`to_q` matches `layers.0.attention.to_q`)."""
    for key in patterns:
        if re.match(key if key.startswith("^") else rf"(.*\.)?(?:{key})$", module):
            return key
    return None


def apply_adapter_metadata(lora: NormalizedLora, metadata: AdapterMetadata) -> list[str]:
    """Give the header's alpha (and scale) to every plain LoRA delta that has no `.alpha` tensor.

    Returns the modules changed. The rank is the tensors' own; a header `r` that disagrees with it is
    refused, since diffusers could not load such a file either.
    """
    changed = []
    for delta in lora.deltas.values():
        if delta.kind != "lora" or delta.alpha is not None or delta.rank is None:
            continue
        alpha = metadata.alpha_for(delta.module)
        if alpha is None:
            continue
        rank_key = _pattern_key(metadata.rank_pattern, delta.module)
        declared = metadata.rank_pattern[rank_key] if rank_key is not None else metadata.r
        if declared is not None and declared != delta.rank:
            raise CheckpointError(
                f"header {METADATA_KEY!r} says rank {declared} for {delta.module}, but its tensors have rank "
                f"{delta.rank}: the file's header does not belong to its weights"
            )
        delta.alpha, delta.scale, delta.alpha_source = alpha, metadata.scale(alpha, delta.rank), "metadata"
        changed.append(delta.module)
    return changed
