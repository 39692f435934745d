"""The CUDA path without a GPU: mmgp's side effects, simulated on the CPU, leave generation right.

`FakeMmgp.profile` does to the parts what mmgp 3.8.2's `offload.profile` does to them besides moving
weights (read from its source, `mmgp/offload.py`):
- converts every fp32 parameter to the part's `_model_dtype`, else to `convertWeightsFloatTo` (default bf16),
  skipping modules that carry `_lock_dtype` and quantized weights (`_configure`, "Scanning Sizes");
- wraps `forward` of the part and of its top-level modules so that fp32 tensor arguments are cast to
  the module's `_lock_dtype`, else to the part's dtype (`hook_change_module` + `move_args_to_gpu`);
- ends with `torch.set_default_device('cuda')` (here: 'meta', which breaks any tensor made without a
  device just as surely, and on any machine).
The weights stay on the CPU and the pipeline computes there (its device is put back to the CPU).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from common import attention as attn
from common.errors import NonFiniteOutputError
from host import device as host_device
from host.lowvram import apply_lowvram, load_options, offload
from host.lowvram.quantize import is_quantized, quantize_model
from host.web.preview import LatentPreviewer
from models.z_image.facts_z_image import FACTS, LATENT
from tests.fixtures.pipelines import flat_pipeline

F32, BF16 = torch.float32, torch.bfloat16
SETTINGS = {"prompt": "a red fox", "width": 64, "height": 64, "num_inference_steps": 3, "guidance_scale": 0.0, "seed": 5}


class FakeManager:
    def __init__(self) -> None:
        self.unloads = 0

    def unload_all(self) -> None:
        self.unloads += 1

    def release(self) -> None:
        pass


class FakeMmgp:
    """Stands in for `mmgp.offload` (see the module docstring for what it reproduces)."""

    def __init__(self, cast_inputs_to: torch.dtype | None = None):
        self.cast_inputs_to = cast_inputs_to  # None: the part's dtype, as mmgp; else force this dtype
        self.calls: list[dict[str, Any]] = []
        self.seen: list[tuple[str, str, torch.dtype]] = []  # (part, module, dtype of each fp32-or-cast tensor arg)

    def profile(self, parts: dict[str, torch.nn.Module], profile_no: int, **kwargs: Any) -> FakeManager:
        self.calls.append({"parts": dict(parts), "profile_no": profile_no, **kwargs})
        convert = kwargs.get("convertWeightsFloatTo", BF16)
        for part_name, part in parts.items():
            model_dtype = getattr(part, "_model_dtype", None) or convert
            _convert_float_weights(part, model_dtype)
            part_dtype = self.cast_inputs_to or model_dtype
            for name, module in [("", part), *part.named_children()]:
                self._wrap(part_name, name, module, getattr(module, "_lock_dtype", part_dtype))
        torch.set_default_device("meta")
        return FakeManager()

    def _wrap(self, part_name: str, name: str, module: torch.nn.Module, dtype: torch.dtype) -> None:
        inner = module.forward

        @functools.wraps(inner)
        def forward(*args: Any, **kwargs: Any) -> Any:
            args = tuple(self._cast(part_name, name, a, dtype) for a in args)
            kwargs = {k: self._cast(part_name, name, v, dtype) for k, v in kwargs.items()}
            return inner(*args, **kwargs)

        module.forward = forward

    def _cast(self, part_name: str, name: str, value: Any, dtype: torch.dtype) -> Any:
        if torch.is_tensor(value) and value.dtype == F32:
            value = value.to(dtype)
            self.seen.append((part_name, name, value.dtype))
        return value


def _convert_float_weights(part: torch.nn.Module, dtype: torch.dtype) -> None:
    for module in part.modules():
        if hasattr(module, "_lock_dtype"):
            continue
        for param in module.parameters(recurse=False):
            if type(param) is torch.nn.Parameter and param.dtype == F32:
                param.data = param.data.to(dtype)


@pytest.fixture()
def fake_mmgp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., FakeMmgp]]:
    """Install a FakeMmgp as `mmgp.offload`; the default device is put back whatever the test does."""
    made: list[FakeMmgp] = []

    def install(**kwargs: Any) -> FakeMmgp:
        fake = FakeMmgp(**kwargs)
        made.append(fake)
        monkeypatch.setattr("host.lowvram.mmgp_import.import_mmgp_offload", lambda: fake)
        return fake

    try:
        yield install
    finally:
        torch.set_default_device(None)


def _pipeline(flat: dict[str, Path]) -> Any:
    return flat_pipeline(flat)


def _offloaded(flat: dict[str, Path], quantization: str = "bf16", dtype: torch.dtype = F32) -> Any:
    """A pipeline put through the host's CUDA transforms (profile 4), then computing on the CPU."""
    pipe = _pipeline(flat)
    options = load_options({"device": "cuda", "dtype": dtype, "quantization": quantization, "profile": 4})
    pipe.stack = apply_lowvram(pipe, options, {}, FACTS)  # kept beside it for the tests
    pipe.device = torch.device("cpu")  # the fake moved nothing
    return pipe


