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
from host.quantize import is_quantized, load_quanto, quantization_map, quantize_model, save_quantized
from models.z_image import loading_z_image as loading
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
    quantize_model(model)
    return save_quantized(model, tmp_path / name)


def test_on_the_fly_quantizes_only_the_repeated_blocks(tiny_flat_layout: dict[str, Path]) -> None:
    model = loading.load_transformer(tiny_flat_layout["transformer"], None, F32)
    names = quantize_model(model)
    assert names and all(n.startswith("layers.") for n in names)
    per_layer = 4 + 3 + 1  # q k v out, w1 w2 w3, adaLN
    assert len(names) == TINY_CONFIG.n_layers * per_layer
    qmap = quantization_map(model)
    assert set(qmap) == set(names) and all(v == {"weights": "qint8", "activations": "none"} for v in qmap.values())
    for kept in ("noise_refiner.0.attention.to_q", "context_refiner.0.feed_forward.w1", "cap_embedder.1"):
        assert type(model.get_submodule(kept)) is torch.nn.Linear  # full precision
    assert model.get_submodule("layers.0.attention.to_q").weight._data.dtype == torch.int8


def test_int8_quality_close_to_fp32(fp32_transformer: torch.nn.Module, tiny_flat_layout: dict[str, Path]) -> None:
    """Metric: relative L2 error ||y_int8 - y_fp32|| / ||y_fp32|| of one transformer forward (same inputs).

    Bound 3%: per-row absmax int8 rounds each weight by at most scale/2 = absmax/254, a relative weight
    error of ~0.3-0.5% RMS for Gaussian rows; through 2 blocks (each with 8 int8 matmuls, errors adding
    in quadrature, amplified a little by the norms) that stays around 1%. 3% leaves margin while still
    catching a real bug (a wrong scale axis or a missing scale gives errors of 50-100%+).
    """
    model = loading.load_transformer(tiny_flat_layout["transformer"], None, F32)
    quantize_model(model)
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
    quantize_model(reference)
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
    names = quantize_model(quantized)
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


def test_mmgp_loads_our_file(hooked: None, tmp_path: Path, tiny_flat_layout: dict[str, Path]) -> None:
    """Wan2GP's loader (mmgp `load_model_data`, on the CPU) reads what `save_quantized` writes."""
    from accelerate import init_empty_weights

    from host.mmgp_import import import_mmgp_offload
    from models.z_image.transformer_z_image import ZImageTransformer

    path = _write_int8(tmp_path, tiny_flat_layout["transformer"])
    offload = import_mmgp_offload()
    with init_empty_weights(include_buffers=False):
        model = ZImageTransformer(TINY_CONFIG)
    offload.load_model_data(model, str(path), default_dtype=torch.bfloat16, writable_tensors=False)
    assert is_quantized(model)
    ours = loading.load_transformer(path, TINY_CONFIG, torch.bfloat16, "cpu")
    latents, t, captions = _inputs()
    captions = [c.bfloat16() for c in captions]
    with torch.no_grad():
        out, expected = model(latents, t, captions).float(), ours(latents, t, captions).float()
    assert torch.isfinite(out).all() and _rel_err(out, expected) < 1e-2
