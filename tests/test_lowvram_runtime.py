"""Low-VRAM runtime: prompt cache, VAE tiling, guards, attention fallback, offload (CPU path + GPU),
the mmgp/safe_open guard, the transforms through a real pipeline, and the planner."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from common import attention as attn
from common.errors import NonFiniteOutputError, SettingsError
from common.model_hooks import ModelHooks
from host.device import compute_dtype
from host.lowvram import apply_lowvram, load_options, offload, planner
from host.lowvram.guards import BlackImageGuard, check_pixels
from host.lowvram.prompt_cache import PromptCache, attach_prompt_cache, file_identity, shared_cache
from host.lowvram.quantize import is_quantized
from host.lowvram.vae_tiling import TilingOptions, VaeTilingTransform, tile_starts, tiled_decode
from models.z_image.facts_z_image import FACTS
from tests.fixtures.pipelines import flat_pipeline

F32 = torch.float32
SETTINGS = {
    "prompt": "a red fox",
    "width": 64,
    "height": 64,
    "num_inference_steps": 2,
    "guidance_scale": 0.0,
    "seed": 3,
}


def _pipeline(flat: dict[str, Path], keep_text_encoder: bool = True, dtype: torch.dtype = F32):
    return flat_pipeline(flat, keep_text_encoder, dtype)


# -- prompt cache ----------------------------------------------------------------------------------


def test_repeated_prompt_never_runs_or_loads_the_text_encoder(tiny_flat_layout: dict[str, Path]) -> None:
    pipe = _pipeline(tiny_flat_layout, keep_text_encoder=False)
    loads, runs = [], []
    loader = pipe.load_text_encoder

    def counting_loader():
        loads.append(1)
        encoder = loader()
        encoder.register_forward_hook(lambda *a: runs.append(1))
        return encoder

    pipe.load_text_encoder = counting_loader
    cache = attach_prompt_cache(pipe, file_identity(tiny_flat_layout["text_encoder"]), PromptCache())
    first = pipe.generate(SETTINGS)
    assert (len(loads), len(runs)) == (1, 1) and pipe.text_encoder is None
    second = pipe.generate(SETTINGS)
    assert (len(loads), len(runs)) == (1, 1)  # zero text encoder runs, not even loaded
    assert cache.hits == 1 and len(cache) == 1
    assert first.images[0].tobytes() == second.images[0].tobytes()
    pipe.generate({**SETTINGS, "max_sequence_length": 64})  # another key part: a miss
    assert len(runs) == 2


def test_prompt_cache_lru_bound_in_bytes() -> None:
    cache = PromptCache(max_bytes=100)
    for i in range(5):
        cache.put(i, f"v{i}", 30)
    assert len(cache) == 3 and cache.bytes == 90 and cache.get(0) is None
    assert cache.get(2) == "v2"  # now most recent
    cache.put(9, "v9", 30)
    assert cache.get(3) is None and cache.get(2) == "v2"
    cache.put("huge", "x", 101)
    assert cache.get("huge") is None and cache.bytes <= 100


def test_file_identity_changes_with_the_file(tmp_path: Path) -> None:
    path = tmp_path / "te.safetensors"
    path.write_bytes(b"a")
    first = file_identity(path)
    path.write_bytes(b"bb")
    assert file_identity(path) != first and file_identity(None) is None


# -- VAE tiling ------------------------------------------------------------------------------------


def test_tile_starts_cover_with_overlap() -> None:
    assert tile_starts(10, 16, 4) == [0]
    for size, tile, overlap in ((48, 16, 4), (100, 32, 8), (33, 16, 8)):
        starts = tile_starts(size, tile, overlap)
        assert starts[0] == 0 and starts[-1] + tile == size
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:], strict=False))


def test_tiled_decode_close_to_untiled(tiny_flat_layout: dict[str, Path]) -> None:
    """Metric: mean and max |tiled - untiled| in [0, 1] pixel units, 384x384 image, 256 px tiles, 128 px overlap.

    The tiny VAE has random weights, GroupNorm statistics computed per tile and a mid-block attention that
    sees only its tile: the worst case for tiling (a trained VAE is far smoother). Measured: mean 0.011,
    max 0.14; bounds 0.02 / 0.25. Overlap blending must also beat narrow overlap (4 px latent: mean 0.040).
    """
    from models.z_image import loading_z_image as loading

    vae = loading.load_vae(tiny_flat_layout["vae"], tiny_flat_layout["vae_config"], F32)
    z = torch.randn(1, 16, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = vae.decode(z, return_dict=False)[0]
        diff = (tiled_decode(vae, z, 32, 16) - ref).abs() / 2
        narrow = (tiled_decode(vae, z, 16, 4) - ref).abs() / 2
    assert float(diff.mean()) < 0.02 and float(diff.max()) < 0.25
    assert float(diff.mean()) < float(narrow.mean())


def test_tiling_is_automatic_above_the_threshold(tiny_flat_layout: dict[str, Path]) -> None:
    """The transform sits on the model's decode / encode-image hooks; the VAE itself is untouched."""
    from models.z_image import loading_z_image as loading

    vae = loading.load_vae(tiny_flat_layout["vae"], tiny_flat_layout["vae_config"], F32)
    model = SimpleNamespace(hooks=ModelHooks(), vae_scale_factor=8)
    calls = []

    def decode(z: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(z.shape[-2:]))
        return vae.decode(z, return_dict=False)[0]

    tiling = VaeTilingTransform(TilingOptions(mode="auto", tile=16, overlap=4, min_latent=20))
    tiling.apply(model)
    with torch.no_grad():
        model.hooks.decode.call(decode, torch.randn(1, 16, 16, 16))
        assert calls == [(16, 16)]  # below the threshold: one untiled call
        out = model.hooks.decode.call(decode, torch.randn(1, 16, 24, 24))
        assert out.shape == (1, 3, 192, 192) and len(calls) == 1 + 4
        pixels = torch.rand(1, 3, 192, 192) * 2 - 1
        encoded = model.hooks.encode_image.call(lambda x: vae.encode(x).latent_dist, pixels)
        # a sample draws from the generator as an untiled one does: the draws after it (img2img's noise) match
        tiled_draw, plain_draw = torch.Generator("cpu").manual_seed(5), torch.Generator("cpu").manual_seed(5)
        assert torch.equal(encoded.sample(tiled_draw), encoded.mode())
        vae.encode(pixels).latent_dist.sample(plain_draw)
        assert torch.equal(torch.randn(4, generator=tiled_draw), torch.randn(4, generator=plain_draw))
    assert encoded.mode().shape == (1, 16, 24, 24)
    tiling.remove(model)
    assert model.hooks.owners() == {} and vae.decode.__func__ is type(vae).decode  # nothing left behind


