"""Applying LoRAs: several at once, per-step schedules (checked on the transformer's calls), exact
unloading, bf16 and int8 (quanto) models, and the full image through the tiny pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from lora_fixtures import DIALECTS, NORMALIZER, inputs, merged_by_hand, peft_with_header, random_lora, run, tiny_model
from safetensors.torch import save_file

from common.errors import SettingsError
from host.lora import apply_loras, parse_multipliers
from host.lora.apply import LoraRuntime, is_quantized, linear_shapes, multiplier_at
from models.z_image.facts_z_image import FACTS
from models.z_image.lora_z_image import normalize_lora

PROBE = "layers.0.attention.to_q"


def _normalized(model, seed: int, dialect: str = "diffusers"):
    lora = random_lora(model, seed=seed)
    return lora, normalize_lora(DIALECTS[dialect](lora), linear_shapes(model))


def test_several_loras_with_their_own_multipliers() -> None:
    model = tiny_model()
    (a, na), (b, nb) = _normalized(model, 2), _normalized(model, 3, "musubi")
    expected = {m: 0.7 * a.delta(m) - 0.4 * b.delta(m) for m in a.down}
    reference = run(merged_by_hand(model, expected, 1.0))
    before = run(model)
    for merged in (False, True):
        runtime = LoraRuntime(model, [na, nb], [[0.7], [-0.4]], merged=merged)
        assert (run(model) - reference).abs().max().item() < 1e-4
        runtime.detach()
        assert torch.equal(run(model), before)


def test_multiplier_schedule_is_stretched_over_the_steps() -> None:
    assert [multiplier_at([1.0, 0.5], s, 10) for s in range(10)] == [1.0] * 5 + [0.5] * 5
    assert [multiplier_at([1, 2, 3], s, 8) for s in range(8)] == [1, 1, 1, 2, 2, 2, 3, 3]
    assert [multiplier_at([0.8], s, 4) for s in range(4)] == [0.8] * 4


class _Probe:
    """Reads the multiplier actually applied on each call, from the module's output:
    m = <y - W x, dW x> / <dW x, dW x> (a forward hook registered after the LoRA's)."""

    def __init__(self, model, delta: torch.Tensor):
        self.module = dict(model.named_modules())[PROBE]
        self.delta, self.seen = delta, []
        self.handle = self.module.register_forward_hook(self)

    def __call__(self, module, args, output) -> None:
        x = args[0]
        lora_part = output - x @ module.weight.T
        d = x @ self.delta.T
        self.seen.append(round(float((lora_part * d).sum() / (d * d).sum()), 4))


def test_schedule_changes_exactly_at_the_steps_it_says() -> None:
    model = tiny_model()
    lora, normalized = _normalized(model, 2)
    schedules = parse_multipliers("1,0.5,0", 1)
    runtime = LoraRuntime(model, [normalized], schedules)
    probe = _Probe(model, lora.delta(PROBE))
    steps = 6
    for step in range(steps):  # what a pipeline's before_step hook does
        runtime.before_step(step, steps)
        run(model)
    assert probe.seen == [1.0, 1.0, 0.5, 0.5, 0.0, 0.0]
    runtime.detach()
    probe.handle.remove()


def test_merged_mode_refuses_a_schedule() -> None:
    model = tiny_model()
    _, normalized = _normalized(model, 2)
    with pytest.raises(SettingsError, match="runtime mode"):
        LoraRuntime(model, [normalized], [[1.0, 0.5]], merged=True)


@pytest.mark.isolated  # bf16 matmuls on the CPU: native kernels that may crash some CPUs
def test_bf16_model() -> None:
    model = tiny_model().to(torch.bfloat16)
    lora, normalized = _normalized(model, 2)
    reference = merged_by_hand(model.float(), {m: lora.delta(m) for m in lora.down}, 0.5).to(torch.bfloat16)
    model = model.to(torch.bfloat16)
    latents, t, caps = inputs()
    before = model(latents, t, caps)
    runtime = LoraRuntime(model, [normalized], [[0.5]])
    with torch.no_grad():
        out, ref = model(latents, t, caps).float(), reference(latents, t, caps).float()
    assert (out - ref).norm() / ref.norm() < 0.03
    runtime.detach()
    assert torch.equal(model(latents, t, caps), before)


def test_int8_quanto_model_runtime_path_without_dequantizing() -> None:
    from host.lowvram.quantize import quantize_model

    fp32 = tiny_model()
    lora, normalized = _normalized(fp32, 2)
    reference = run(merged_by_hand(fp32, {m: lora.delta(m) for m in lora.down}, 1.0))
    model = tiny_model()
    assert quantize_model(model, include=FACTS.quantize_pattern("transformer"))  # layers.N -> int8 QLinear
    probe_module = dict(model.named_modules())[PROBE]
    x = torch.randn(3, 64)
    with torch.no_grad():
        y0, before = probe_module(x), run(model)
    runtime = LoraRuntime(model, [normalized], [[1.0]])
    assert is_quantized(probe_module)  # the weight is still int8 data + scales
    with torch.no_grad():  # on one QLinear the hook adds exactly dW x
        assert torch.allclose(probe_module(x) - y0, x @ lora.delta(PROBE).T, atol=1e-5)
    out = run(model)
    assert (out - reference).norm() / reference.norm() < 0.02  # int8 error only
    runtime.detach()
    assert torch.equal(run(model), before)
    with pytest.raises(SettingsError, match="quantized layer"):
        LoraRuntime(model, [normalized], [[1.0]], merged=True)
    assert torch.equal(run(model), before)


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_diffusers_folder: Path):
    from models.z_image.pipeline_z_image import LoadOptions, ZImageComponents, ZImagePipeline

    components = ZImageComponents.from_diffusers_folder(tiny_diffusers_folder)
    return ZImagePipeline.from_components(components, LoadOptions(dtype=torch.float32))


