"""ControlNet presets: ours in defaults/ and Wan2GP's own (its defaults/z_image_control*.json, written here in its
published format) load unchanged; the ControlNet file comes from `"modules"`, the transformer from `"URLs": "z_image"`;
bad `modules` are reported with the file and the field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from host.files import pick_variant, specs_from_model_def
from host.presets import load_presets
from host.registry import DEFAULT_MODELS_ROOT, REPO_ROOT, discover

HF = "https://huggingface.co/DeepBeepMeep/Z-Image/resolve/main/"
TURBO_URL = f"{HF}ZImageTurbo_bf16.safetensors"
CONTROL_TYPES = ("z_image_control", "z_image_control2", "z_image_control2_1")


def wan2gp_preset(name: str, arch: str, stem: str, **settings: Any) -> dict[str, Any]:
    """Wan2GP's preset shape for its ControlNet types (Wan2GP repository, defaults/z_image_control.json,
    z_image_control2.json, z_image_control2_1.json, z_image_control2_1_8s.json: a model block with name,
    architecture, description, `"URLs": "z_image"` and `"modules": [[bf16 url, int8 url]]`, then resolution,
    batch_size, num_inference_steps 9 (8 for the 8-step file), guidance_scale 0 and control_net_weight_alt; as
    documented in the public write-ups of those files and of models/z_image/z_image_handler.py, whose
    query_model_def / update_default_settings give the control types control_net_weight 0.75)."""
    model = {
        "name": name,
        "architecture": arch,
        "description": "Z-Image Turbo with a ControlNet Union module (pose, depth, edges, scribble).",
        "URLs": "z_image",
        "modules": [[f"{HF}{stem}_bf16.safetensors", f"{HF}{stem}_quanto_bf16_int8.safetensors"]],
    }
    return {"model": model, "resolution": "1024x1024", "batch_size": 1, "guidance_scale": 0, **settings}


WAN2GP_PRESETS = {
    "z_image_control": wan2gp_preset(
        "Z-Image Turbo Fun ControlNet v1 6B", "z_image_control", "Z-Image-Turbo-Fun-Controlnet-Union",
        num_inference_steps=9, control_net_weight_alt=0.75,
    ),
    "z_image_control2": wan2gp_preset(
        "Z-Image Turbo Fun ControlNet v2 6B", "z_image_control2", "Z-Image-Turbo-Fun-Controlnet-Union2",
        num_inference_steps=9, control_net_weight_alt=0.75,
    ),
    "z_image_control2_1": wan2gp_preset(
        "Z-Image Turbo Fun ControlNet v2.1 6B", "z_image_control2_1", "Z-Image-Turbo-Fun-Controlnet-Union2.1",
        num_inference_steps=9, resolution="1920x1088", control_net_weight_alt=0.65,
    ),
    # The hidden 8-step file (its module name as Wan2GP's model list shows it).
    "z_image_control2_1_8s": wan2gp_preset(
        "Z-Image Turbo Fun ControlNet v2.1 8 Steps 6B", "z_image_control2_1", "Z-Image-Turbo-Fun-Controlnet-Tile-2.1-2601-8_steps",
        num_inference_steps=8,
    ),
}
WAN2GP_PRESETS["z_image_control2_1_8s"]["model"]["visible"] = False


def control_files(catalog: Any, model_type: str, quantization: str) -> dict[str, str]:
    preset = catalog.get(model_type)
    handler = discover(DEFAULT_MODELS_ROOT).handlers[preset.architecture]
    specs = specs_from_model_def(preset.model_def, handler.query_model_files(preset.architecture, preset.model_def, quantization))
    return {spec.role: pick_variant(spec.variants, quantization) for spec in specs}


def test_shipped_control_presets_load() -> None:
    catalog = load_presets(discover(DEFAULT_MODELS_ROOT))
    assert catalog.errors == []
    for model_type in CONTROL_TYPES:
        preset = catalog.get(model_type)
        s = preset.settings
        assert (s["num_inference_steps"], s["guidance_scale"], s["flow_shift"], s["control_net_weight"]) == (9, 0.0, 3.0, 0.75)
        assert preset.model_def["URLs"] == catalog.get("z_image").model_def["URLs"]  # Turbo's transformer
        controlnet = preset.facts.component("controlnet")
        assert controlnet.role == "auxiliary" and controlnet.int8_pattern and controlnet.params > 1_000_000_000
        assert preset.facts.names == ("text_encoder", "controlnet", "transformer", "vae")
        files = control_files(catalog, model_type, "int8")
        assert files["transformer"].endswith("ZImageTurbo_quanto_bf16_int8.safetensors")
        assert files["controlnet"].endswith("_quanto_bf16_int8.safetensors") and "Controlnet-Union" in files["controlnet"]
        assert control_files(catalog, model_type, "bf16")["controlnet"].endswith("_bf16.safetensors")


def test_wan2gp_presets_load_unchanged(tmp_path: Path) -> None:
    defaults = tmp_path / "defaults"
    defaults.mkdir()
    shutil.copy(REPO_ROOT / "defaults" / "z_image.json", defaults)
    for name, data in WAN2GP_PRESETS.items():
        (defaults / f"{name}.json").write_text(json.dumps(data, indent=4))
    catalog = load_presets(discover(DEFAULT_MODELS_ROOT), defaults, None)
    assert catalog.errors == []
    for name, data in WAN2GP_PRESETS.items():
        preset = catalog.get(name)
        assert preset.model_def["URLs"][0] == TURBO_URL
        assert preset.model_def["modules"] == data["model"]["modules"]
        assert preset.settings["num_inference_steps"] == data["num_inference_steps"]
    assert catalog.get("z_image_control2_1").settings["resolution"] == "1920x1088"
    assert not catalog.get("z_image_control2_1_8s").visible
    files = control_files(catalog, "z_image_control2_1_8s", "bf16")
    assert files["controlnet"] == f"{HF}Z-Image-Turbo-Fun-Controlnet-Tile-2.1-2601-8_steps_bf16.safetensors"


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"architecture": "z_image_control"}, "model.modules must list the ControlNet file"),
        ({"architecture": "z_image_control2", "modules": [["a.safetensors"], ["b.safetensors"]]}, "a Z-Image ControlNet preset takes one"),
        ({"architecture": "z_image_control2", "modules": [[3]]}, "model.modules must list the ControlNet file"),
        ({"architecture": "z_image", "modules": [["a.safetensors"]]}, "model.modules (ControlNet files) is for the z_image_control"),
    ],
)
def test_bad_modules_are_reported(tmp_path: Path, model: dict[str, Any], message: str) -> None:
    finetunes = tmp_path / "finetunes"
    finetunes.mkdir()
    data = {"model": {"name": "mine", "URLs": "z_image", **model}}
    (finetunes / "mine.json").write_text(json.dumps(data))
    catalog = load_presets(discover(DEFAULT_MODELS_ROOT), REPO_ROOT / "defaults", finetunes)
    assert "mine" not in catalog.presets
    assert any("mine.json" in e and message in e for e in catalog.errors), catalog.errors


def test_the_memory_plan_counts_the_controlnet_with_the_transformer() -> None:
    """The ControlNet runs beside the transformer at every step: a plan holds both sets of weights."""
    from host.lowvram.planner import plan, sizes_from_facts

    catalog = load_presets(discover(DEFAULT_MODELS_ROOT))
    turbo, control = (sizes_from_facts(catalog.get(t).facts) for t in ("z_image", "z_image_control2_1"))
    controlnet = catalog.get("z_image_control2_1").facts.component("controlnet")
    # bf16: 2 bytes a parameter; int8: 1 byte for the int8 Linears' weights, 2 for the rest (planner.PartSize)
    int8_bytes = controlnet.int8_params + 2 * (controlnet.params - controlnet.int8_params)
    for quantization, bytes_of in (("bf16", 2 * controlnet.params), ("int8", int8_bytes)):
        base, with_control = (plan(s, 1024, 1024, quantization, 1, cfg=False) for s in (turbo, control))
        assert with_control.vram_gb - base.vram_gb == pytest.approx(bytes_of / 1e9, abs=0.01)
        assert with_control.ram_gb - base.ram_gb == pytest.approx(bytes_of / 1e9, abs=0.01)