# -- guards ----------------------------------------------------------------------------------------


def test_black_or_nan_decode_is_refused_with_advice() -> None:
    check_pixels(torch.rand(1, 3, 8, 8) * 2 - 1)
    with pytest.raises(NonFiniteOutputError, match="NaN/inf.*--attention sdpa"):
        check_pixels(torch.full((1, 3, 8, 8), float("nan")))
    with pytest.raises(NonFiniteOutputError, match="all black.*--quantization bf16"):
        check_pixels(-torch.ones(2, 3, 8, 8))

    model = SimpleNamespace(hooks=ModelHooks())
    BlackImageGuard().apply(model)
    assert torch.equal(model.hooks.decode.call(lambda z: z, torch.zeros(1, 3, 2, 2)), torch.zeros(1, 3, 2, 2))
    with pytest.raises(NonFiniteOutputError):
        model.hooks.decode.call(lambda z: z * float("inf"), torch.ones(1, 3, 2, 2))


def test_compute_dtype_per_capability() -> None:
    assert compute_dtype("cpu", None) == F32
    assert compute_dtype("cuda", 89) == torch.bfloat16
    assert compute_dtype("cuda", 75) == F32  # Turing: no native bf16, fp16 overflows
    assert compute_dtype("cuda", 89, "fp32") == F32
    with pytest.raises(SettingsError, match="overflow fp16"):
        compute_dtype("cuda", 89, "fp16")
    with pytest.raises(SettingsError, match="no native bf16"):
        compute_dtype("cuda", 75, "bf16")
    with pytest.raises(SettingsError, match="overflow fp16"):
        load_options({"device": "cpu", "dtype": F32, "quantization": "fp16", "profile": "auto"})


# -- attention backends ----------------------------------------------------------------------------


