"""Loading a ControlNet Union from every layout users have, its version read off the keys and shapes; clear errors
for the wrong file; int8 module files; the ControlNet as a component the low-VRAM layer quantizes and offloads."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from common.errors import CheckpointError
from host.lowvram import Int8Transform, apply_lowvram, load_options
from host.lowvram.quantize import is_quantized, load_quanto, quantize_model, save_quantized
from models.z_image import loading_z_image
from models.z_image.controlnet_z_image import ZImageControlNet
from models.z_image.facts_z_image import controlnet_facts
from models.z_image.loading_controlnet_z_image import load_controlnet
from models.z_image.pipeline_z_image import LoadOptions, ZImageComponents
from models.z_image.pipeline_z_image_controlnet import ZImageControlNetPipeline
from tests.fixtures.controlnets import (
    CONTROL_TRANSFORMER,
    VERSIONS,
    build_controlnet,
    controlnet_state_dict,
    write_control_env,
    write_controlnet,
)
from tests.test_gpu_path_sim import fake_mmgp  # noqa: F401  (the simulated mmgp fixture)

F32 = torch.float32
MODES = {"v1": None, "v2.0": "control_layers", "v2.1": "control_noise_refiner"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("controlnets")


@pytest.fixture(scope="module")
def flat(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_control_env(tmp_path_factory.mktemp("control_env"))


@pytest.fixture()
def hooked(monkeypatch: pytest.MonkeyPatch) -> None:
    """The family loader with the host's int8 reader registered (as the handler does from the host's options)."""
    monkeypatch.setattr(loading_z_image, "_QUANTIZED_LOADERS", {})
    loading_z_image.register_quantized_loader(load_quanto)


@pytest.mark.parametrize("layout", ["module", "single", "diffusers"])
@pytest.mark.parametrize("version", VERSIONS)
def test_every_layout_loads_with_its_version(folder: Path, version: str, layout: str) -> None:
    path = write_controlnet(folder / layout, version, layout)
    model = load_controlnet(path, CONTROL_TRANSFORMER, F32)
    cfg = model.config
    assert cfg.version == version and cfg.add_control_noise_refiner == MODES[version]
    assert cfg.control_layers_places == (0, 2)  # spread over the 4 layers (or the folder's config.json)
    assert cfg.control_in_dim == (16 if version == "v1" else 33)
    assert cfg.control_refiner_layers_places == (() if version == "v1" else (0, 1))
    expected = build_controlnet(version).state_dict()
    ours = model.state_dict()
    assert set(ours) == set(expected)  # v2.0 files: the unused control_noise_refiner blocks are not loaded
    for key in ("control_layers.1.after_proj.weight", "control_all_x_embedder.2-1.weight", "control_layers.0.before_proj.bias"):
        assert torch.equal(ours[key], expected[key])


def test_v2_without_the_unused_refiner_blocks_is_v2_0(folder: Path) -> None:
    state = {k: v for k, v in controlnet_state_dict("v2.0").items() if not k.startswith("control_noise_refiner.")}
    path = folder / "v2_plain.safetensors"
    save_file(state, path)
    assert load_controlnet(path, CONTROL_TRANSFORMER, F32).config.version == "v2.0"


def test_a_config_beside_the_file_sets_the_places(folder: Path) -> None:
    """The places are not in the file: a `<stem>_config.json` (diffusers' keys) gives them."""
    from diffusers import ZImageControlNetModel

    path = folder / "places.safetensors"
    reference = build_controlnet("v2.1", places=(0, 3))
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, path)
    assert load_controlnet(path, CONTROL_TRANSFORMER, F32).config.control_layers_places == (0, 2)  # spread
    config = dict(ZImageControlNetModel.load_config(write_controlnet(folder / "cfg", "v2.1", "diffusers")))
    config["control_layers_places"] = [0, 3]
    path.with_name("places_config.json").write_text(json.dumps(config))
    assert load_controlnet(path, CONTROL_TRANSFORMER, F32).config.control_layers_places == (0, 3)


def test_wrong_files_are_named(folder: Path, flat: dict[str, Path]) -> None:
    with pytest.raises(CheckpointError, match=r"not a Z-Image ControlNet.*It is a transformer file"):
        load_controlnet(flat["transformer"], CONTROL_TRANSFORMER, F32)
    with pytest.raises(CheckpointError, match="not a Z-Image ControlNet"):
        load_controlnet(flat["vae"], CONTROL_TRANSFORMER, F32)
    state = controlnet_state_dict("v2.1")
    del state["control_layers.1.attention.to_k.weight"]
    save_file(state, folder / "incomplete.safetensors")
    with pytest.raises(CheckpointError, match=r"lacks 1 tensors.*control_layers\.1\.attention\.to_k\.weight"):
        load_controlnet(folder / "incomplete.safetensors", CONTROL_TRANSFORMER, F32)
    other = CONTROL_TRANSFORMER.__class__(dim=96, n_layers=4, n_refiner_layers=2, n_heads=2, cap_feat_dim=64, axes_dims=(12, 18, 18))
    with pytest.raises(CheckpointError, match="does not fit the transformer"):
        load_controlnet(write_controlnet(folder / "module", "v1", "module"), other, F32)