SETTINGS = dict(prompt="a cat", width=64, height=64, num_inference_steps=4, guidance_scale=0.0, flow_shift=3.0, seed=7)


def _pixels(result) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in result.images])


@pytest.mark.parametrize("dialect", ["ai-toolkit", "musubi", "comfy-fused", "diffsynth"])
@pytest.mark.parametrize("mult", [1.0, 0.5])
def test_full_image_matches_hand_merged_weights(tiny_pipeline, tmp_path: Path, dialect: str, mult: float) -> None:
    transformer = tiny_pipeline.transformer
    lora = random_lora(transformer, seed=11)
    path = tmp_path / f"{dialect}.safetensors"
    save_file({k: v.contiguous() for k, v in DIALECTS[dialect](lora).items()}, str(path))
    base = _pixels(tiny_pipeline.generate(SETTINGS))

    loras = apply_loras(tiny_pipeline, [path], f"{mult}", normalizer=NORMALIZER)
    assert loras.reports[0].modules_matched == len(linear_shapes(transformer))
    with_lora = _pixels(tiny_pipeline.generate(SETTINGS))
    loras.remove(tiny_pipeline)
    assert np.array_equal(_pixels(tiny_pipeline.generate(SETTINGS)), base)  # unloaded: the exact image

    originals = {n: m.weight.detach().clone() for n, m in transformer.named_modules() if n in lora.down}
    modules = dict(transformer.named_modules())
    with torch.no_grad():
        for name in lora.down:
            modules[name].weight += mult * lora.delta(name)
    try:
        by_hand = _pixels(tiny_pipeline.generate(SETTINGS))
    finally:
        with torch.no_grad():
            for name, w in originals.items():
                modules[name].weight.copy_(w)
    assert np.abs(with_lora - by_hand).max() <= 1  # within 1/255 per pixel
    assert np.abs(with_lora - base).max() > 10  # and the LoRA does change the image


def test_pipeline_schedule_on_the_call_log(tiny_pipeline, tmp_path: Path) -> None:
    transformer = tiny_pipeline.transformer
    lora = random_lora(transformer, seed=12)
    path = tmp_path / "sched.safetensors"
    save_file({k: v.contiguous() for k, v in DIALECTS["ai-toolkit"](lora).items()}, str(path))
    loras = apply_loras(tiny_pipeline, [path], "# warm start, then fade out\n1,0.5", normalizer=NORMALIZER)
    assert tiny_pipeline.hooks.before_step.owners == ["loras"]  # the schedule rides on the model's step hook
    probe = _Probe(transformer, lora.delta(PROBE))
    try:
        tiny_pipeline.generate({**SETTINGS, "num_inference_steps": 6})
    finally:
        probe.handle.remove()
        loras.remove(tiny_pipeline)
    assert tiny_pipeline.hooks.before_step.owners == []
    assert probe.seen == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5]  # one transformer call per step (no CFG)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runtime_hooks_follow_the_model_to_cuda() -> None:
    model = tiny_model()
    lora, normalized = _normalized(model, 2)
    reference = run(merged_by_hand(model, {m: lora.delta(m) for m in lora.down}, 1.0))
    runtime = LoraRuntime(model, [normalized], [[1.0]])
    model.cuda()
    latents, t, caps = inputs()
    with torch.no_grad():
        out = model(latents.cuda(), t.cuda(), [c.cuda() for c in caps]).cpu()
    assert (out - reference).abs().max().item() < 1e-3
    runtime.detach()


