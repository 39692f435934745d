"""Applying LoRA deltas to a built model: a transform, like quantization and offload (the model never knows).

Two modes:
- runtime (default): a forward hook on each target Linear adds sum_i m_i * dW_i x to its output. The
  weights are untouched, so multipliers may change before every step and `detach()` restores the exact
  original outputs. Works on any nn.Linear subclass, including optimum-quanto's int8 QLinear (the
  base weight is never dequantized, except one module at a time to compute a DoRA norm).
- merged: W += sum_i m_i * dW_i once (zero per-step cost); the originals are kept, so `detach()`
  restores them bit for bit. Float weights only, constant multipliers only.

Under mmgp offload on CUDA, mmgp has its own LoRA machinery: `mmgp_state_dict` converts a normalised
LoRA into the key set mmgp reads (the adapter point; see `host/lowvram/offload.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from common.errors import SettingsError
from common.lora_delta import LoraDelta, NormalizedLora, dora_row_factor, dora_weight

log = logging.getLogger(__name__)

Targets = dict[str, tuple[nn.Module, list[tuple[int, "LoraDelta"]]]]  # name -> (module, [(lora index, delta)])
Schedule = Sequence[Sequence[float]]  # per LoRA: one value (constant) or k values stretched over the steps


def multiplier_at(values: Sequence[float], step: int, total: int) -> float:
    """The multiplier for 0-based `step` of `total`: k values split the steps into k equal runs.

    Step s uses values[floor(s * k / total)], e.g. "1,0.5" over 10 steps: 1.0 for steps 0-4, 0.5 for 5-9.
    """
    k = len(values)
    if k == 1 or total <= 0:
        return float(values[0])
    return float(values[min(k - 1, step * k // total)])


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{module name: (out, in)} of every Linear (quantized ones included): what a LoRA may target."""
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def is_quantized(module: nn.Module) -> bool:
    """True for weights stored as a tensor subclass (optimum-quanto QTensor and the like)."""
    return type(module.weight) not in (torch.Tensor, nn.Parameter) or not module.weight.dtype.is_floating_point


def dense_weight(module: nn.Module) -> torch.Tensor:
    """This module's weight as a plain fp32 tensor (dequantizes this one module only)."""
    w = module.weight.detach()
    if is_quantized(module):
        w = w.dequantize()
    return w.float()


@dataclass
class _Entry:
    lora: int  # index of the LoRA this delta belongs to
    delta: LoraDelta
    full: torch.Tensor | None = None  # materialised dW (loha, full, per-column DoRA) in compute dtype
    dora_row: torch.Tensor | None = None  # s = m / ||W + dW|| per output row


