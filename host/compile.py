"""`compile`: torch.compile of the denoiser's repeated blocks, as a host transform (opt-in, never the default).

Which blocks: a part of the model lists the class names of its repeated blocks in `_repeated_blocks`, as
diffusers' models do for `compile_repeated_blocks`; every module of the denoiser (and of the auxiliary parts
that run beside it at every step) whose class is listed is compiled in place with `nn.Module.compile()`. The
modules stay the same objects, so the model's hooks, LoRA forward hooks and mmgp keep seeing them; removing
the transform puts back the eager call (`_compiled_call_impl = None`, what `nn.Module.compile` sets). The
blocks of one class share one compiled graph per input shape: the block code is compiled once, not 30 times.

On CUDA the parts are offloaded by mmgp, whose own wrappers replace every module's forward; its `profile()`
compiles the blocks itself in a way that keeps its loading outside the compiled code (its `compile` argument:
host/lowvram/offload.py), so there this transform compiles nothing (`compile_blocks=False`) and only reports,
falls back and follows hook changes.

What it reports (`CompileReport`, kept as `last_report` after each generation): whether compiled code ran,
how many blocks, and `compile_s`, the extra time of the generation's denoiser forwards over their steady time
(the median of the forwards after the first), when graphs were compiled during that generation (the first
after compiling, a new size, LoRAs changed). A compile that fails (no C compiler for inductor on the CPU,
an unsupported operation) falls back to eager with one warning, and the report says compile was not used.

PyTorch does not guard compiled code against module hooks added or removed later
(`torch._dynamo.config.skip_nnmodule_hook_guards`): a LoRA attached after compiling would be silently left
out. So at the start of each generation the hooks on the compiled parts are compared with those the code was
compiled with, and on a change the compiled code is dropped (`torch.compiler.reset()`, process-wide: the
session holds one model) and compiled again on the next call.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from common.model_facts import AUXILIARY, DENOISER, ModelFacts
from host.transforms import component, hooks_of

log = logging.getLogger(__name__)

REPEATED_BLOCKS = "_repeated_blocks"  # diffusers' attribute: class names of a model's repeated blocks
# Cache entries per compiled code object: every block class shares `Module._call_impl`'s, and each needs one
# entry per shape kind (static, then dynamic) and per hook state (a LoRA's multiplier version): PyTorch's
# default of 8 would send later variants back to eager without saying so in the image.
RECOMPILE_LIMIT = 64


@dataclass
class CompileReport:
    """What compiling did in one generation (saved in the image's generation_info as `compile`)."""

    used: bool  # compiled code ran (False: fell back to eager, or nothing to compile)
    blocks: int = 0
    compile_s: float | None = None  # extra seconds of this generation's forwards spent compiling (None: none)
    reason: str | None = None  # why compiled code was not used

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"used": self.used, "blocks": self.blocks}
        if self.compile_s is not None:
            out["compile_s"] = round(self.compile_s, 3)
        if self.reason is not None:
            out["reason"] = self.reason
        return out


def repeated_blocks(part: nn.Module) -> list[nn.Module]:
    """The modules of `part` whose class name its `_repeated_blocks` lists (empty when it declares none)."""
    names = set(getattr(part, REPEATED_BLOCKS, None) or ())
    return [m for m in part.modules() if type(m).__name__ in names] if names else []


def compile_errors() -> tuple[type[BaseException], ...]:
    """What a failing compile raises at the first call (inductor's InvalidCxxCompiler arrives wrapped in these)."""
    import torch._dynamo.exc

    return (torch._dynamo.exc.TorchDynamoException,)