def test_default_device_is_restored_after_profile(fake_mmgp, tiny_flat_layout: dict[str, Path]) -> None:
    fake = fake_mmgp()
    before = torch.get_default_device()
    _offloaded(tiny_flat_layout)
    assert len(fake.calls) == 1 and torch.get_default_device() == before
    assert torch.zeros(1).device.type == "cpu"


def test_generation_preview_reload_and_guard_survive_a_stray_default_device(
    fake_mmgp, tiny_flat_layout: dict[str, Path]
) -> None:
    """Even with a default device left set (mmgp's 'cuda'; here 'meta'), noise, sigmas, preview, a reload
    and the black-image guard create their tensors where they mean to: the image is the plain one."""
    reference = _pipeline(tiny_flat_layout).generate(SETTINGS).images[0]
    fake_mmgp()
    pipe = _offloaded(tiny_flat_layout)
    previews = []
    previewer = LatentPreviewer(sigmas=None, latent=LATENT)

    def on_step(event: Any) -> None:
        previews.append(previewer.image(event.step, event.latents))
        previewer.observe(event.step, event.latents)

    torch.set_default_device("meta")  # what a library that does not restore it leaves behind
    try:
        image = pipe.generate(SETTINGS, on_step=on_step).images[0]
        reloaded = _pipeline(tiny_flat_layout)  # transformers/diffusers loaders too
        again = reloaded.generate(SETTINGS).images[0]
        with pytest.raises(NonFiniteOutputError):
            pipe.decode(torch.full((1, 16, 8, 8), float("nan"), device="cpu"))  # through the guard on its hook
    finally:
        torch.set_default_device(None)
    assert image.tobytes() == reference.tobytes() and again.tobytes() == reference.tobytes()
    assert len(previews) == SETTINGS["num_inference_steps"] and all(p is not None for p in previews)
    assert pipe.stack.get("offload").handle.manager.unloads == 1  # parts sent back to RAM after the generation


def test_profile_gets_the_compute_dtype_and_parts_keep_theirs(fake_mmgp, tiny_flat_layout: dict[str, Path]) -> None:
    """bf16 run: mmgp is told to turn leftover fp32 weights into bf16, but the VAE keeps fp32 (the guard's
    advice) and the timestep modules are locked to fp32. Checked on dtypes only: no bf16 math on the CPU."""
    fake = fake_mmgp()
    pipe = _pipeline(tiny_flat_layout)
    pipe.transformer.to(BF16)
    pipe.text_encoder.to(BF16)
    offload.apply_offload(pipe, 4, "cuda", BF16)
    call = fake.calls[0]
    assert call["convertWeightsFloatTo"] == BF16 and call["quantizeTransformer"] is False
    assert pipe.vae._model_dtype == F32 and all(p.dtype == F32 for p in pipe.vae.parameters())
    assert pipe.transformer._model_dtype == BF16 and pipe.text_encoder._model_dtype == BF16
    assert pipe.transformer._lock_dtype == F32 and pipe.transformer.t_embedder._lock_dtype == F32


def test_fp32_choice_is_not_turned_into_bf16(fake_mmgp, tiny_flat_layout: dict[str, Path]) -> None:
    """GPUs below compute capability 8.0 run fp32: mmgp's default (bf16) would have converted the norms
    while int8 scales stayed fp32, giving mixed q/k/v dtypes."""
    fake = fake_mmgp()
    pipe = _offloaded(tiny_flat_layout, quantization="int8", dtype=F32)
    assert fake.calls[0]["convertWeightsFloatTo"] == F32
    assert is_quantized(pipe.transformer)
    dtypes = {p.dtype for p in pipe.transformer.parameters() if type(p) is torch.nn.Parameter}
    assert dtypes == {F32}
    assert pipe.transformer.get_submodule("layers.0.attention.to_v").weight._scale.dtype == F32


