"""int8 weights: load Wan2GP/mmgp quanto files, quantize a built model on the fly, save quanto files.

A transform applied to a built model (the model file never mentions it). The file format is the one
mmgp and optimum-quanto write (REFERENCE.md section 5): a quantized Linear `<m>` stores
`<m>.weight._data` (int8, out x in), `<m>.weight._scale` (out x 1, the source dtype: bf16 in
`*_quanto_bf16_int8` files), `<m>.input_scale` / `<m>.output_scale` (scalars, unused for weight-only
int8), and the safetensors metadata holds `quantization_format: "quanto"` and
`quantization_map_base64` = base64 JSON `{module: {"weights": "qint8", "activations": "none"}}`
(older files: a sidecar `<file stem>_map.json`). Quantized layers are optimum-quanto `QLinear`s, so
mmgp's offload, its LoRA code and our LoRA hooks all recognise them.

Loading never materialises the full-precision weights: quantized Linears are built on the meta device
and receive the file's int8 tensors directly (memory-mapped), with `load_state_dict(assign=True)`.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from common.errors import CheckpointError
from host.atomic import atomic_write

log = logging.getLogger(__name__)

QMAP_KEY = "quantization_map_base64"
QUANTO_ENTRY = {"weights": "qint8", "activations": "none"}
KNOWN_PREFIXES = ("model.",)  # Qwen3ForCausalLM files wrap the Qwen3Model keys
IGNORED_PREFIXES = ("lm_head.",)  # the pipeline only needs hidden states
QUANTO_BUFFERS = ("input_scale", "output_scale")


def is_quantized(model: nn.Module) -> bool:
    """True when the model holds at least one int8 quanto layer."""
    from optimum.quanto import QModuleMixin

    return any(isinstance(m, QModuleMixin) for m in model.modules())


# -- on-the-fly quantization -----------------------------------------------------------------------


def quantize_model(
    model: nn.Module,
    include: Callable[[str], bool] | re.Pattern[str] | str,
    dtype: torch.dtype | None = None,
) -> list[str]:
    """Replace the selected full-precision Linears by int8 `QLinear`s (per-row absmax scales), in place.

    include picks modules by name: a predicate, or a regex matched at the start of the name (the family's
    `ModelFacts.quantize_pattern(component)`). dtype: the compute dtype; each Linear is
    cast to it before quantizing, so the scales (which set the dtype a qint8 layer computes in) match the
    rest of the model (None keeps the Linear's dtype). One layer at a time, so the peak is the model plus
    one layer. Returns the quantized module names.
    """
    from optimum.quanto import QLinear, QModuleMixin, qint8

    include = _name_filter(include)
    names = [
        n for n, m in model.named_modules() if type(m) is nn.Linear and include(n) and not isinstance(m, QModuleMixin)
    ]
    for name in names:
        linear = model.get_submodule(name)
        if dtype is not None and linear.weight.dtype != dtype:
            linear = linear.to(dtype)
        qlinear = QLinear.from_module(linear, weights=qint8)
        with torch.no_grad():
            qlinear.freeze()  # the float weight is replaced by int8 data + per-row scale
        _set_submodule(model, name, qlinear)
    log.info("quantized %d Linear layers to int8 on the fly", len(names))
    return names


def _name_filter(include: Callable[[str], bool] | re.Pattern[str] | str) -> Callable[[str], bool]:
    """A module-name predicate from a predicate or a regex (compiled or not), matched at the name's start."""
    if callable(include):
        return include
    pattern = re.compile(include)
    return lambda name: pattern.match(name) is not None


# -- the dtype int8 layers compute in --------------------------------------------------------------
#
# A qint8 layer computes in the dtype of its scales: quanto casts the activations to it (CUDA and CPU).
# Scales that disagree with the rest of the model give mixed dtypes (e.g. `v` in fp32 beside `q`/`k`
# in bf16, which SDPA refuses), so they follow the compute dtype. On the CPU, bf16 activations send
# quanto to `torch._weight_int8pack_mm`, a native kernel that has killed the whole process on CPUs
# without native bf16 (an AMD EPYC with AVX2 only): there, int8 layers always compute in fp32 through
# quanto's plain path (int8 weights times fp32 scales, then an fp32 matmul), whatever the input dtype.


def set_int8_dtype(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast the scales (and biases) of every int8 layer to `dtype`, in place; returns how many changed."""
    from optimum.quanto import QModuleMixin

    changed = 0
    for module in model.modules():
        if not isinstance(module, QModuleMixin) or not module.frozen:
            continue
        weight = module.weight
        if weight._scale.dtype != dtype:
            module.weight = nn.Parameter(_with_scale_dtype(weight, dtype), requires_grad=False)
            changed += 1
        if module.bias is not None and module.bias.dtype != dtype:
            module.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
    return changed


def cpu_safe_int8(model: nn.Module) -> nn.Module:
    """Make every int8 layer compute in fp32 on the CPU (never `_weight_int8pack_mm`), in place.

    Scales become fp32, and a pre-hook casts a layer's input to fp32 (its output goes back to the input's
    dtype, so the surrounding layers see what they expect). Idempotent; returns the model.
    """
    from optimum.quanto import QModuleMixin

    set_int8_dtype(model, torch.float32)
    for module in model.modules():
        if isinstance(module, QModuleMixin) and not getattr(module, "_wgp_cpu_safe", False):
            module.register_forward_pre_hook(_inputs_to_fp32)
            module.register_forward_hook(_output_to_input_dtype)
            module._wgp_cpu_safe = True
    return model


def _inputs_to_fp32(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    x = args[0]
    module._wgp_input_dtype = x.dtype
    return (x.float(), *args[1:]) if x.dtype != torch.float32 else args


def _output_to_input_dtype(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    dtype = getattr(module, "_wgp_input_dtype", torch.float32)
    return output.to(dtype) if output.dtype != dtype else output


def _with_scale_dtype(weight: Any, dtype: torch.dtype) -> Any:
    """The same int8 data with its per-row scale in `dtype` (a quanto weight's dtype cannot be changed in place)."""
    from optimum.quanto.tensor.weights.qbytes import WeightQBytesTensor

    return WeightQBytesTensor.create(
        weight.qtype, weight.axis, weight.size(), weight.stride(), weight._data, weight._scale.to(dtype), weight.activation_qtype
    )


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


# -- loading pre-quantized files -------------------------------------------------------------------


def read_quantization_map(file: Path, metadata: Mapping[str, str] | None, keys: list[str]) -> dict[str, dict]:
    """The file's {module: {"weights": ..., "activations": ...}}: metadata, else the sidecar
    `<stem>_map.json`, else inferred from the `.weight._data` keys (weights int8, activations none)."""
    encoded = (metadata or {}).get(QMAP_KEY)
    if encoded:
        try:
            return json.loads(base64.b64decode(encoded).decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(
                f"{file}: the quantization map in its metadata is not valid base64 JSON ({exc})"
            ) from exc
    sidecar = file.with_name(f"{file.stem}_map.json")
    if sidecar.is_file():
        try:
            return json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{sidecar}: cannot read the quantization map ({exc})") from exc
    log.warning("%s: no quantization map (metadata or %s); inferring int8 layers from the keys", file, sidecar.name)
    return {k.removesuffix(".weight._data"): dict(QUANTO_ENTRY) for k in keys if k.endswith(".weight._data")}


def load_quanto(
    model: nn.Module, files: list[Path], dtype: torch.dtype | None, device: str | torch.device
) -> nn.Module:
    """Fill a meta-built `model` from quanto int8 file(s) (the family loader's quantized hook).

    Quantized Linears become `QLinear`s holding the file's int8 data; their scales and every other
    float tensor are cast to `dtype` (the compute dtype: a qint8 layer computes in its scale's dtype).
    """
    qmap: dict[str, dict] = {}
    state: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    names = _tensor_names(model)
    for file in files:
        with _open(file) as f:
            keys = list(f.keys())
            file_map = read_quantization_map(file, f.metadata(), keys)
            qmap.update(
                {_model_key(k, names) or k: v for k, v in file_map.items() if not k.startswith(IGNORED_PREFIXES)}
            )
            for key in keys:
                target = _model_key(key, names)
                if target is None:
                    ignored.append(key)
                    continue
                state[target] = _cast(_read(f, file, key), dtype, device)
    _swap_quantized_modules(model, qmap, dtype)
    _fill_quanto_buffers(model, state, dtype, device)
    result = model.load_state_dict(state, strict=False, assign=True)
    log.info("%s: int8 layers %d, ignored keys %s, unexpected %s", files[0], len(qmap), ignored, result.unexpected_keys)
    if result.missing_keys:
        raise CheckpointError(
            f"{files[0]} lacks {len(result.missing_keys)} tensors the model needs, e.g. {result.missing_keys[:6]}; "
            "the file is of another model or variant, or incomplete."
        )
    still_meta = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.device.type == "meta"]
    if still_meta:
        raise CheckpointError(f"{files[0]}: tensors left unloaded: {still_meta[:6]}")
    return model.to(device)


def _tensor_names(model: nn.Module) -> set[str]:
    """Module and tensor names of the model (prefix targets for file keys)."""
    return {n for n, _ in model.named_modules()} | set(model.state_dict().keys())


def _model_key(key: str, names: set[str]) -> str | None:
    """A file key -> the model's name for it (a known wrapper prefix stripped); None for ignored keys.

    A key that matches nothing is returned as is, so `load_state_dict` reports it as unexpected.
    """
    if key.startswith(IGNORED_PREFIXES):
        return None
    if _owner(key) in names:
        return key
    for prefix in KNOWN_PREFIXES:
        if key.startswith(prefix) and _owner(key[len(prefix) :]) in names:
            return key[len(prefix) :]
    return key


def _owner(key: str) -> str:
    """'layers.0.attention.to_q.weight._data' -> 'layers.0.attention.to_q'; a bare parameter name -> itself."""
    for suffix in (".weight._data", ".weight._scale", ".input_scale", ".output_scale", ".weight", ".bias"):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key


def _swap_quantized_modules(model: nn.Module, qmap: Mapping[str, Mapping[str, str]], dtype: torch.dtype | None) -> None:
    """Replace each meta Linear named in the map by an empty meta QLinear of the same shape."""
    from optimum.quanto import QLinear, qint8

    for name, entry in qmap.items():
        if entry.get("weights") != "qint8":
            raise CheckpointError(f"quantized layer {name}: weights {entry.get('weights')!r}; only qint8 is supported")
        try:
            linear = model.get_submodule(name)
        except AttributeError as exc:
            raise CheckpointError(f"the quantization map names {name!r}, which this model does not have") from exc
        if not isinstance(linear, nn.Linear):
            raise CheckpointError(f"the quantization map names {name!r}, a {type(linear).__name__}, not a Linear")
        qlinear = QLinear(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device="meta",
            dtype=dtype or linear.weight.dtype,
            weights=qint8,
        )
        _set_submodule(model, name, qlinear)


def _fill_quanto_buffers(
    model: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype | None, device: Any
) -> None:
    """input_scale / output_scale are unused by weight-only int8; files may omit them: default to 1."""
    from optimum.quanto import QModuleMixin

    for name, module in model.named_modules():
        if isinstance(module, QModuleMixin):
            for buffer in QUANTO_BUFFERS:
                state.setdefault(f"{name}.{buffer}", torch.ones((), dtype=dtype or torch.float32, device=device))


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None, device: Any) -> torch.Tensor:
    """Float tensors (scales included) to the compute dtype; int8 data as stored (still memory-mapped on CPU)."""
    cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
    return tensor.to(device=device, dtype=cast)


def _open(file: Path) -> Any:
    if not Path(file).is_file():
        raise CheckpointError(f"weights file not found: {file}")
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except SafetensorError as exc:
        raise CheckpointError(f"{file} is incomplete or corrupt ({exc}); delete it and download it again.") from exc


def _read(f: Any, file: Path, key: str) -> torch.Tensor:
    try:
        return f.get_tensor(key)
    except SafetensorError as exc:
        raise CheckpointError(f"{file}: cannot read {key} ({exc}); the file is corrupt: download it again.") from exc


# -- saving ----------------------------------------------------------------------------------------


def quantization_map(model: nn.Module) -> dict[str, dict[str, str]]:
    """{module: {"weights": "qint8", "activations": "none"}} for every quanto layer of the model."""
    from optimum.quanto import QModuleMixin

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, QModuleMixin) and module.weight_qtype is not None:
            act = module.activation_qtype
            out[name] = {"weights": module.weight_qtype.name, "activations": "none" if act is None else act.name}
    return out