def test_int8_module_file_loads_through_the_quantized_reader(hooked: None, folder: Path) -> None:
    """Wan2GP's `*_quanto_bf16_int8` module: the control blocks int8, the embedder full precision, the version
    read through the `._data` keys (v2.1: its refiner before_proj is not zero)."""
    model = load_controlnet(write_controlnet(folder / "module", "v2.1", "module"), CONTROL_TRANSFORMER, F32)
    names = quantize_model(model, include=controlnet_facts("v2.1").quantize_pattern("controlnet"))
    assert names and all(n.startswith(("control_layers.", "control_noise_refiner.")) for n in names)
    path = save_quantized(model, folder / "Z-Image-Turbo-Fun-Controlnet-Union2.1_quanto_bf16_int8.safetensors")
    loaded = load_controlnet(path, CONTROL_TRANSFORMER, F32)
    assert loaded.config.version == "v2.1" and is_quantized(loaded)
    assert loaded.get_submodule("control_noise_refiner.1.after_proj").weight._data.dtype == torch.int8
    assert type(loaded.get_submodule("control_all_x_embedder.2-1")) is torch.nn.Linear
    q = "control_layers.1.feed_forward.w1"
    assert torch.equal(loaded.get_submodule(q).weight._data, model.get_submodule(q).weight._data)


def _pipeline(flat: dict[str, Path], folder: Path) -> ZImageControlNetPipeline:
    components = ZImageComponents(
        transformer=flat["transformer"], text_encoder=flat["text_encoder"], tokenizer=flat["tokenizer"], vae=flat["vae"],
        text_encoder_config=flat["text_encoder_config"], vae_config=flat["vae_config"],
    )
    path = write_controlnet(folder / "module", "v2.1", "module")
    return ZImageControlNetPipeline.from_components(components, LoadOptions(dtype=F32), path)


def test_int8_on_the_fly_quantizes_the_controlnet_too(flat: dict[str, Path], folder: Path) -> None:
    pipe = _pipeline(flat, folder)
    assert list(pipe.components()) == list(controlnet_facts("v2.1").names)
    Int8Transform(True, "cpu", F32, controlnet_facts("v2.1")).apply(pipe)
    assert is_quantized(pipe.transformer) and is_quantized(pipe.controlnet)
    assert pipe.controlnet.get_submodule("control_layers.0.before_proj").weight._data.dtype == torch.int8
    assert type(pipe.controlnet.get_submodule("control_all_x_embedder.2-1")) is torch.nn.Linear


SETTINGS = {"prompt": "a red fox", "width": 64, "height": 48, "num_inference_steps": 2, "seed": 5}


@pytest.fixture()
def guide() -> Iterator[Any]:
    from PIL import Image

    yield Image.new("RGB", (64, 48), (200, 40, 90))


def test_offload_takes_the_controlnet_beside_the_transformer(fake_mmgp, flat: dict[str, Path], folder: Path, guide: Any) -> None:  # noqa: F811
    """Under mmgp (simulated: tests/test_gpu_path_sim.py) the ControlNet is one of the parts, shares the GPU
    with the transformer it calls into, keeps its fp32 inputs (t), and the image is the plain run's."""
    settings = SETTINGS | {"image_guide": guide}
    reference = _pipeline(flat, folder).generate(settings).images[0]
    fake = fake_mmgp()
    pipe = _pipeline(flat, folder)
    options = load_options({"device": "cuda", "dtype": F32, "quantization": "bf16", "profile": 4})
    apply_lowvram(pipe, options, {}, controlnet_facts("v2.1"))
    pipe.device = torch.device("cpu")  # the fake moved nothing
    call = fake.calls[0]
    assert list(call["parts"]) == ["text_encoder", "controlnet", "transformer", "vae"]
    assert call["coTenantsMap"]["transformer"] == ["controlnet"] and call["coTenantsMap"]["controlnet"] == ["transformer"]
    assert call["coTenantsMap"]["text_encoder"] == ["vae", "text_encoder_2"]  # mmgp's own kept
    assert pipe.controlnet._lock_dtype == F32
    assert pipe.generate(settings).images[0].tobytes() == reference.tobytes()


def test_released_sizes_and_a_controlnet_too_deep_for_its_transformer() -> None:
    """The facts' parameter counts are the released configs' (built on the meta device); a ControlNet that
    controls more layers than the transformer has is refused."""
    from models.z_image.controlnet_z_image import RELEASED
    from models.z_image.facts_z_image import CONTROLNET_PARAMS
    from models.z_image.transformer_z_image import ZImageConfig

    for version, cfg in RELEASED.items():
        with torch.device("meta"):
            model = ZImageControlNet(cfg, ZImageConfig())
        facts = controlnet_facts(version)
        linears = [(n, m) for n, m in model.named_modules() if type(m) is torch.nn.Linear]
        int8 = sum(m.weight.numel() for n, m in linears if facts.quantizes("controlnet", n))
        assert (sum(p.numel() for p in model.parameters()), int8) == CONTROLNET_PARAMS[version]
    with pytest.raises(ValueError, match="controls layers up to 28"), torch.device("meta"):
        ZImageControlNet(RELEASED["v2.1"], ZImageConfig(n_layers=20))
