"""int8 weights: quanto files load without full-precision copies, save round-trips (here and through
mmgp), on-the-fly quantization keeps the sensitive parts, and int8 output stays close to fp32."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from common.errors import CheckpointError
from host.lowvram.quantize import (
    cpu_safe_int8,
    is_quantized,
    load_quanto,
    quantization_map,
    quantize_model,
    save_quantized,
    set_int8_dtype,
)
from models.z_image import loading_z_image as loading
from models.z_image.facts_z_image import FACTS
from models.z_image.tiny_z_image import TINY_CONFIG

F32 = torch.float32


@pytest.fixture()
def hooked(monkeypatch: pytest.MonkeyPatch) -> None:
    """The family loader with our int8 hook registered (as the handler does from the host's options)."""
    monkeypatch.setattr(loading, "_QUANTIZED_LOADERS", {})
    loading.register_quantized_loader(load_quanto)


@pytest.fixture(scope="module")
def fp32_transformer(tiny_flat_layout: dict[str, Path]) -> torch.nn.Module:
    return loading.load_transformer(tiny_flat_layout["transformer"], None, F32)


def _inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 16, 8, 8, generator=g)
    t = torch.tensor([0.3, 0.7])
    captions = [torch.randn(7, 64, generator=g), torch.randn(12, 64, generator=g)]
    return latents, t, captions


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _write_int8(tmp_path: Path, flat_transformer: Path, name: str = "ZImageTurbo_quanto_bf16_int8.safetensors") -> Path:
    model = loading.load_transformer(flat_transformer, None, F32)
    quantize_model(model, include=FACTS.quantize_pattern("transformer"))
    return save_quantized(model, tmp_path / name)


def test_on_the_fly_quantizes_only_the_repeated_blocks(tiny_flat_layout: dict[str, Path]) -> None:
    from models.z_image.z_image_handler import family_handler

    model = loading.load_transformer(tiny_flat_layout["transformer"], None, F32)
    names = quantize_model(model, include=family_handler.query_model_facts("z_image", {}).quantize_pattern("transformer"))
    assert names and all(n.startswith("layers.") for n in names)
    per_layer = 4 + 3 + 1  # q k v out, w1 w2 w3, adaLN
    assert len(names) == TINY_CONFIG.n_layers * per_layer
    qmap = quantization_map(model)
    assert set(qmap) == set(names) and all(v == {"weights": "qint8", "activations": "none"} for v in qmap.values())
    for kept in ("noise_refiner.0.attention.to_q", "context_refiner.0.feed_forward.w1", "cap_embedder.1"):
        assert type(model.get_submodule(kept)) is torch.nn.Linear  # full precision
    assert model.get_submodule("layers.0.attention.to_q").weight._data.dtype == torch.int8


def test_on_the_fly_quantizes_what_the_pattern_names(tiny_flat_layout: dict[str, Path]) -> None:
    """The pattern (a family's `ModelFacts.quantize_pattern`) decides: here only the refiners' Linears."""
    model = loading.load_transformer(tiny_flat_layout["transformer"], None, F32)
    refiners = ("noise_refiner.", "context_refiner.")
    expected = {n for n, m in model.named_modules() if type(m) is torch.nn.Linear and n.startswith(refiners)}
    names = quantize_model(model, include=r"^(noise|context)_refiner\.")
    assert expected and set(names) == expected
    assert type(model.get_submodule("layers.0.attention.to_q")) is torch.nn.Linear  # not named: full precision


def test_int8_quality_close_to_fp32(fp32_transformer: torch.nn.Module, tiny_flat_layout: dict[str, Path]) -> None:
    """Metric: relative L2 error ||y_int8 - y_fp32|| / ||y_fp32|| of one transformer forward (same inputs).

    Bound 3%: per-row absmax int8 rounds each weight by at most scale/2 = absmax/254, a relative weight
    error of ~0.3-0.5% RMS for Gaussian rows; through 2 blocks (each with 8 int8 matmuls, errors adding
    in quadrature, amplified a little by the norms) that stays around 1%. 3% leaves margin while still
    catching a real bug (a wrong scale axis or a missing scale gives errors of 50-100%+).
    """
    model = loading.load_transformer(tiny_flat_layout["transformer"], None, F32)
    quantize_model(model, include=FACTS.quantize_pattern("transformer"))
    latents, t, captions = _inputs()
    with torch.no_grad():
        ref, out = fp32_transformer(latents, t, captions), model(latents, t, captions)
    err = _rel_err(out, ref)
    assert 0 < err < 0.03, err