def save_quantized(
    model: nn.Module,
    path: Path,
    dtype: torch.dtype | None = torch.bfloat16,
    prefix: str = "",
    config: Mapping[str, Any] | None = None,
) -> Path:
    """Write `model` (quantized or not) as a quanto safetensors file that Wan2GP/mmgp and `load_quanto` read.

    dtype: float tensors and int8 scales are written in it (bf16 = the `_quanto_bf16_int8` files; None keeps
    them). prefix: prepended to every key (e.g. "model." for a Qwen3ForCausalLM-style text encoder file).
    config: stored as `config_base64` (default: the model's `config` when it has a `to_dict`). Written to a
    temporary name, then renamed: an interrupted save never leaves a truncated file behind.
    """
    path = Path(path)
    qmap = {f"{prefix}{k}": v for k, v in quantization_map(model).items()}
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        if tensor.untyped_storage().data_ptr() in seen or not tensor.is_contiguous():
            tensor = tensor.contiguous().clone()  # safetensors refuses shared storage
        seen.add(tensor.untyped_storage().data_ptr())
        state[f"{prefix}{key}"] = tensor
    metadata = {"format": "pt", "quantization_format": "quanto"}
    metadata[QMAP_KEY] = base64.b64encode(json.dumps(qmap).encode("utf-8")).decode("ascii")
    config = config if config is not None else _model_config(model)
    if config is not None:
        metadata["config_base64"] = base64.b64encode(json.dumps(config).encode("utf-8")).decode("ascii")
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))
    log.info("saved %s: %d tensors, %d int8 layers", path, len(state), len(qmap))
    return path


def _model_config(model: nn.Module) -> dict[str, Any] | None:
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    return to_dict() if callable(to_dict) else None