def test_missing_backends_fall_back_to_sdpa_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    q, k, v = (torch.randn(1, 8, 2, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    ref = attn.sdpa(q, k, v)
    attn._WARNED.clear()
    try:
        with caplog.at_level(logging.WARNING, logger="common.attention"):
            for name in ("flash", "flash", "sage", "sage2", "nonsense"):
                assert attn.set_attention_backend(name, capability=None) == "sdpa"
                assert torch.equal(attn.attention(q, k, v), ref)
            assert attn.set_attention_backend("auto", capability=None) == "sdpa"
        warnings = [r.message for r in caplog.records]
        assert len(warnings) == 4 and sum("'flash'" in w for w in warnings) == 1  # once per backend
    finally:
        attn.set_attention_backend("sdpa")


def test_optional_kernel_skips_calls_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel that only takes fp16/bf16 CUDA tensors without a mask: other calls go to SDPA."""
    used = []
    monkeypatch.setattr(attn, "_BACKEND", "flash")
    monkeypatch.setattr(attn, "_KERNEL", lambda q, k, v: used.append(1) or q)
    q = torch.randn(1, 4, 2, 8)
    assert torch.equal(attn.attention(q, q, q), attn.sdpa(q, q, q)) and not used


def test_optional_kernel_runs_per_row_on_a_padded_batch(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A CFG batch whose prompts differ in length carries a padding mask; a mask-free kernel then runs once per
    row on that row's real tokens: the real rows equal masked SDPA, padded query rows are zeros. A mask that is
    not padding at the end of the rows goes to SDPA with one warning; a kernel failing on a masked call is
    answered by masked SDPA. (The kernel here is SDPA without a mask: the real kernels need a CUDA GPU.)"""
    calls: list[tuple[int, ...]] = []

    def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(q.shape))
        return attn.sdpa(q, k, v)

    monkeypatch.setattr(attn, "_BACKEND", "sage2")
    monkeypatch.setattr(attn, "_KERNEL", kernel)
    monkeypatch.setattr(attn, "kernel_skip_reason", lambda q, key_mask: None)  # as if on a CUDA GPU
    attn._WARNED.clear()
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 12, 3, 8, generator=gen) for _ in range(3))
    mask = torch.arange(12)[None] < torch.tensor([12, 7])[:, None]
    out = attn.attention(q, k, v, mask)
    ref = attn.sdpa(q, k, v, mask)
    assert calls == [(1, 12, 3, 8), (1, 7, 3, 8)]
    torch.testing.assert_close(out[0], ref[0])
    torch.testing.assert_close(out[1, :7], ref[1, :7])
    assert torch.count_nonzero(out[1, 7:]) == 0

    holes = mask.clone()
    holes[0, 3] = False  # a hole, not padding at the end
    calls.clear()
    with caplog.at_level(logging.WARNING, logger="common.attention"):
        assert torch.equal(attn.attention(q, k, v, holes), attn.sdpa(q, k, v, holes))
        attn.attention(q, k, v, holes)
    assert not calls and sum("padding at the end" in r.getMessage() for r in caplog.records) == 1

    def broken(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    monkeypatch.setattr(attn, "_KERNEL", broken)
    assert torch.equal(attn.attention(q, k, v, mask), ref) and attn.get_attention_backend() == "sdpa"


def test_cfg_batch_of_unequal_prompts_through_the_per_row_kernel_matches_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny transformer on a CFG batch whose captions pad to 32 and 64 tokens: through a mask-free kernel
    run per row, its output equals the masked-SDPA forward's (the zero rows of the shorter caption's padding
    reach nothing the output reads)."""
    from lora_fixtures import tiny_model

    model = tiny_model().eval()
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, 8, 8, generator=gen).repeat(2, 1, 1, 1)
    captions = [torch.randn(40, model.config.cap_feat_dim, generator=gen), torch.randn(7, model.config.cap_feat_dim, generator=gen)]
    t = torch.tensor([0.4, 0.4])
    with torch.no_grad():
        ref = model(latents, t, captions)
        rows: list[int] = []
        monkeypatch.setattr(attn, "_BACKEND", "flash")
        monkeypatch.setattr(attn, "_KERNEL", lambda q, k, v: rows.append(q.shape[1]) or attn.sdpa(q, k, v))
        monkeypatch.setattr(attn, "kernel_skip_reason", lambda q, key_mask: None)
        out = model(latents, t, captions)
    assert 32 + 32 in rows and 32 + 64 in rows  # the shorter row ran on its own length
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# -- offload, mmgp import --------------------------------------------------------------------------


def test_profiles_resolve_per_device() -> None:
    assert offload.resolve_profile("auto", "cpu") is None and offload.resolve_profile(3, "cpu") is None
    assert offload.resolve_profile("auto", "cuda") == 4 and offload.resolve_profile("5", "cuda:0") == 5
    with pytest.raises(SettingsError, match="1-5"):
        offload.resolve_profile(7, "cuda")
    assert offload.load_device("cuda", 4) == "cpu" and offload.load_device("cpu", 4) == "cpu"
    options = load_options({"device": "cuda", "dtype": torch.bfloat16, "quantization": "int8", "profile": 4})
    assert options["device"] == "cpu" and options["compute_device"] == "cuda" and options["keep_text_encoder"]


def test_mmgp_import_keeps_transformers_loading(tiny_diffusers_folder: Path) -> None:
    """Importing mmgp patches safe_open; ours restores it, so transformers' from_pretrained still works."""
    import safetensors
    import transformers.modeling_utils as mu
    from transformers import Qwen3Model

    from host.lowvram.mmgp_import import import_mmgp_offload

    before = (safetensors.safe_open, mu.safe_open)
    offload_module = import_mmgp_offload()
    assert hasattr(offload_module, "profile")
    assert (safetensors.safe_open, mu.safe_open) == before
    model = Qwen3Model.from_pretrained(tiny_diffusers_folder / "text_encoder", local_files_only=True)
    assert model.config.hidden_size == 64


