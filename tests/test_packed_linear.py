"""Packed linears (host/lowvram/packed_linear.py): the denoiser's fp32 CPU linears through oneDNN with packed weights.

The layer gives F.linear's values (a float rounding apart), holds its weight once, reads and writes its weight as
an ordinary layer would (LoRA runtime hooks, merges, state_dict), and the transform puts the original layers back
bit-equal. Compiled blocks reach the packed weights through the `wgp::packed_linear` op. The tiny models' layers
are narrower than MIN_FEATURES, so the tests that need the product path lower it.
"""

from __future__ import annotations

import gc
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lora_fixtures import DIALECTS, random_lora, tiny_model
from torch import nn

from host.lora.apply import LoraRuntime, linear_shapes
from host.lowvram import apply_lowvram, load_options, lowvram_transforms
from host.lowvram import packed_linear as pl
from host.lowvram.packed_linear import PackedLinear, PackedLinears, onednn_works
from models.z_image.lora_z_image import normalize_lora
from tests.fixtures.pipelines import flat_pipeline

# Each test in its own process: oneDNN's packed matmul is native code that has not run on every CPU this suite
# meets, and a crash there must fail these tests, not kill the whole run.
pytestmark = pytest.mark.isolated


@pytest.fixture(autouse=True)
def _needs_onednn() -> None:
    """Checked when a test runs (in its child process), not at collection."""
    if not onednn_works():
        pytest.skip("this PyTorch build has no working oneDNN")


def _facts() -> Any:
    from models.z_image.z_image_handler import ZImageHandler

    return ZImageHandler().query_model_facts("z_image", {})