def test_int8_scales_follow_the_compute_dtype_under_offload(fake_mmgp, tiny_flat_layout: dict[str, Path]) -> None:
    """A transformer quantized with fp32 scales, then run in bf16 on CUDA: the host recasts the scales."""
    fake_mmgp()
    pipe = _pipeline(tiny_flat_layout)
    pipe.transformer.to(BF16)
    # int8 layers with fp32 scales in a bf16 model
    quantize_model(pipe.transformer, include=FACTS.quantize_pattern("transformer"), dtype=F32)
    options = load_options({"device": "cuda", "dtype": BF16, "quantization": "int8", "profile": 4})
    apply_lowvram(pipe, options, {}, FACTS)
    scales = {m.weight._scale.dtype for m in pipe.transformer.modules() if hasattr(m, "weight_qtype")}
    assert scales == {BF16}


def test_time_path_stays_fp32_under_a_casting_wrapper(fake_mmgp, tiny_flat_layout: dict[str, Path]) -> None:
    """mmgp's wrappers cast fp32 inputs to the model's dtype (bf16 on most GPUs): t * 1000 would be
    rounded by up to 4 units above 512. The modules the transformer declares keep fp32 inputs."""
    fake = fake_mmgp(cast_inputs_to=BF16)  # weights stay fp32: the forward below does no bf16 matmul
    pipe = _pipeline(tiny_flat_layout)
    offload.apply_offload(pipe, 4, "cuda", F32)
    torch.set_default_device(None)
    transformer = pipe.transformer
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.6137])  # t * 1000 = 613.7: bf16 would give 612
    received = []
    transformer.t_embedder.register_forward_pre_hook(lambda module, args: received.append(args[0]))
    with torch.no_grad():
        transformer(latents, t, [torch.randn(7, transformer.config.cap_feat_dim)])
    assert received[0].dtype == F32 and float(received[0]) == pytest.approx(613.7, abs=1e-3)
    seen = {(part, name): dtype for part, name, dtype in fake.seen if part == "transformer"}
    assert seen[("transformer", "")] == F32 and seen[("transformer", "t_embedder")] == F32
    assert seen[("transformer", "cap_embedder")] == BF16  # the wrapper does cast what is not locked


def test_without_the_locks_the_wrapper_rounds_the_timestep(fake_mmgp, tiny_flat_layout: dict[str, Path]) -> None:
    """The same wrapper on a transformer that declares nothing: the timestep reaches it in bf16 (this is
    what the locks prevent; it shows the simulation bites)."""
    fake = fake_mmgp(cast_inputs_to=BF16)
    pipe = _pipeline(tiny_flat_layout)
    pipe.transformer.fp32_input_modules = ()
    offload.apply_offload(pipe, 4, "cuda", F32)
    torch.set_default_device(None)
    received = []
    pipe.transformer.t_embedder.register_forward_pre_hook(lambda module, args: received.append(args[0]))
    with torch.no_grad():
        pipe.transformer(torch.randn(1, 16, 8, 8), torch.tensor([0.6137]), [torch.randn(7, 64)])
    assert ("transformer", "", BF16) in fake.seen
    assert received[0].dtype == BF16 and abs(float(received[0]) - 613.7) >= 1  # bf16 steps are 4 apart here


def test_cuda_index_becomes_the_current_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    offload.select_gpu("cuda:1")
    offload.select_gpu("cuda")
    assert chosen == [1]


def test_optional_kernel_that_fails_at_run_time_falls_back_to_sdpa(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An installed kernel that imports but fails when called ("no kernel image for this GPU"): the call
    is answered by SDPA, one warning names the backend and the error, and SDPA is used from then on."""
    calls = []

    def broken(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    monkeypatch.setattr(attn, "_BACKEND", "sage2")
    monkeypatch.setattr(attn, "_KERNEL", broken)
    monkeypatch.setattr(attn, "kernel_skip_reason", lambda q, key_mask: None)  # as if on a CUDA GPU
    attn._WARNED.clear()
    q = torch.randn(1, 6, 2, 8)
    with caplog.at_level(logging.WARNING, logger="common.attention"):
        first = attn.attention(q, q, q)
        second = attn.attention(q, q, q)
    assert torch.equal(first, attn.sdpa(q, q, q)) and torch.equal(second, first)
    assert calls == [1] and attn.get_attention_backend() == "sdpa"
    warnings = [r.getMessage() for r in caplog.records if "failed at run time" in r.getMessage()]
    assert len(warnings) == 1 and "sage2" in warnings[0] and "no kernel image" in warnings[0]


def test_peak_vram_counts_reserved_memory_and_the_context(monkeypatch: pytest.MonkeyPatch) -> None:
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 * gib, 8 * gib))  # 7 GiB in use
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 6 * gib)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 6.5 * gib)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 5 * gib)
    gb, label = host_device.peak_memory_gb("cuda")
    assert gb == pytest.approx((6.5 + 1) * gib / 1e9)  # reserved peak + 1 GiB context
    assert "allocated 5.37 GB" in label and "reserved 6.98 GB" in label and "context" in label