@pytest.mark.isolated  # int8 layers run quanto's CPU path (fp32 activations): in a child process in case it crashes
def test_transforms_on_a_pipeline_cpu(tiny_flat_layout: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    """int8 asked with a full-precision file: quantized on the fly; cache, tiling, guard, CPU offload path.

    The image must be the plain fp32 pipeline's image. Bounds, in 1/255 pixel steps:
    - against the plain fp32 pipeline decoding with the same tiles, only int8 differs: per-row absmax int8
      rounds each weight by at most half a step (<= 0.4% of the row's largest weight), which moved the mid
      config's transformer output by 1.7% (README, bench_lowvram.py). Measured here: mean 0.23, max 2;
      bounds mean 1, max 8 (a wrong scale, a skipped layer or a wrong cached prompt moves pixels by tens).
    - against the plain fp32 image decoded whole, the 4 tiles (48 px, 32 px overlap) add the tiling error of
      a random VAE (GroupNorm statistics and mid-block attention per tile; the worst case, see
      test_tiled_decode_close_to_untiled). Measured: mean 6.9, max 73; bound mean 12.
    """
    settings = {**SETTINGS, "width": 64, "height": 64}  # an 8x8 latent
    tiles = TilingOptions(mode="auto", tile=6, overlap=4, min_latent=6)  # 8 > 6: tiled, 2 x 2 tiles of 6x6
    plain = _pipeline(tiny_flat_layout)
    whole = np.asarray(plain.generate(settings).images[0], dtype=np.int16)
    VaeTilingTransform(tiles).apply(plain)
    plain_tiled = np.asarray(plain.generate(settings).images[0], dtype=np.int16)

    pipe = _pipeline(tiny_flat_layout)
    options = load_options({"device": "cpu", "dtype": F32, "quantization": "int8", "profile": "auto"})
    assert options["keep_text_encoder"] is False
    with caplog.at_level(logging.INFO, logger="host.lowvram.offload"):
        stack = apply_lowvram(pipe, options, {"text_encoder": tiny_flat_layout["text_encoder"]}, FACTS)
    assert stack.model is pipe and is_quantized(pipe.transformer)
    assert stack.names == [
        "int8", "packed_linears", "prompt_cache", "vae_tiling", "lean_decode", "black_image_guard", "heap_trim", "offload",
    ]
    assert pipe.hooks.decode.owners == ["black_image_guard", "vae_tiling", "heap_trim"]  # the guard sees the blended image
    assert pipe.batch_cfg  # no VRAM to save on the CPU: guidance branches stay batched
    stack.get("vae_tiling").options = tiles  # the host's threshold (1024 px) is far above this image: lower it
    decoded = []
    pipe.hooks.decode.add("count", lambda call_next, z: (decoded.append(tuple(z.shape[-2:])), call_next(z))[1])
    result = pipe.generate(settings)
    assert decoded == [(6, 6)] * 4  # the tiled path ran: four tiles, never the whole latent
    image = np.asarray(result.images[0], dtype=np.int16)
    int8_error = np.abs(image - plain_tiled)
    assert int8_error.mean() < 1 and int8_error.max() <= 8
    assert np.abs(image - whole).mean() < 12
    hits = shared_cache().hits
    again = pipe.generate(settings)  # the prompt now comes from the (process-wide) cache
    assert again.images[0].tobytes() == result.images[0].tobytes() and shared_cache().hits == hits + 1
    pipe.release()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("profile", [1, 4, 5])
def test_offload_profiles_on_cuda(tiny_flat_layout: dict[str, Path], profile: int) -> None:
    """As the session loads a model for a bf16 GPU: weights in bf16 on the CPU, mmgp moves them. The VAE
    stays fp32, the default device is the caller's again, and the image matches the plain CUDA run."""
    reference = _pipeline(tiny_flat_layout, dtype=torch.bfloat16)
    for part in (reference.transformer, reference.text_encoder, reference.vae):
        part.cuda()
    reference.device = torch.device("cuda")
    plain = np.asarray(reference.generate(SETTINGS).images[0], dtype=np.int16)
    reference.release()
    pipe = _pipeline(tiny_flat_layout, dtype=torch.bfloat16)  # loaded on the CPU, as under mmgp
    options = load_options({"device": "cuda", "dtype": torch.bfloat16, "quantization": "bf16", "profile": profile})
    apply_lowvram(pipe, options, {}, FACTS)
    assert torch.get_default_device().type == "cpu"
    assert pipe.batch_cfg == (profile not in (2, 4, 5))  # streaming profiles run guidance branches in turn
    assert all(p.dtype == F32 for p in pipe.vae.parameters())
    result = pipe.generate(SETTINGS)
    assert np.abs(np.asarray(result.images[0], dtype=np.int16) - plain).max() <= 2
    assert torch.cuda.memory_allocated() < 64 * 2**20  # parts sent back to RAM after the generation
    pipe.release()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, F32])