def _inputs(model: nn.Module, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    latents = torch.randn(2, cfg.in_channels, 8, 8, generator=gen)
    captions = [torch.randn(7, cfg.cap_feat_dim, generator=gen), torch.randn(40, cfg.cap_feat_dim, generator=gen)]
    return latents, torch.tensor([0.3, 0.7]), captions


def _linears(model: nn.Module) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("bias", [True, False])
def test_layer_matches_f_linear_and_keeps_the_weight_once(bias: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(96, 80, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(80, 96, generator=gen))
    x = torch.randn(2, 33, 96, generator=gen)  # (B, L, in): the token batches the transformer feeds
    packed = PackedLinear.from_linear(linear)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(packed.weight, linear.weight)
    assert [n for n, _ in packed.named_parameters()] == (["bias"] if bias else [])  # no dense copy held beside
    assert packed.packed.is_mkldnn
    assert packed.state_dict().keys() == linear.state_dict().keys()
    for key, value in linear.state_dict().items():
        assert torch.equal(packed.state_dict()[key], value)


def test_weight_reads_are_read_only_and_assignment_repacks() -> None:
    linear = nn.Linear(32, 16)
    packed = PackedLinear.from_linear(linear)
    x = torch.randn(4, 32)
    with torch.no_grad(), pytest.raises(RuntimeError, match="[Ii]nference tensor"):
        packed.weight.add_(1.0)  # the copy would be lost: refused, not silently ignored
    packed.weight = linear.weight.detach() * 2
    with torch.no_grad():
        torch.testing.assert_close(packed(x), nn.functional.linear(x, linear.weight * 2, linear.bias))
    packed.load_state_dict({"weight": linear.weight.detach() * 3, "bias": linear.bias.detach()})
    assert torch.equal(packed.weight, linear.weight.detach() * 3)
    with pytest.raises(RuntimeError, match="Missing key"):
        packed.load_state_dict({"bias": linear.bias.detach()})


def test_gradients_take_the_dense_path() -> None:
    """oneDNN's packed op has no backward: with grad on, the layer computes F.linear (right gradients)."""
    linear = nn.Linear(24, 12)
    packed = PackedLinear.from_linear(linear)
    x1, x2 = torch.randn(5, 24, requires_grad=True), None
    x2 = x1.detach().clone().requires_grad_(True)
    linear(x1).square().sum().backward()
    packed(x2).square().sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad)
    torch.testing.assert_close(packed.bias.grad, linear.bias.grad)


def test_moving_is_refused_with_the_fix_but_cpu_fp32_is_fine() -> None:
    packed = PackedLinear.from_linear(nn.Linear(8, 8))
    packed.to("cpu").float()
    with pytest.raises(RuntimeError, match="packed_linears"):
        packed.to(torch.float16)


def test_hooks_follow_the_swap_both_ways() -> None:
    """A hook registered before packing runs on the packed layer, and its handle still removes it after unpacking."""
    model = nn.Sequential(nn.Linear(16, 16))
    calls: list[int] = []
    handle = model[0].register_forward_hook(lambda m, a, o: calls.append(1))
    transform = PackedLinears(True, min_features=1)
    transform.apply(_Parts(model))
    assert isinstance(model[0], PackedLinear)
    with torch.no_grad():
        model(torch.randn(2, 16))
    transform.remove(_Parts(model))
    assert type(model[0]) is nn.Linear
    with torch.no_grad():
        model(torch.randn(2, 16))
    handle.remove()
    with torch.no_grad():
        model(torch.randn(2, 16))
    assert calls == [1, 1]


def test_the_op_registry_forgets_released_layers() -> None:
    """Compiled code finds a packed weight by its handle; the registry holds it weakly, so a released layer's
    packed weight is freed (a model dropped from the session must not stay in memory through it)."""
    layer = PackedLinear.from_linear(nn.Linear(16, 8))
    handle = int(layer.handle)
    assert pl._PACKED[handle] is layer.packed
    assert "handle" not in layer.state_dict()
    del layer
    gc.collect()
    assert handle not in pl._PACKED


@pytest.mark.skipif(
    not any(shutil.which(c) for c in (os.environ.get("CXX") or "g++", "c++", "clang++")),
    reason="torch.compile on the CPU needs a C++ compiler (g++)",
)
def test_compiled_blocks_call_the_packed_op_and_follow_a_new_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny transformer packed, its blocks compiled: the output matches eager, the compiled graphs call
    `wgp::packed_linear` (the layers stay packed), and a weight assigned after compiling (a merged LoRA) is
    used by the compiled code with no recompile."""
    from host.compile import compiled_graphs

    model = tiny_model().eval()
    latents, t, captions = _inputs(model)
    PackedLinears(True, min_features=16).apply(_Parts(model))
    layer = model.layers[0].feed_forward.w1
    assert isinstance(layer, PackedLinear)
    looked_up: list[int] = []

    class Counting(pl.weakref.WeakValueDictionary):
        def __getitem__(self, key: int) -> torch.Tensor:
            looked_up.append(key)
            return super().__getitem__(key)

    monkeypatch.setattr(pl, "_PACKED", Counting(pl._PACKED))
    try:
        with torch.no_grad():
            eager = model(latents, t, captions)
            assert not looked_up  # eager calls oneDNN directly
            for block in model.modules():
                if type(block).__name__ == "TransformerBlock":
                    block.compile()
            compiled = model(latents, t, captions)
            torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
            assert int(layer.handle) in looked_up
            graphs = compiled_graphs()
            layer.weight = layer.weight * 0.5
            changed = model(latents, t, captions)
            with torch.compiler.set_stance("force_eager"):
                changed_eager = model(latents, t, captions)
        torch.testing.assert_close(changed, changed_eager, rtol=1e-4, atol=1e-4)
        assert (changed - eager).abs().max() > 1e-3  # the new weight matters
        assert compiled_graphs() == graphs
    finally:
        torch.compiler.reset()


class _Parts:
    """A model whose only part is `transformer` (what PackedLinears finds without facts)."""

    def __init__(self, transformer: nn.Module):
        self.transformer = transformer


def test_transform_on_the_transformer_matches_and_removes_bit_equal() -> None:
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    latents, t, captions = _inputs(model)
    with torch.no_grad():
        ref = model(latents, t, captions)
    transform = PackedLinears(True, min_features=32)
    transform.apply(_Parts(model))
    packed = [n for n, kind in _linears(model).items() if kind is PackedLinear]
    assert packed and len(packed) == len(transform.packed)
    small = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert all(min(dict(model.named_modules())[n].in_features, dict(model.named_modules())[n].out_features) < 32 for n in small)
    with torch.no_grad():
        out = model(latents, t, captions)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    transform.remove(_Parts(model))
    assert all(kind is nn.Linear for kind in _linears(model).values()) and not transform.packed
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    with torch.no_grad():
        assert torch.equal(model(latents, t, captions), ref)


@pytest.mark.parametrize("merged", [False, True])
def test_loras_on_packed_layers_give_the_dense_result(merged: bool) -> None:
    """Runtime LoRA hooks and merged LoRAs (written by assignment, which packs again) act on packed layers as on
    dense ones, and detaching restores the packed weights exactly."""
    dense, packed = tiny_model(), tiny_model()
    PackedLinears(True, min_features=1).apply(_Parts(packed))
    latents, t, captions = _inputs(dense)
    lora = normalize_lora(DIALECTS["diffusers"](random_lora(dense)), linear_shapes(dense))
    with torch.no_grad():
        base = packed(latents, t, captions)
    outs = []
    for model in (dense, packed):
        runtime = LoraRuntime(model, [lora], [[0.7]], merged=merged)
        with torch.no_grad():
            outs.append(model(latents, t, captions))
        runtime.detach()
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    assert (outs[1] - base).abs().max() > 1e-3  # the LoRA really acted on the packed model
    with torch.no_grad():
        assert torch.equal(packed(latents, t, captions), base)


def test_lowvram_packs_on_the_cpu_only() -> None:
    def transform(device: str) -> PackedLinears:
        options = load_options({"device": device, "dtype": torch.float32, "quantization": "fp32", "profile": "auto"})
        return next(t for t in lowvram_transforms(options, {}, _facts()) if isinstance(t, PackedLinears))

    assert transform("cpu").enabled
    assert not transform("cuda").enabled


def test_product_path_image_within_one_level(monkeypatch: pytest.MonkeyPatch, tiny_flat_layout: dict[str, Path]) -> None:
    """The CPU generation with packed layers (MIN_FEATURES lowered to the tiny model's width) gives the unpacked
    image within 1/255, and removing the transform leaves no packed layer."""
    settings = dict(prompt="a red fox", width=64, height=64, num_inference_steps=2, guidance_scale=3.0, seed=5)
    options = load_options({"device": "cpu", "dtype": torch.float32, "quantization": "fp32", "profile": "auto"})
    plain = flat_pipeline(tiny_flat_layout)
    ref = np.asarray(plain.generate(settings).images[0]).astype(np.int16)
    monkeypatch.setattr(pl, "MIN_FEATURES", 16)
    pipe = flat_pipeline(tiny_flat_layout)
    stack = apply_lowvram(pipe, options, {}, _facts())
    transform = stack.get(PackedLinears.name)
    assert transform is not None and transform.packed
    assert all(n.startswith("transformer.") for n in transform.packed)
    image = np.asarray(pipe.generate(settings).images[0]).astype(np.int16)
    assert np.abs(image - ref).max() <= 1
    stack.clear()
    assert not any(isinstance(m, PackedLinear) for m in pipe.transformer.modules())


def test_file_pages_of_packed_weights_go_back_and_values_stay(tmp_path: Path) -> None:
    """Weights read from a memory-mapped safetensors file (the loader's fp32 case): after packing, their pages
    leave the resident size (MADV_DONTNEED), and reading the tensor again gives the file's values. Anonymous
    memory is never touched (there, dropping pages would zero the values)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from bench.bench_engine import _rss
    from host.lowvram.packed_linear import FilePages

    values = torch.arange(24 * 2**20 // 4, dtype=torch.float32).reshape(-1, 1024)  # 24 MiB
    save_file({"w": values}, str(tmp_path / "w.safetensors"))
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt", device="cpu") as f:
        mapped = f.get_tensor("w")
    float(mapped.sum())  # page it in
    before = _rss()
    dropped = FilePages().drop(mapped)
    assert dropped > 20 * 2**20
    assert before - _rss() > 16 * 2**20
    assert torch.equal(mapped, values)  # read back from the file
    anonymous = values.clone()
    assert FilePages().drop(anonymous) == 0 and torch.equal(anonymous, values)