@dataclass
class _ModuleHook:
    """Every LoRA delta on one Linear, applied as `output + sum_i m_i * dW_i x` in its forward hook.

    Plain LoRA factors of all LoRAs are concatenated, so 1 or 4 LoRAs cost the same two small
    matmuls: h = x @ A_cat^T (..., sum r); h *= per-column (scale_i * m_i); y += h @ B_cat^T.
    """

    state: LoraRuntime
    entries: list[_Entry]
    down: torch.Tensor | None = None  # (sum r, in)
    up: torch.Tensor | None = None  # (out, sum r)
    owner: torch.Tensor | None = None  # (sum r,) LoRA index of each rank column
    col_scale: torch.Tensor | None = None  # (sum r,) alpha/rank of each rank column
    _vec: torch.Tensor | None = None
    _vec_version: int = -1
    others: list[_Entry] = field(default_factory=list)

    def __post_init__(self) -> None:
        is_plain = [e.delta.kind == "lora" and e.dora_row is None and e.full is None for e in self.entries]
        plain = [e for e, p in zip(self.entries, is_plain, strict=True) if p]
        self.others = [e for e, p in zip(self.entries, is_plain, strict=True) if not p]
        if plain:
            self.down = torch.cat([e.delta.factors["down"] for e in plain], dim=0)
            self.up = torch.cat([e.delta.factors["up"] for e in plain], dim=1)
            self.owner = torch.cat([torch.full((e.delta.rank,), e.lora, device="cpu") for e in plain])
            self.col_scale = torch.cat([torch.full((e.delta.rank,), e.delta.scale, device="cpu") for e in plain])

    def _fit(self, x: torch.Tensor) -> None:
        """Move every factor to x's device and dtype once (first call, or after the model moved)."""
        if self.down is not None and (self.down.device != x.device or self.down.dtype != x.dtype):
            self.down, self.up = self.down.to(x), self.up.to(x)
            self._vec_version = -1
        for e in self.others:
            ref = e.full if e.full is not None else next(iter(e.delta.factors.values()))
            if ref.device != x.device or ref.dtype != x.dtype:
                e.delta = e.delta.to(x.device, x.dtype)
                e.full = None if e.full is None else e.full.to(x)
                e.dora_row = None if e.dora_row is None else e.dora_row.to(x)

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        self._fit(x)
        mults = self.state.multipliers
        out = output
        if self.down is not None:
            if self._vec_version != self.state.version:
                m = torch.tensor(mults, dtype=torch.float32, device="cpu")[self.owner] * self.col_scale
                self._vec, self._vec_version = m.to(x), self.state.version
            out = out + ((x @ self.down.T) * self._vec) @ self.up.T
        for e in self.others:
            m = mults[e.lora]
            if m == 0:
                continue
            d = x @ e.full.T if e.full is not None else e.delta.forward(x)
            if e.dora_row is not None:  # s * (W x + dW x) - W x, with W x = output - bias
                base = output if module.bias is None else output - module.bias.to(output.dtype)
                d = (e.dora_row - 1) * base + e.dora_row * d
            if e.delta.bias is not None:
                d = d + e.delta.bias
            out = out + m * d
        return out


class LoraRuntime:
    """LoRAs attached to one model. Call `before_step(step, total)` before each denoising step (schedules)."""

    def __init__(self, model: nn.Module, loras: Sequence[NormalizedLora], schedules: Schedule, merged: bool = False):
        if len(schedules) != len(loras):
            raise SettingsError(f"{len(loras)} LoRA(s) but {len(schedules)} multiplier(s)")
        self.model = model
        self.schedules = [list(s) for s in schedules]
        self.merged = merged
        self.multipliers = [multiplier_at(s, 0, 1) for s in self.schedules]
        self.version = 0
        self.total_steps = 1
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._originals: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        by_module = _group(model, loras)
        if merged:
            self._merge(by_module)
        else:
            self._hook(by_module)

    # -- per-step multipliers ------------------------------------------------------------------

    def set_step(self, step: int, total: int | None = None) -> None:
        """Select the multipliers for 0-based `step` of `total` (the total is remembered)."""
        if total is not None:
            self.total_steps = total
        new = [multiplier_at(s, step, self.total_steps) for s in self.schedules]
        if new != self.multipliers:
            if self.merged:
                raise SettingsError("per-step LoRA multipliers need runtime mode; merged LoRAs are fixed")
            self.multipliers, self.version = new, self.version + 1

    def before_step(self, step: int, total: int) -> None:
        """Hook for a pipeline that calls back before each step (0-based)."""
        self.set_step(step, total)

    # -- attach / detach -----------------------------------------------------------------------

    def _hook(self, by_module: Targets) -> None:
        for module, items in by_module.values():
            entries = [_runtime_entry(module, i, d) for i, d in items]
            self._handles.append(module.register_forward_hook(_ModuleHook(self, entries)))

    def _merge(self, by_module: Targets) -> None:
        if any(len(s) > 1 for s in self.schedules):
            raise SettingsError("merged LoRAs take one multiplier each; use runtime mode for per-step schedules")
        for name, (module, items) in by_module.items():
            if is_quantized(module):
                self.detach()
                raise SettingsError(
                    f"cannot merge LoRAs into the quantized layer {name}: use runtime mode (the default) on int8 models"
                )
            base = module.weight.detach().float()
            new_w, new_b = base.clone(), None
            for i, d in items:
                new_w += self.multipliers[i] * _effective_delta(base, d)
                if d.bias is not None:
                    new_b = (new_b if new_b is not None else 0) + self.multipliers[i] * d.bias.to(base.device)
            bias = module.bias.detach().clone() if module.bias is not None else None
            self._originals[name] = (module.weight.detach().clone(), bias)
            with torch.no_grad():
                write_weight(module, new_w.to(self._originals[name][0].dtype))
                if new_b is not None and module.bias is not None:
                    module.bias.add_(new_b.to(module.bias))

    def detach(self) -> None:
        """Remove every hook / restore every merged weight: outputs are exactly those before attaching."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        modules = dict(self.model.named_modules())
        with torch.no_grad():
            for name, (w, b) in self._originals.items():
                write_weight(modules[name], w)
                if b is not None:
                    modules[name].bias.copy_(b)
        self._originals.clear()


def write_weight(module: nn.Module, value: torch.Tensor) -> None:
    """Set a layer's weight values: in place when it is a Parameter (mmgp and the optimizer-free hooks hold that
    object), else by assignment (a layer whose `weight` is computed, e.g. host/lowvram/packed_linear.py's, takes
    the new values that way; an in-place write to its copy would be lost)."""
    if isinstance(module.weight, nn.Parameter):
        module.weight.copy_(value)
    else:
        module.weight = value


def _group(model: nn.Module, loras: Sequence[NormalizedLora]) -> Targets:
    modules = dict(model.named_modules())
    out: Targets = {}
    for i, lora in enumerate(loras):
        for name, delta in lora.deltas.items():
            module = modules.get(name)
            if not isinstance(module, nn.Linear):
                raise SettingsError(f"LoRA {i + 1} targets {name!r}, which is not a Linear layer of this model")
            out.setdefault(name, (module, []))[1].append((i, delta))
    return out


def _compute_dtype(module: nn.Module) -> torch.dtype:
    w = module.weight
    return w.dtype if w.dtype.is_floating_point else torch.bfloat16


def _effective_delta(base: torch.Tensor, delta: LoraDelta) -> torch.Tensor:
    """dW in fp32 on base's device; with DoRA, W_dora - W."""
    dw = delta.weight().to(base.device)
    if delta.dora_scale is None:
        return dw
    return dora_weight(base, dw, delta.dora_scale.to(base.device)) - base