def test_int8_file_loads_through_the_family_loader(
    hooked: None, tmp_path: Path, tiny_flat_layout: dict[str, Path]
) -> None:
    path = _write_int8(tmp_path, tiny_flat_layout["transformer"])
    with safe_open(str(path), framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert meta["quantization_format"] == "quanto"
    qmap = json.loads(base64.b64decode(meta["quantization_map_base64"]))
    assert "layers.0.attention.to_q" in qmap and "layers.0.attention.to_q.weight._data" in keys
    assert {"layers.0.attention.to_q.weight._scale", "layers.0.attention.to_q.input_scale"} <= keys
    assert "layers.0.attention.to_q.weight" not in keys and "noise_refiner.0.attention.to_q.weight" in keys

    loaded = loading.load_transformer(path, None, F32)  # config inferred through the `_data` keys
    assert is_quantized(loaded) and loaded.config == TINY_CONFIG
    assert loaded.get_submodule("layers.1.feed_forward.w2").weight._scale.dtype == F32  # cast to compute dtype
    reference = loading.load_transformer(tiny_flat_layout["transformer"], None, F32)
    quantize_model(reference, include=FACTS.quantize_pattern("transformer"))
    name = "layers.0.feed_forward.w1"
    assert torch.equal(loaded.get_submodule(name).weight._data, reference.get_submodule(name).weight._data)
    latents, t, captions = _inputs()
    with torch.no_grad():  # the file stores bf16 scales and bf16 full-precision parts: close, not equal
        assert _rel_err(loaded(latents, t, captions), reference(latents, t, captions)) < 1e-2


def test_sidecar_map_and_missing_map(hooked: None, tmp_path: Path, tiny_flat_layout: dict[str, Path]) -> None:
    path = _write_int8(tmp_path, tiny_flat_layout["transformer"])
    with safe_open(str(path), framework="pt") as f:
        qmap = json.loads(base64.b64decode(f.metadata()["quantization_map_base64"]))
    bare = tmp_path / "bare_quanto_bf16_int8.safetensors"
    save_file(load_file(path), bare)  # no metadata: the sidecar must be found
    (tmp_path / "bare_quanto_bf16_int8_map.json").write_text(json.dumps(qmap))
    assert is_quantized(loading.load_transformer(bare, None, F32))
    (tmp_path / "bare_quanto_bf16_int8_map.json").unlink()
    assert is_quantized(loading.load_transformer(bare, None, F32))  # inferred from `_data` keys


def test_truncated_int8_file_is_a_clear_error(hooked: None, tmp_path: Path, tiny_flat_layout: dict[str, Path]) -> None:
    path = _write_int8(tmp_path, tiny_flat_layout["transformer"])
    state = load_file(path)
    state.pop("layers.1.feed_forward.w3.weight._scale")
    broken = tmp_path / "broken_quanto_bf16_int8.safetensors"
    with safe_open(str(path), framework="pt") as f:
        save_file(state, broken, metadata=f.metadata())
    with pytest.raises(CheckpointError, match="lacks"):
        loading.load_transformer(broken, None, F32)


def test_text_encoder_int8_file(hooked: None, tmp_path: Path, tiny_flat_layout: dict[str, Path]) -> None:
    """A Qwen3 file as Wan2GP has it: `model.` prefix, an lm_head, `layers.N` Linears in int8."""
    ref = loading.load_text_encoder(tiny_flat_layout["text_encoder"], tiny_flat_layout["text_encoder_config"], F32)
    quantized = loading.load_text_encoder(
        tiny_flat_layout["text_encoder"], tiny_flat_layout["text_encoder_config"], F32
    )
    names = quantize_model(quantized, include=FACTS.quantize_pattern("text_encoder"))
    assert "layers.0.self_attn.q_proj" in names and "layers.1.mlp.down_proj" in names
    path = save_quantized(
        quantized, tmp_path / "Qwen3" / "qwen3_quanto_bf16_int8.safetensors", dtype=None, prefix="model."
    )
    state = load_file(path)
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()  # the real file's tied head
    with safe_open(str(path), framework="pt") as f:
        save_file(state, path, metadata=f.metadata())
    loaded = loading.load_text_encoder(path, tiny_flat_layout["text_encoder_config"], F32)
    assert is_quantized(loaded)
    ids = torch.tensor([[5, 17, 33, 2, 90, 41]])
    with torch.no_grad():
        a = loaded(input_ids=ids).last_hidden_state
        b = quantized(input_ids=ids).last_hidden_state
        c = ref(input_ids=ids).last_hidden_state
    assert torch.allclose(a, b, atol=1e-6)  # saved with dtype=None: exact round trip
    assert _rel_err(a, c) < 0.03


def _refuse_int8pack(*args: object) -> None:
    raise RuntimeError("reached torch._weight_int8pack_mm (the CPU kernel that has crashed pytest)")


@pytest.mark.isolated
def test_mmgp_loads_our_file(
    hooked: None, tmp_path: Path, tiny_flat_layout: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Wan2GP's loader (mmgp `load_model_data`, on the CPU) reads what `save_quantized` writes.

    This test used to load in bf16 and run the model on the CPU: quanto then sends bf16 activations to
    `torch._weight_int8pack_mm`, which killed the whole pytest process on an AMD EPYC without native
    bf16. On the CPU the product computes int8 layers in fp32 (`cpu_safe_int8`); the kernel is replaced
    by one that raises, so reaching it fails this test instead of crashing the run.
    """
    from accelerate import init_empty_weights

    from host.lowvram.mmgp_import import import_mmgp_offload
    from models.z_image.transformer_z_image import ZImageTransformer

    path = _write_int8(tmp_path, tiny_flat_layout["transformer"])
    offload = import_mmgp_offload()
    with init_empty_weights(include_buffers=False):
        model = ZImageTransformer(TINY_CONFIG)
    offload.load_model_data(model, str(path), default_dtype=F32, writable_tensors=False)
    assert is_quantized(model)
    cpu_safe_int8(model)
    ours = loading.load_transformer(path, TINY_CONFIG, F32, "cpu")
    monkeypatch.setattr(torch, "_weight_int8pack_mm", _refuse_int8pack)
    latents, t, captions = _inputs()
    with torch.no_grad():
        out, expected = model(latents, t, captions), ours(latents, t, captions)
    assert torch.isfinite(out).all() and _rel_err(out, expected) < 1e-2


@pytest.mark.isolated
def test_cpu_int8_layers_never_reach_the_int8pack_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 activations into a qint8 layer on the CPU would reach `_weight_int8pack_mm`; after
    `cpu_safe_int8` the layer computes in fp32 (scales fp32) and hands back the input's dtype."""
    from optimum.quanto import QLinear, qint8

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    x = torch.randn(5, 64)
    with torch.no_grad():
        reference = linear(x)
        layer = QLinear.from_module(linear.to(torch.bfloat16), weights=qint8)
        layer.freeze()
    container = torch.nn.Sequential(layer)
    monkeypatch.setattr(torch, "_weight_int8pack_mm", _refuse_int8pack)
    with torch.no_grad(), pytest.raises(RuntimeError, match="int8pack"):
        container(x.bfloat16())  # the unguarded path goes to the kernel (here: the refusing stand-in)
    cpu_safe_int8(container)
    cpu_safe_int8(container)  # idempotent: one pair of hooks
    assert layer.weight._scale.dtype == F32 and layer.bias.dtype == F32
    assert len(layer._forward_pre_hooks) == 1
    with torch.no_grad():
        out = container(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert _rel_err(out.float(), reference) < 0.02  # int8 weights + bf16 rounding of x and of the output


def test_scales_follow_the_compute_dtype(tiny_flat_layout: dict[str, Path]) -> None:
    """Quantizing an fp32-loaded model for a bf16 run gives bf16 scales (a qint8 layer computes in its
    scale's dtype: fp32 scales beside bf16 norms gave SDPA mixed q/k/v dtypes); `set_int8_dtype` recasts."""
    model = loading.load_transformer(tiny_flat_layout["transformer"], None, F32)
    quantize_model(model, include=FACTS.quantize_pattern("transformer"), dtype=torch.bfloat16)
    layer = model.get_submodule("layers.0.attention.to_v")
    assert layer.weight._scale.dtype == torch.bfloat16 and layer.weight._data.dtype == torch.int8
    assert set_int8_dtype(model, F32) == len(quantization_map(model))
    assert layer.weight._scale.dtype == F32 and set_int8_dtype(model, F32) == 0
