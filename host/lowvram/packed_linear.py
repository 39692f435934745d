"""Packed linears: on the CPU, the denoiser's large Linear layers multiply through oneDNN with their weights
held once, in oneDNN's own blocked layout (`packed_linears`, always on where it applies).

Why: PyTorch runs an fp32 `nn.Linear` on the CPU as an MKL sgemm. oneDNN's fp32 kernels with a weight reordered
once into their blocked layout are faster on the machine measured here (2-core AMD EPYC, AVX2: 63-67 against
55-64 GFLOP/s on the mid model's shapes, one CFG forward 0.81 of diffusers' time against 0.87 with PyTorch's
linears; `bench/bench_packed_linear.py`, README "Packed linears"), and about 75% of a CPU transformer forward is
these matmuls. It is the layout PyTorch's own inductor gives frozen CPU linears
(`torch.ops.mkldnn._reorder_linear_weight` + `_linear_pointwise`); here it runs eager, with no compile step.

Memory: the packed weight replaces the dense one (same bytes); nothing is held twice. `PackedLinear.weight`
still answers with the dense (out, in) values, as a fresh copy (LoRA runtime hooks, DoRA factors, state_dict);
it is read-only (an inference tensor: changing it in place raises) and assigning a new weight packs it again.
Numerics: the same products in another summation order, a float rounding apart (3e-6 on a 768-deep product of
unit-scale values); a generation stays within 1/255 of diffusers' pixels (bench/bench_engine.py).

Where it applies: the CPU, fp32 weights (bf16 or int8 layers are left alone: CPUs without native bf16 emulate
it, and int8 has its own kernels), the denoiser's and its auxiliary parts' Linears whose both sides are at least
`min_features` wide (the ones that see every token; a time-embedding GEMV gains nothing), oneDNN present and
passing a self-check on a small layer. Removing the transform puts the original nn.Linear modules back, with
dense weights equal to the packed values.

torch.compile (`--compile`, host/compile.py): dynamo cannot trace oneDNN's packed tensor (it has no storage to
make a fake of), so inside compiled code a packed layer calls the custom op `wgp::packed_linear`, which takes a
0-d integer tensor naming the packed weight in a registry instead of the weight itself. Inductor leaves the op
as an external call and fuses the element-wise work around it; the handle is an input like any tensor, so the
blocks still share one graph, and a weight assigned later (a merged LoRA) is found through the same handle.
Measured on bench_engine's mid model, one CFG forward (separate processes): compiled blocks with dense layers
6.42 s against 6.40 s eager dense, so before this op `--compile` on the CPU gave up the packing for nothing;
compiled around the packed op, 0.965 of the eager packed forward (5.86 against 6.07 s, alternated in one
process).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import itertools
import logging
import mmap
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.model_facts import AUXILIARY, DENOISER, ModelFacts
from host.transforms import component

log = logging.getLogger(__name__)

MIN_FEATURES = 512  # both sides of a packed layer at least this wide (the released model: 3840 and 10240)
BATCH_HINT = 2048  # rows oneDNN is told to expect when choosing the blocked layout (tokens of one CFG forward)


# handle -> packed weight, for the custom op below. Weak values: the layer holds its packed weight, so a
# released model's weights do not stay alive here.
_PACKED: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
_HANDLES = itertools.count()


@torch.library.custom_op("wgp::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, handle: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """x @ W.T + bias with W the packed weight registered under `handle` (what compiled code calls)."""
    return torch.ops.mkldnn._linear_pointwise(x, _PACKED[int(handle)], bias, "none", [], "")


@packed_linear.register_fake
def _packed_linear_shape(x: torch.Tensor, handle: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


class PackedLinear(nn.Linear):
    """An nn.Linear whose weight lives once in oneDNN's blocked layout and is multiplied by oneDNN.

    Built from an existing layer (`from_linear`); the bias stays an ordinary parameter. `weight` reads as a
    dense read-only copy and can be assigned (packed again); `state_dict()` holds the dense weight as before.
    """

    packed: torch.Tensor  # oneDNN (mkldnn layout) tensor, (out, in) logically

    @classmethod
    def from_linear(cls, linear: nn.Linear, batch_hint: int = BATCH_HINT) -> PackedLinear:
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        object.__setattr__(layer, "batch_hint", batch_hint)
        # names the packed weight for compiled code (`packed_linear`); not part of the state dict
        layer.register_buffer("handle", torch.tensor(next(_HANDLES)), persistent=False)
        layer.register_parameter("bias", linear.bias)
        layer.weight = linear.weight  # packs (__setattr__)
        layer.train(linear.training)
        share_hooks(linear, layer)
        return layer

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "weight":  # nn.Module would file a Parameter under _parameters, beside the packed copy
            if value.dtype != torch.float32 or value.device.type != "cpu":
                raise ValueError(f"PackedLinear holds fp32 CPU weights (got {value.dtype} on {value.device})")
            with torch.no_grad():
                packed = torch.ops.mkldnn._reorder_linear_weight(value.detach().contiguous(), self.batch_hint)
            object.__setattr__(self, "packed", packed)
            _PACKED[int(self.handle)] = packed
            return
        super().__setattr__(name, value)

    @property  # type: ignore[override]
    def weight(self) -> torch.Tensor:
        """The dense (out, in) weight, a fresh copy: read-only (in-place changes would be lost, so they raise)."""
        with torch.inference_mode():
            return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad)):
            # oneDNN's packed op has no backward formula (PyTorch would warn and give wrong gradients)
            return nn.functional.linear(x, self.packed.to_dense(), self.bias)
        if torch.compiler.is_compiling():
            return packed_linear(x, self.handle, self.bias, self.out_features)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def to_linear(self) -> nn.Linear:
        """An ordinary nn.Linear with the same (dense) weight and the same bias parameter."""
        with torch.device("meta"):
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.weight = nn.Parameter(self.packed.to_dense(), requires_grad=False)
        linear.bias = self.bias
        linear.train(self.training)
        share_hooks(self, linear)
        return linear

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.packed.to_dense()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        key = prefix + "weight"
        if key in state_dict:
            self.weight = state_dict[key]
        else:  # args: local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            args[2].append(key)
        super()._load_from_state_dict({k: v for k, v in state_dict.items() if k != key}, prefix, *args)

    def _apply(self, fn: Any, recurse: bool = True) -> PackedLinear:
        """`.to()`, `.float()` and the like: only what keeps fp32 on the CPU; anything else is refused with the
        fix (the packing is a CPU form)."""
        moved = fn(torch.empty(0, dtype=torch.float32))
        if moved.dtype != torch.float32 or moved.device.type != "cpu":
            raise RuntimeError(
                "this model's linears are packed for the CPU (transform packed_linears): remove that transform "
                f"before moving it to {moved.device} / {moved.dtype}"
            )
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", packed for oneDNN"


HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
              "_forward_pre_hooks_with_kwargs")


def share_hooks(source: nn.Module, target: nn.Module) -> None:
    """`target` takes `source`'s hook dictionaries themselves (not copies), so the handles already given out
    (a LoRA's, to remove its hooks later) still reach the hooks on the swapped-in layer."""
    for name in HOOK_DICTS:
        object.__setattr__(target, name, getattr(source, name))


MADV_DONTNEED = 4  # Linux


class FilePages:
    """Hands back to the page cache the resident pages of weights read from a memory-mapped file once they are
    packed. The loader leaves weights already in the compute dtype backed by the safetensors mapping
    (models/z_image/loading_z_image.py); one mapping serves the whole file and stays while any tensor of it
    lives, so the pages a packed layer no longer reads would stay in the process's resident size beside the
    packed copy (measured: +336 MB on bench_engine's mid model, the size of its packed weights).
    MADV_DONTNEED on a private file mapping drops the pages; touched again, they are read again from the file,
    so nothing changes for a reader. Only whole pages inside the tensor, only in private file mappings whose
    file still exists (not anonymous memory: there it would zero the values); elsewhere (no Linux, no libc)
    nothing happens."""

    def __init__(self) -> None:
        self.mappings: list[tuple[int, int]] = []
        self.madvise: Any = None
        try:
            lines = Path("/proc/self/maps").read_text().splitlines()
            libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        except (OSError, TypeError):
            return
        for line in lines:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[1].endswith("p") and fields[5].startswith("/") and not fields[5].endswith("(deleted)"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                self.mappings.append((start, end))
        self.madvise = libc.madvise
        self.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.page = mmap.PAGESIZE

    def drop(self, tensor: torch.Tensor) -> int:
        """Drop the whole pages of `tensor` if it lies in a private file mapping; returns the bytes dropped."""
        if self.madvise is None or tensor.device.type != "cpu":
            return 0
        first, last = tensor.data_ptr(), tensor.data_ptr() + tensor.nbytes
        if not any(start <= first and last <= end for start, end in self.mappings):
            return 0
        start = -(-first // self.page) * self.page
        end = last // self.page * self.page
        if end <= start or self.madvise(start, end - start, MADV_DONTNEED) != 0:
            return 0
        return end - start


@functools.cache
def onednn_works() -> bool:
    """oneDNN is built in and its packed fp32 linear matches F.linear on a small layer (checked once)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        x, w = torch.randn(8, 64, generator=gen), torch.randn(32, 64, generator=gen)
        b = torch.randn(32, generator=gen)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 8)
        got = torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
        return bool(torch.allclose(got, nn.functional.linear(x, w, b), rtol=1e-4, atol=1e-4))
    except (RuntimeError, AttributeError, NotImplementedError) as err:
        log.info("oneDNN linear unavailable (%s): the CPU linears stay PyTorch's", err)
        return False


def packable(module: nn.Module, min_features: int) -> bool:
    """A plain fp32 CPU nn.Linear (not a quantized or otherwise wrapped one) with both sides >= min_features."""
    if type(module) is not nn.Linear:
        return False
    w = module.weight
    return (
        type(w) in (torch.Tensor, nn.Parameter)
        and w.dtype == torch.float32
        and w.device.type == "cpu"
        and min(module.in_features, module.out_features) >= min_features
    )


@dataclass
class PackedLinears:
    """Swap the denoiser's (and auxiliary parts') large fp32 Linears for `PackedLinear` on the CPU."""

    enabled: bool
    facts: ModelFacts | None = None
    min_features: int | None = None  # None: MIN_FEATURES, read when applied
    name: str = "packed_linears"
    reversible: bool = True
    packed: list[str] = field(default_factory=list)  # qualified names of the swapped layers

    def apply(self, model: Any) -> None:
        if not self.enabled or not onednn_works():
            return
        min_features = MIN_FEATURES if self.min_features is None else self.min_features
        pages, dropped = FilePages(), 0
        for part_name, part in self._parts(model):
            for parent_name, parent in list(part.named_modules()):
                for child_name, child in list(parent.named_children()):
                    if packable(child, min_features):
                        setattr(parent, child_name, PackedLinear.from_linear(child))
                        self.packed.append(".".join(n for n in (part_name, parent_name, child_name) if n))
                        dropped += pages.drop(child.weight)  # read once into the packed copy: the file's pages go
        if self.packed:
            log.debug("packed %d linears for oneDNN (%.0f MB of file pages handed back)", len(self.packed), dropped / 2**20)

    def remove(self, model: Any) -> None:
        for _, part in self._parts(model):
            for parent in list(part.modules()):
                for child_name, child in list(parent.named_children()):
                    if isinstance(child, PackedLinear):
                        setattr(parent, child_name, child.to_linear())
        self.packed.clear()

    def _parts(self, model: Any) -> list[tuple[str, nn.Module]]:
        if self.facts is not None:
            names = [c.name for c in self.facts.components if c.role in (DENOISER, AUXILIARY)]
        else:
            names = ["transformer"]
        parts = [(name, component(model, name)) for name in names]
        return [(name, part) for name, part in parts if isinstance(part, nn.Module)]