def test_mmgp_adapter_state_dict_keeps_every_delta() -> None:
    """The key set handed to mmgp's own LoRA API (offload on CUDA): scale folded in, no alpha keys."""
    from host.lora.apply import mmgp_state_dict

    model = tiny_model()
    lora, normalized = _normalized(model, 2, "musubi")
    sd = mmgp_state_dict(normalized)
    assert not [k for k in sd if k.endswith(".alpha")]
    for name in lora.down:
        rebuilt = sd[f"{name}.lora_B.weight"] @ sd[f"{name}.lora_A.weight"]
        assert torch.allclose(rebuilt, lora.delta(name), atol=1e-6)
    lokr = normalize_lora({"lycoris_layers_0_attention_to_q.lokr_w1": torch.randn(2, 8),
                           "lycoris_layers_0_attention_to_q.lokr_w2_a": torch.randn(32, 2),
                           "lycoris_layers_0_attention_to_q.lokr_w2_b": torch.randn(2, 8),
                           "lycoris_layers_0_attention_to_q.alpha": torch.tensor(1.0)})
    sd = mmgp_state_dict(lokr)
    want = lokr.deltas["layers.0.attention.to_q"].weight()
    key = "layers.0.attention.to_q"
    assert torch.allclose(torch.kron(sd[f"{key}.lokr_w1"], sd[f"{key}.lokr_w2"]), want)


def test_alpha_in_the_header_gives_diffusers_own_lora_image(tiny_pipeline, tiny_diffusers_folder: Path, tmp_path: Path) -> None:
    """A LoRA as diffusers' training scripts save it (alpha 8 at rank 4 in `lora_adapter_metadata`, no
    `.alpha` tensors) gives the image diffusers' own `load_lora_weights` gives (needs peft, which
    diffusers' LoRA loading requires)."""
    pytest.importorskip("peft", reason="diffusers loads LoRAs through peft, which is not installed")
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers import ZImagePipeline as ReferencePipeline

    transformer = tiny_pipeline.transformer
    lora = random_lora(transformer, seed=11)
    modules = [m for m in lora.down if ".attention.to_" in m]
    config = {"r": 4, "lora_alpha": 8, "target_modules": modules, "lora_dropout": 0.0, "init_lora_weights": "gaussian"}
    sd, header = peft_with_header(lora, modules, config)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=header)

    ref = ReferencePipeline.from_pretrained(tiny_diffusers_folder, dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = FlowMatchEulerDiscreteScheduler(shift=SETTINGS["flow_shift"])
    s = SETTINGS
    call = dict(prompt=s["prompt"], width=s["width"], height=s["height"], num_inference_steps=s["num_inference_steps"],
                guidance_scale=s["guidance_scale"], output_type="np")
    plain = ref(**call, generator=torch.Generator("cpu").manual_seed(s["seed"])).images
    ref.load_lora_weights(str(path))
    expected = (ref(**call, generator=torch.Generator("cpu").manual_seed(s["seed"])).images * 255).round()

    loras = apply_loras(tiny_pipeline, [path], "1.0", normalizer=NORMALIZER)
    try:
        got = _pixels(tiny_pipeline.generate(SETTINGS)).astype(np.float32)
        source = loras.reports[0].alpha_source
    finally:
        loras.remove(tiny_pipeline)
    assert np.abs((plain * 255).round() - expected).max() > 10  # the LoRA changes diffusers' image
    assert np.abs(got - expected).max() <= 1  # within 1/255 of diffusers' own LoRA loading
    assert source == "metadata"