def _runtime_entry(module: nn.Module, lora: int, delta: LoraDelta) -> _Entry:
    device = module.weight.device if module.weight.device.type != "meta" else torch.device("cpu")
    dtype = _compute_dtype(module)
    entry = _Entry(lora, delta.to(device, dtype))
    if delta.dora_scale is not None:
        base = dense_weight(module)  # one module at a time, even on a quantized model
        dw = delta.weight().to(base.device)
        row = dora_row_factor(base, dw, delta.dora_scale.to(base.device))
        if row is not None:
            entry.dora_row = row.to(device, dtype)
        else:  # per-column norm: no cheap form, keep the effective full delta
            entry.full = (dora_weight(base, dw, delta.dora_scale.to(base.device)) - base).to(device, dtype)
    if delta.kind in ("loha", "full") and entry.full is None:
        entry.full = delta.weight().to(device, dtype)
    return entry


def mmgp_state_dict(lora: NormalizedLora) -> dict[str, torch.Tensor]:
    """The key set mmgp's `offload.load_loras_into_model` reads, scale folded in (no alpha keys).

    Use as `preprocess_sd=lambda sd: mmgp_state_dict(normalize(sd))`, with per-step multipliers given
    to mmgp as lists (it indexes them with `offload.set_step_no_for_lora`).
    """
    sd: dict[str, torch.Tensor] = {}
    for name, d in lora.deltas.items():
        if d.kind == "lora":
            sd[f"{name}.lora_A.weight"] = d.factors["down"]
            sd[f"{name}.lora_B.weight"] = d.factors["up"] * d.scale
        elif d.kind == "lokr" and d.dora_scale is None:
            sd[f"{name}.lokr_w1"] = d.factors["w1"] * d.scale
            sd[f"{name}.lokr_w2"] = d.factors["w2"]
        else:
            sd[f"{name}.diff"] = d.weight()
        if d.bias is not None:
            sd[f"{name}.diff_b"] = d.bias
        if d.dora_scale is not None:
            sd[f"{name}.dora_scale"] = d.dora_scale.reshape(-1, 1) if d.dora_scale.dim() == 1 else d.dora_scale
    return sd