def compiled_graphs() -> int | None:
    """Graphs compiled so far in this process (dynamo's own count; None where this PyTorch does not keep it)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return None
    return int(counters["stats"]["unique_graphs"])


def hook_signature(parts: list[nn.Module]) -> tuple[Any, ...]:
    """The module hooks inside `parts` (their identities): what compiled code silently depends on."""
    sig = []
    for part in parts:
        for name, module in part.named_modules():
            for kind in ("_forward_pre_hooks", "_forward_hooks"):
                hooks = getattr(module, kind, None)
                if hooks:
                    sig.append((id(part), name, kind, tuple((k, id(h)) for k, h in hooks.items())))
    return tuple(sig)


@dataclass
class CompileTransform:
    """Compile the repeated blocks of the model's per-step parts (see the module docstring).

    facts: the family's facts (the parts with role denoiser or auxiliary; None: every part the model lists).
    compile_blocks: False where mmgp compiled them already (CUDA), so only the reporting and fallback remain.
    dynamic: torch.compile's `dynamic` (None: PyTorch's default, static first and dynamic after a new size).
    """

    facts: ModelFacts | None = None
    compile_blocks: bool = True
    dynamic: bool | None = None
    name: str = "compile"
    reversible: bool = True
    last_report: CompileReport | None = None
    blocks: list[nn.Module] = field(default_factory=list)
    _parts: list[nn.Module] = field(default_factory=list)
    _handles: list[Any] = field(default_factory=list)
    _failed: str | None = None
    _signature: tuple[Any, ...] | None = None
    _running: bool = False
    _graphs_at_start: int | None = None
    _fresh: bool = True  # nothing run since compiling: the next generation compiles
    _durations: list[float] = field(default_factory=list)
    _started: float = 0.0

    def apply(self, model: Any) -> None:
        self._parts = self._per_step_parts(model)
        self.blocks = [block for part in self._parts for block in repeated_blocks(part)]
        self._failed = None if self.blocks or not self.compile_blocks else "the model declares no repeated blocks to compile"
        if self._failed:
            log.warning("compile: %s; running eager", self._failed)
        if self.compile_blocks:
            _raise_recompile_limit()
            for block in self.blocks:
                block.compile(dynamic=self.dynamic)
        for part in self._parts[:1]:  # the forwards timed are the denoiser's (the first per-step part)
            self._handles.append(part.register_forward_pre_hook(self._forward_started))
            self._handles.append(part.register_forward_hook(self._forward_ended))
        self._signature, self._fresh = hook_signature(self._parts), True  # with the timing hooks just added
        hooks = hooks_of(model)
        if hooks is not None:
            hooks.predict.add(self.name, self._predict)
            hooks.before_step.add(self.name, lambda step, total: self._stay_innermost(hooks))
            hooks.after_generate.add(self.name, self._finish)
        log.info("compile: %d repeated blocks of %s", len(self.blocks), ", ".join(type(p).__name__ for p in self._parts))

    def remove(self, model: Any) -> None:
        self._uncompile()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        hooks = hooks_of(model)
        if hooks is not None:
            hooks.predict.remove(self.name)
            hooks.before_step.remove(self.name)
            hooks.after_generate.remove(self.name)

    # -- parts -------------------------------------------------------------------------------------

    def _per_step_parts(self, model: Any) -> list[nn.Module]:
        """The denoiser first, then the auxiliary parts (by the facts), as loaded now."""
        if self.facts is not None:
            names = [c.name for c in self.facts.components if c.role == DENOISER]
            names += [c.name for c in self.facts.components if c.role == AUXILIARY]
        else:
            names = list(model.components()) if callable(getattr(model, "components", None)) else []
        parts = [component(model, name) for name in names]
        return [p for p in parts if isinstance(p, nn.Module)]

    def _uncompile(self) -> None:
        for block in self.blocks:
            block._compiled_call_impl = None  # what nn.Module.compile set: back to the eager call

    # -- one generation ----------------------------------------------------------------------------

    def _predict(self, call_next: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Each denoiser evaluation: eager after a failure; a compile error turns compile off and reruns it eagerly."""
        if not self._running:
            self._start()
        if self._failed is not None:
            with _eager():
                return call_next(*args, **kwargs)
        try:
            return call_next(*args, **kwargs)
        except compile_errors() as exc:
            self._fall_back(exc)
            with _eager():
                return call_next(*args, **kwargs)

    def _stay_innermost(self, hooks: Any) -> None:
        """Keep the `predict` middleware innermost (a step cache pushed for the run goes below it otherwise), so an
        evaluation retried eagerly is retried below every other middleware, which each see it once."""
        if hooks.predict.owners[-1:] != [self.name]:
            hooks.predict.add(self.name, self._predict)

    def _start(self) -> None:
        self._running, self._durations = True, []
        signature = hook_signature(self._parts)
        if signature != self._signature and self._failed is None:
            log.info("compile: the hooks on the compiled blocks changed (LoRAs); compiling again")
            torch.compiler.reset()  # compiled code does not see hooks added or removed later
            self._signature, self._fresh = signature, True
        self._graphs_at_start = compiled_graphs()

    def _fall_back(self, exc: BaseException) -> None:
        first_line = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        self._failed = f"compiling failed ({type(exc).__name__}: {first_line.strip()})"
        log.warning(
            "compile: %s; running eager instead (on the CPU inductor needs a C++ compiler: install g++, or set CXX; "
            "or leave --compile off)", self._failed,
        )
        self._uncompile()

    def _forward_started(self, module: nn.Module, args: Any) -> None:
        _synchronize(args)
        self._started = time.perf_counter()

    def _forward_ended(self, module: nn.Module, args: Any, output: Any) -> None:
        _synchronize(output)
        self._durations.append(time.perf_counter() - self._started)

    def _finish(self) -> None:
        """After a generation: the report (compile_s when graphs were compiled during it)."""
        graphs = compiled_graphs()
        compiled_now = self._fresh if graphs is None or self._graphs_at_start is None else graphs > self._graphs_at_start
        compile_s = extra_seconds(self._durations) if compiled_now and self._failed is None and self._durations else None
        self.last_report = CompileReport(
            used=self._failed is None and bool(self.blocks or not self.compile_blocks),
            blocks=len(self.blocks),
            compile_s=compile_s,
            reason=self._failed,
        )
        self._running, self._fresh = False, False


def extra_seconds(durations: list[float]) -> float:
    """Seconds the forwards took beyond their steady time (the median of those after the first): what compiling
    added. With one forward, that forward's whole time (an upper bound)."""
    if len(durations) < 2:
        return durations[0]
    steady = statistics.median(durations[1:])
    return sum(max(0.0, d - steady) for d in durations)


def _synchronize(value: Any) -> None:
    """Wait for the GPU before reading the clock (kernels run asynchronously); nothing on the CPU."""
    tensors: Iterator[Any] = iter(value if isinstance(value, (tuple, list)) else (value,))
    if any(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors):
        torch.cuda.synchronize()


def _eager() -> Any:
    """Run every compiled function eagerly inside the block (ours, and mmgp's on CUDA)."""
    return torch.compiler.set_stance("force_eager")


def _raise_recompile_limit() -> None:
    import torch._dynamo

    config = torch._dynamo.config
    key = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    if getattr(config, key) < RECOMPILE_LIMIT:
        log.debug("compile: torch._dynamo.config.%s raised to %d", key, RECOMPILE_LIMIT)
        setattr(config, key, RECOMPILE_LIMIT)