def test_int8_offload_on_cuda_in_the_compute_dtype(tiny_flat_layout: dict[str, Path], dtype: torch.dtype) -> None:
    """int8 on the fly under profile 4, in bf16 and in fp32 (GPUs below sm80): no mixed q/k/v dtypes."""
    pipe = _pipeline(tiny_flat_layout, dtype=dtype)
    options = load_options({"device": "cuda", "dtype": dtype, "quantization": "int8", "profile": 4})
    apply_lowvram(pipe, options, {}, FACTS)
    assert pipe.transformer.get_submodule("layers.0.attention.to_v").weight._scale.dtype == dtype
    result = pipe.generate(SETTINGS)
    assert result.images[0].size == (64, 64)
    pipe.release()


# -- planner ---------------------------------------------------------------------------------------


def test_planner_sizes_and_ordering() -> None:
    from models.z_image.z_image_handler import family_handler

    sizes = planner.sizes_from_facts(family_handler.query_model_facts("z_image_base", {}))  # the family's numbers
    assert sizes is not None and (sizes.dim, sizes.ffn_hidden, sizes.text_hidden, sizes.patch, sizes.vae_scale) == (
        3840, 10240, 2560, 2, 8
    )
    assert sizes.transformer.bytes("bf16") == 2 * 6_154_908_736
    assert 6.8e9 < sizes.transformer.bytes("int8") < 7.0e9  # ~ the size of ZImageBase_quanto_bf16_int8
    assert 4.3e9 < sizes.text_encoder.bytes("int8") < 4.5e9
    plans = {(p.quantization, p.profile): p for p in planner.plan_table(sizes, 1024, 1024, cfg=True, vram_gb=8)}
    assert plans[("int8", 4)].vram_gb < 8 and plans[("int8", 4)].fits
    assert plans[("bf16", 1)].vram_gb > 12 and plans[("bf16", 1)].fits is False
    assert plans[("int8", 5)].vram_gb <= plans[("int8", 4)].vram_gb <= plans[("int8", 1)].vram_gb
    assert plans[("int8", 4)].ram_gb < plans[("bf16", 4)].ram_gb
    text = planner.format_table(list(plans.values()), "z_image_base 1024x1024")
    assert "peak VRAM GB" in text and text.count("\n") == 11


def test_cli_plan_and_save_quantized(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from host.cli import main
    from host.lowvram.quantize import load_quanto
    from models.z_image import loading_z_image as loading

    assert main(["--plan", "--model", "z_image_base", "--resolution", "1024x1024", "--vram-gb", "8"]) == 0
    out = capsys.readouterr().out
    assert "z_image_base 1024x1024, CFG on, GPU 8.0 GB" in out and out.count(" int8 ") == 5
    target = tmp_path / "selftest_quanto_bf16_int8.safetensors"
    argv = [
        "--ckpts",
        str(tmp_path / "ckpts"),
        "--offline",
        "--model",
        "z_image_selftest",
        "--save-quantized",
        str(target),
    ]
    assert main(argv) == 0
    loading.register_quantized_loader(load_quanto)
    assert is_quantized(loading.load_transformer(target, None, F32))
